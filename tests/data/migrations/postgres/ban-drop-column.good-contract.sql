-- Contract: every cluster runs the new release, which no longer reads nickname.
SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER TABLE users DROP COLUMN nickname;
