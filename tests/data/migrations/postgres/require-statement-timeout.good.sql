SET lock_timeout = '2s';
-- Bounds the statement, and so how long its locks are held.
SET statement_timeout = '5s';
ALTER TABLE users ADD COLUMN bio text;
