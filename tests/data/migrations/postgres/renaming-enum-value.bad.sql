SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER TYPE order_status RENAME VALUE 'done' TO 'delivered';
