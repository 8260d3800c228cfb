-- Plain data migrations are classified (and left to the author).
UPDATE users SET plan = 'free' WHERE plan IS NULL;
