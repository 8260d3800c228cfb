SET lock_timeout = '2s'; SET statement_timeout = '5s';
-- A missing semicolon: the DROP hides inside the ALTER, and --allow cannot wave it through.
ALTER TABLE users ADD COLUMN nickname text
DROP TABLE users;
