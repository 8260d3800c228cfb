SET lock_timeout = '2s';
CREATE INDEX orders_user_id_idx ON orders (user_id);
