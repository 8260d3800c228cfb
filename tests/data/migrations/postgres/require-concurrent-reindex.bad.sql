SET lock_timeout = '2s';
REINDEX INDEX users_email_idx;
