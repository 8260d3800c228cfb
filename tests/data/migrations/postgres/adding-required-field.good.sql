-- A constant default is stored in the catalog (PostgreSQL 11+): no rewrite,
-- and the old release's INSERTs get the default.
SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER TABLE users ADD COLUMN plan text NOT NULL DEFAULT 'free';
