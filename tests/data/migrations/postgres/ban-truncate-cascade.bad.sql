SET lock_timeout = '2s'; SET statement_timeout = '5s';
TRUNCATE import_staging CASCADE;
