SET lock_timeout = '2s'; SET statement_timeout = '5s';
DROP VIEW user_summary;
