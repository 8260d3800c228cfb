-- sqlglot parses VACUUM only as an opaque command.
VACUUM;
