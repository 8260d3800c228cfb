SET lock_timeout = '2s'; SET statement_timeout = '5s';
CREATE TABLE users_audit (id bigint, note text NULL DEFAULT '');
-- note is nullable: the old release's INSERTs that omit it store NULL.
ALTER TABLE users_audit ALTER COLUMN note DROP DEFAULT;
