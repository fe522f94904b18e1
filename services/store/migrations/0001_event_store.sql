-- Event store: monthly-partitioned events, per-stream versions, idempotency keys.

-- Version 0 means "no events yet": a row may exist at version 0 when an append
-- to a new stream was rejected after the row was locked.
CREATE TABLE streams (
    stream_id  text PRIMARY KEY,
    version    bigint NOT NULL CHECK (version >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE events_position_seq AS bigint;

-- Primary keys of a partitioned table must include the partition key, so the
-- uniqueness of (stream_id, stream_version) is guaranteed by the `streams`
-- row lock taken in the append transaction, not by a constraint.
CREATE TABLE events (
    position       bigint NOT NULL DEFAULT nextval('events_position_seq'),
    tx_id          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    stream_id      text NOT NULL,
    stream_version bigint NOT NULL,
    event_type     text NOT NULL,
    data           jsonb NOT NULL,
    metadata       jsonb NOT NULL DEFAULT '{}',
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (position, recorded_at)
) PARTITION BY RANGE (recorded_at);

ALTER SEQUENCE events_position_seq OWNED BY events.position;

-- The projector's tail: (tx_id, position) beyond a checkpoint, below the horizon.
CREATE INDEX events_tail_idx ON events (tx_id, position);
-- Stream reads.
CREATE INDEX events_stream_idx ON events (stream_id, stream_version);

-- Creates the monthly partitions covering [now - 0, now + months_ahead months]
-- in UTC. The PartitionPolicy planner takes over in clusters; this keeps a
-- bare database usable right after migration.
CREATE FUNCTION eventplane_ensure_event_partitions(months_ahead int) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    first_month timestamptz := date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    lo timestamptz;
    hi timestamptz;
    part text;
BEGIN
    FOR i IN 0..months_ahead LOOP
        lo := ((first_month AT TIME ZONE 'UTC') + make_interval(months => i)) AT TIME ZONE 'UTC';
        hi := ((first_month AT TIME ZONE 'UTC') + make_interval(months => i + 1)) AT TIME ZONE 'UTC';
        part := format('events_%s', to_char(lo AT TIME ZONE 'UTC', 'YYYY_MM'));
        IF to_regclass(part) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
        END IF;
    END LOOP;
END;
$$;

SELECT eventplane_ensure_event_partitions(1);

-- One notification per writing transaction (Postgres folds identical
-- notifications within a transaction), waking the projectors.
CREATE FUNCTION eventplane_notify_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('eventplane_events', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION eventplane_notify_events();

-- Idempotency keys live in the append transaction: a retried request returns
-- the stored response and writes nothing.
CREATE TABLE idempotency_keys (
    key          text PRIMARY KEY,
    request_hash bytea NOT NULL,
    response     jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Async commands, persisted before 202 Accepted is returned.
CREATE TABLE command_jobs (
    id          uuid PRIMARY KEY,
    priority    smallint NOT NULL,
    status      text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    request     jsonb NOT NULL,
    result      jsonb,
    error       jsonb,
    attempts    int NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

CREATE INDEX command_jobs_pending_idx ON command_jobs (priority, created_at) WHERE status = 'pending';

CREATE FUNCTION eventplane_notify_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('eventplane_jobs', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER command_jobs_notify AFTER INSERT ON command_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION eventplane_notify_jobs();

-- Projection checkpoints: the last (tx_id, position) applied, written in the
-- same transaction as the projection rows.
CREATE TABLE projection_checkpoints (
    projection    text PRIMARY KEY,
    tx_id         xid8 NOT NULL DEFAULT '0',
    position      bigint NOT NULL DEFAULT 0,
    last_event_at timestamptz,
    applied       bigint NOT NULL DEFAULT 0,
    halted_reason text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projection_dead_letters (
    id          bigserial PRIMARY KEY,
    projection  text NOT NULL,
    position    bigint NOT NULL,
    tx_id       xid8 NOT NULL,
    stream_id   text NOT NULL,
    event_type  text NOT NULL,
    reason      text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX projection_dead_letters_projection_idx ON projection_dead_letters (projection, id);
