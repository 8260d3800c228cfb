-- sqlglot keeps no action for a table option, so nobody can tell it rebuilds the table.
ALTER TABLE users ENGINE = InnoDB;
