-- Add the new column; the application writes both until contract drops the old one.
SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER TABLE users ADD COLUMN full_name text;
