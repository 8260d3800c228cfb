SET lock_timeout = '2s'; SET statement_timeout = '5s';
-- The file's own BEGIN ... COMMIT ends the ALTER's transaction (and its lock)
-- before the backfill; two files would do the same.
BEGIN;
ALTER TABLE users ADD COLUMN IF NOT EXISTS nickname text;
COMMIT;
UPDATE users SET nickname = name;
