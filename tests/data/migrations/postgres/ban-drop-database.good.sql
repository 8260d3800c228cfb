-- Nothing: databases are dropped by hand, outside migrations.
SELECT 1;
