SET lock_timeout = '2s';
TRUNCATE import_staging CASCADE;
