-- The analyser cannot see what a DO block does.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE users DROP COLUMN nickname';
END
$$;
