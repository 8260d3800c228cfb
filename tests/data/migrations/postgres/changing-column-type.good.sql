-- A new column of the new type, backfilled in batches and swapped in later.
SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER TABLE users ADD COLUMN id_big bigint;
