UPDATE users SET plan = 'free' WHERE plan IS NULL;
