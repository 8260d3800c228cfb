SET lock_timeout = '2s'; SET statement_timeout = '5s';
REINDEX INDEX users_email_idx;
