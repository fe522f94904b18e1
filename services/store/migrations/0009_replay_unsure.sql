-- A rebuild's set-based replay (see eventplane-plan's replay module) calls
-- this when it meets an event it cannot map exactly as the projector
-- would; the statement then fails before writing anything, and the rebuild
-- replays through the projector's batches instead.
CREATE FUNCTION eventplane_replay_unsure(events bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'EPR01',
        MESSAGE = format('%s events need the batch path', events);
END;
$$;
