SET lock_timeout = '2s';
ALTER DOMAIN positive_amount ADD CONSTRAINT amount_positive CHECK (VALUE > 0);
