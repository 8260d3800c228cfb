-- Plain data migrations are classified (and left to the author).
UPDATE users SET nickname = name WHERE nickname IS NULL;
