-- A plain index: the old release's writes cannot fail on it.
CREATE INDEX CONCURRENTLY users_email_idx ON users (email);
