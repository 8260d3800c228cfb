SET lock_timeout = '2s';
DROP VIEW user_summary;
