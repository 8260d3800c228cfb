-- Contract: every cluster runs the new release, which no longer reads nickname.
SET lock_timeout = '2s';
ALTER TABLE users DROP COLUMN nickname;
