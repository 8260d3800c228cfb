SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER SCHEMA billing RENAME TO invoicing;
