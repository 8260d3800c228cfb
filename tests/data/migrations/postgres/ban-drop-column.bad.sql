-- The old release still selects users.nickname.
SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER TABLE users DROP COLUMN nickname;
