SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER TYPE order_status ADD VALUE IF NOT EXISTS 'refunded';
ALTER TABLE orders ALTER COLUMN status SET DEFAULT 'refunded';
