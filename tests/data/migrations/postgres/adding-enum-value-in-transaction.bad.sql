SET lock_timeout = '2s'; SET statement_timeout = '5s';
BEGIN;
ALTER TYPE order_status ADD VALUE IF NOT EXISTS 'refunded';
COMMIT;
