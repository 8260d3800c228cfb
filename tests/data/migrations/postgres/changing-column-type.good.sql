-- A new column of the new type, backfilled in batches and swapped in later.
SET lock_timeout = '2s';
ALTER TABLE users ADD COLUMN id_big bigint;
