-- Notifying inside a transaction takes a database-wide lock at commit and
-- holds it through the commit's WAL flush, which serialises every appending
-- transaction. Appenders now notify after they commit instead.
DROP TRIGGER events_notify ON events;
DROP FUNCTION eventplane_notify_events();
