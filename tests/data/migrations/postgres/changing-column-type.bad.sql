SET lock_timeout = '2s';
ALTER TABLE users ALTER COLUMN id TYPE bigint;
