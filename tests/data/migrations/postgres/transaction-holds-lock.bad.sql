SET lock_timeout = '2s'; SET statement_timeout = '5s';
-- Applied in one transaction: the ACCESS EXCLUSIVE lock of the ADD COLUMN is
-- held while the backfill runs, so the old release cannot even read users.
ALTER TABLE users ADD COLUMN nickname text;
UPDATE users SET nickname = name;
