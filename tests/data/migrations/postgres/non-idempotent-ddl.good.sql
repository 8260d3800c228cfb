SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER TABLE users ADD COLUMN IF NOT EXISTS nickname text;
CREATE INDEX CONCURRENTLY IF NOT EXISTS users_nickname ON users (nickname);
