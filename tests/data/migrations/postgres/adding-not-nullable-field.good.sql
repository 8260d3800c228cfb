SET lock_timeout = '2s'; SET statement_timeout = '5s';
BEGIN;
ALTER TABLE users ADD CONSTRAINT users_email_not_null CHECK (email IS NOT NULL) NOT VALID;
COMMIT;
-- Outside the ADD CONSTRAINT's transaction, so its lock is not held meanwhile.
ALTER TABLE users VALIDATE CONSTRAINT users_email_not_null;
-- PostgreSQL 12+ uses the validated check instead of scanning the table.
ALTER TABLE users ALTER COLUMN email SET NOT NULL;
ALTER TABLE users DROP CONSTRAINT users_email_not_null;
