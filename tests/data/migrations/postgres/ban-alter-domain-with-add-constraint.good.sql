SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER DOMAIN positive_amount ADD CONSTRAINT amount_positive CHECK (VALUE > 0) NOT VALID;
