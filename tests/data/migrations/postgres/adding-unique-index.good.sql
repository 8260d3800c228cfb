-- A plain index: the old release's writes cannot fail on it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS users_email_idx ON users (email);
