-- Both names work while both releases run.
CREATE VIEW accounts AS SELECT * FROM users;
