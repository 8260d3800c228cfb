-- Outside a transaction block: ADD VALUE is safe for the old release to read.
SET lock_timeout = '2s';
ALTER TYPE order_status ADD VALUE 'delivered';
