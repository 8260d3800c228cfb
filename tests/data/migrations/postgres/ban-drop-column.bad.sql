-- The old release still selects users.nickname.
SET lock_timeout = '2s';
ALTER TABLE users DROP COLUMN nickname;
