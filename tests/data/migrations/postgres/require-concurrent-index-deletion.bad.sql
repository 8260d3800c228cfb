SET lock_timeout = '2s';
DROP INDEX orders_user_id_idx;
