SET lock_timeout = '2s';
ALTER TYPE order_status ADD VALUE 'packed' BEFORE 'shipped';
