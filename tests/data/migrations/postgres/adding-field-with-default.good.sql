-- Nullable first; the volatile default then applies to new rows only, and a
-- batched UPDATE backfills the old ones.
SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER TABLE users ADD COLUMN api_token uuid;
ALTER TABLE users ALTER COLUMN api_token SET DEFAULT gen_random_uuid();
