SET lock_timeout = '2s';
ALTER TYPE order_status RENAME VALUE 'done' TO 'delivered';
