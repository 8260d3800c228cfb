SET lock_timeout = '2s'; SET statement_timeout = '5s';
ALTER TABLE audit_log ADD PRIMARY KEY (id);
