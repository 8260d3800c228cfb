-- Outside a transaction block: ADD VALUE is safe for the old release to read.
SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER TYPE order_status ADD VALUE 'delivered';
