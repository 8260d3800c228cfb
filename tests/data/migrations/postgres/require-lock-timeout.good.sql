SET statement_timeout = '5s';
BEGIN;
SET LOCAL lock_timeout = '2s';
ALTER TABLE users ADD COLUMN IF NOT EXISTS bio text;
COMMIT;
