-- MySQL refuses INPLACE rather than silently copying the table.
ALTER TABLE orders ADD COLUMN note TEXT, ALGORITHM=INPLACE;
