SET lock_timeout = '2s'; SET statement_timeout = '5s';
BEGIN;
ALTER TABLE orders ADD CONSTRAINT orders_total_positive CHECK (total >= 0) NOT VALID;
COMMIT;
-- Its own transaction: VALIDATE takes only SHARE UPDATE EXCLUSIVE.
ALTER TABLE orders VALIDATE CONSTRAINT orders_total_positive;
