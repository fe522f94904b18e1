-- A name for this database, made once: caches that several databases
-- share (one Redis for several stacks) key everything by it, so one
-- database's rows never answer for another's. A streaming replica carries
-- the same name as its primary, which is right: it holds the same rows.
CREATE TABLE eventplane_instance (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id         text NOT NULL
);
INSERT INTO eventplane_instance (id) VALUES (replace(gen_random_uuid()::text, '-', ''));
