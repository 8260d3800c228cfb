-- MySQL 8 syntax; CHANGE old new TYPE is a rename and a redefinition in one.
ALTER TABLE users RENAME COLUMN name TO full_name;
