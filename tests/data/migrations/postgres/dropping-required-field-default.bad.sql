CREATE TABLE IF NOT EXISTS users (id bigint);
SET lock_timeout = '2s'; SET statement_timeout = '5s';
-- Whether users.status is NOT NULL is not declared here: the old release may rely on it.
ALTER TABLE users ALTER COLUMN status DROP DEFAULT;
