-- One group-commit batch of appends in one statement, so a batch costs one
-- round trip (and, outside a transaction block, is its own transaction).
-- Each request succeeds or fails on its own: a version conflict or an
-- idempotency key reused for another request rejects that request only.
--
-- Requests come as parallel arrays (r_*), their events flattened in request
-- order (e_*), r_counts[i] of them for request i. r_expected[i] is the
-- stream version the request expects (>= 0), -1 for "any" or -2 for
-- "no stream". r_keys[i] and r_hashes[i] are the idempotency key and the
-- request digest, or NULL.
--
-- Locks are taken in one global order (idempotency keys, then stream rows,
-- each in byte order) so concurrent batches never deadlock each other.
--
-- One row per request comes back, in request order:
--   outcome 'appended' (or 'replayed' for a key seen before, with the
--   stored response), 'conflict' (with actual_version) or 'key_reused'.
CREATE FUNCTION eventplane_append(
    r_streams   text[],
    r_expected  bigint[],
    r_counts    int[],
    r_keys      text[],
    r_hashes    bytea[],
    e_types     text[],
    e_data      jsonb[],
    e_metadata  jsonb[]
) RETURNS TABLE (
    idx            int,
    outcome        text,
    actual_version bigint,
    response       jsonb
)
LANGUAGE plpgsql AS $$
DECLARE
    n            int := coalesce(array_length(r_streams, 1), 0);
    tx           bigint := pg_current_xact_id()::text::bigint;
    k            text;
    stored_hash  bytea;
    stored_resp  jsonb;
    -- Distinct streams in byte order, each request's index into them, and
    -- each locked stream's version as the batch moves it (NULL: not locked).
    -- Arrays indexed this way keep the loop below linear in the batch.
    s_ids        text[];
    s_of         int[];
    s_ver        bigint[];
    -- Each request's idempotency key group, and the request of each group
    -- that appended in this batch.
    k_of         int[];
    k_first      int[];
    l_pos        int[];
    l_ver        bigint[];
    answered     jsonb[] := array_fill(NULL::jsonb, ARRAY[greatest(n, 1)]);
    outcomes     text[] := array_fill(NULL::text, ARRAY[greatest(n, 1)]);
    actuals      bigint[] := array_fill(NULL::bigint, ARRAY[greatest(n, 1)]);
    first_of     int[] := array_fill(NULL::int, ARRAY[greatest(n, 1)]);
    offsets      int[] := array_fill(0, ARRAY[greatest(n, 1)]);
    cur          bigint;
    q_idx        int[] := '{}';
    q_first      bigint[] := '{}';
    q_last       bigint[] := '{}';
    rec          record;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    FOR i IN 2..n LOOP
        offsets[i] := offsets[i - 1] + r_counts[i - 1];
    END LOOP;

    SELECT array_agg(d.s ORDER BY d.s COLLATE "C") INTO s_ids
    FROM (SELECT DISTINCT u.s FROM unnest(r_streams) AS u(s)) d;
    SELECT array_agg(p.pos ORDER BY g.i) INTO s_of
    FROM generate_subscripts(r_streams, 1) AS g(i)
    JOIN unnest(s_ids) WITH ORDINALITY AS p(s, pos) ON p.s = r_streams[g.i];
    s_ver := array_fill(NULL::bigint, ARRAY[array_length(s_ids, 1)]);

    SELECT array_agg(kg.grp ORDER BY g.i) INTO k_of
    FROM generate_subscripts(r_streams, 1) AS g(i)
    LEFT JOIN (SELECT d.key, row_number() OVER () AS grp
               FROM (SELECT DISTINCT u.key FROM unnest(r_keys) AS u(key)
                     WHERE u.key IS NOT NULL) d) kg ON kg.key = r_keys[g.i];
    k_first := array_fill(NULL::int, ARRAY[n]);

    -- Requests that share a key take turns, across batches too.
    FOR k IN SELECT d.key FROM (SELECT DISTINCT u.key FROM unnest(r_keys) AS u(key)
                                WHERE u.key IS NOT NULL) d
             ORDER BY d.key COLLATE "C" LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended(k, 7340));
    END LOOP;

    -- Requests answered by a stored key are settled before any stream lock.
    FOR i IN 1..n LOOP
        IF r_keys[i] IS NOT NULL THEN
            SELECT request_hash, ik.response INTO stored_hash, stored_resp
            FROM idempotency_keys ik WHERE ik.key = r_keys[i];
            IF FOUND THEN
                IF stored_hash = r_hashes[i] THEN
                    outcomes[i] := 'replayed';
                    answered[i] := stored_resp;
                ELSE
                    outcomes[i] := 'key_reused';
                END IF;
            END IF;
        END IF;
    END LOOP;

    -- Lock (creating at version 0) the streams the rest may write, in
    -- byte order; the no-op update returns their versions.
    WITH locked AS (
        INSERT INTO streams (stream_id, version)
        SELECT d.s, 0 FROM (
            SELECT DISTINCT r_streams[g.i] AS s FROM generate_subscripts(r_streams, 1) AS g(i)
            WHERE outcomes[g.i] IS NULL
        ) d ORDER BY d.s COLLATE "C"
        ON CONFLICT (stream_id) DO UPDATE SET version = streams.version
        RETURNING streams.stream_id, streams.version
    )
    SELECT array_agg(p.pos), array_agg(l.version) INTO l_pos, l_ver
    FROM locked l JOIN unnest(s_ids) WITH ORDINALITY AS p(s, pos) ON p.s = l.stream_id;
    FOR j IN 1..coalesce(array_length(l_pos, 1), 0) LOOP
        s_ver[l_pos[j]] := l_ver[j];
    END LOOP;

    FOR i IN 1..n LOOP
        CONTINUE WHEN outcomes[i] IS NOT NULL;
        IF k_of[i] IS NOT NULL AND k_first[k_of[i]] IS NOT NULL THEN
            -- The same key earlier in this batch: its answer, if the same
            -- request.
            IF r_hashes[k_first[k_of[i]]] = r_hashes[i] THEN
                first_of[i] := k_first[k_of[i]];
                outcomes[i] := 'same';
            ELSE
                outcomes[i] := 'key_reused';
            END IF;
            CONTINUE;
        END IF;
        cur := coalesce(s_ver[s_of[i]], 0);
        IF NOT (r_expected[i] = -1 OR (r_expected[i] = -2 AND cur = 0) OR r_expected[i] = cur) THEN
            outcomes[i] := 'conflict';
            actuals[i] := cur;
            CONTINUE;
        END IF;
        s_ver[s_of[i]] := cur + r_counts[i];
        outcomes[i] := 'appended';
        IF k_of[i] IS NOT NULL THEN
            k_first[k_of[i]] := i;
        END IF;
        q_idx := q_idx || i;
        q_first := q_first || (cur + 1);
        q_last := q_last || (cur + r_counts[i]);
    END LOOP;
    IF array_length(q_idx, 1) > 0 THEN
        -- Positions are drawn in request order and, within a stream, in
        -- version order: the projector's (tx_id, position) order is then
        -- the stream order.
        -- nextval runs after the sort (a volatile select-list entry the
        -- ORDER BY does not need is evaluated after it).
        FOR rec IN
            WITH inserted AS (
                INSERT INTO events (position, stream_id, stream_version, event_type, data, metadata)
                SELECT nextval('events_position_seq'), r_streams[q.i], q.f + g.j - 1,
                       e_types[offsets[q.i] + g.j], e_data[offsets[q.i] + g.j],
                       e_metadata[offsets[q.i] + g.j]
                FROM unnest(q_idx, q_first) WITH ORDINALITY AS q(i, f, ord),
                     generate_series(1, r_counts[q.i]) AS g(j)
                ORDER BY q.ord, g.j
                RETURNING events.stream_id, events.stream_version, events.position
            )
            SELECT q.i, r_streams[q.i] AS stream, q.l AS version,
                   array_agg(ins.position ORDER BY ins.stream_version) AS positions
            FROM unnest(q_idx, q_first, q_last) AS q(i, f, l)
            JOIN inserted ins ON ins.stream_id = r_streams[q.i]
                             AND ins.stream_version BETWEEN q.f AND q.l
            GROUP BY q.i, q.l
        LOOP
            answered[rec.i] := jsonb_build_object(
                'streamId', rec.stream,
                'version', rec.version,
                'positions', to_jsonb(rec.positions),
                'token', tx::text || '.' || rec.positions[array_length(rec.positions, 1)]::text
            );
        END LOOP;

        UPDATE streams SET version = v.version, updated_at = now()
        FROM unnest(s_ids, s_ver) AS v(stream_id, version)
        WHERE streams.stream_id = v.stream_id AND v.version IS NOT NULL
          AND streams.version <> v.version;

        INSERT INTO idempotency_keys (key, request_hash, response)
        SELECT r_keys[u.i], r_hashes[u.i], answered[u.i]
        FROM unnest(q_idx) AS u(i) WHERE r_keys[u.i] IS NOT NULL;
    END IF;

    FOR i IN 1..n LOOP
        IF outcomes[i] = 'same' THEN
            answered[i] := answered[first_of[i]];
            outcomes[i] := 'appended';
        END IF;
        idx := i;
        outcome := outcomes[i];
        actual_version := actuals[i];
        response := answered[i];
        RETURN NEXT;
    END LOOP;
END;
$$;
