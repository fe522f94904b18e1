-- eventplane_append writes each stream row once per batch. Before, it locked
-- every stream by an upsert that wrote a new row version (a new stream was
-- created at version 0) and then wrote the final version: two row versions
-- per append, one of them dead at once, for vacuum to clear. Now:
--   * existing streams are locked by SELECT ... FOR UPDATE, which writes no
--     row version, and get their final version by one update;
--   * a new stream is inserted once, at its final version. Whether a stream
--     is new is what the batch saw; if another transaction creates it
--     meanwhile, the insert finds it and the batch fails with
--     serialization_failure (40001), which the committer retries, now
--     seeing the stream;
--   * a request refused on a stream that does not exist leaves no row.
-- The contract of 0006 and 0010 holds otherwise: one statement per batch,
-- each request succeeding or failing on its own, idempotency keys locked
-- first, stream rows locked in byte order, the same answer columns.
CREATE OR REPLACE FUNCTION eventplane_append(
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
    version        bigint,
    positions      bigint[],
    tx             bigint,
    response       jsonb
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n            int := coalesce(array_length(r_streams, 1), 0);
    xact         bigint := pg_current_xact_id()::text::bigint;
    keyed        boolean := cardinality(array_remove(r_keys, NULL)) > 0;
    stored_hash  bytea;
    stored_resp  jsonb;
    -- The batch's streams in byte order, their versions as the batch moves
    -- them, whether each existed, and each request's index into them.
    s_ids        text[];
    s_ver        bigint[];
    s_old        boolean[];
    s_of         int[];
    k_of         int[];
    k_first      int[];
    answered     jsonb[] := array_fill(NULL::jsonb, ARRAY[greatest(n, 1)]);
    outcomes     text[] := array_fill(NULL::text, ARRAY[greatest(n, 1)]);
    actuals      bigint[] := array_fill(NULL::bigint, ARRAY[greatest(n, 1)]);
    versions     bigint[] := array_fill(NULL::bigint, ARRAY[greatest(n, 1)]);
    first_of     int[] := array_fill(NULL::int, ARRAY[greatest(n, 1)]);
    e_off        int[] := array_fill(0, ARRAY[greatest(n, 1)]);
    p_off        int[] := array_fill(NULL::int, ARRAY[greatest(n, 1)]);
    p_all        bigint[];
    drawn        int := 0;
    appended     int[] := '{}';
    cur          bigint;
    created      int;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    FOR i IN 2..n LOOP
        e_off[i] := e_off[i - 1] + r_counts[i - 1];
    END LOOP;

    IF keyed THEN
        SELECT array_agg(kg.grp ORDER BY g.i) INTO k_of
        FROM generate_subscripts(r_streams, 1) AS g(i)
        LEFT JOIN (SELECT d.key, row_number() OVER () AS grp
                   FROM (SELECT DISTINCT u.key FROM unnest(r_keys) AS u(key)
                         WHERE u.key IS NOT NULL) d) kg ON kg.key = r_keys[g.i];
        k_first := array_fill(NULL::int, ARRAY[n]);

        -- Requests that share a key take turns, across batches too.
        PERFORM pg_advisory_xact_lock(hashtextextended(d.key, 7340))
        FROM (SELECT DISTINCT u.key FROM unnest(r_keys) AS u(key)
              WHERE u.key IS NOT NULL) d
        ORDER BY d.key COLLATE "C";

        -- Requests answered by a stored key are settled before any stream
        -- lock.
        FOR i IN 1..n LOOP
            IF r_keys[i] IS NOT NULL THEN
                SELECT ik.request_hash, ik.response INTO stored_hash, stored_resp
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
    END IF;

    -- The streams the rest may write, in byte order; the existing ones are
    -- locked (in that order) and give their versions, the others start at 0.
    WITH wanted AS (
        SELECT DISTINCT r_streams[g.i] AS s FROM generate_subscripts(r_streams, 1) AS g(i)
        WHERE outcomes[g.i] IS NULL
    ), locked AS (
        SELECT st.stream_id, st.version FROM streams st
        WHERE st.stream_id = ANY (ARRAY(SELECT w.s FROM wanted w))
        ORDER BY st.stream_id COLLATE "C"
        FOR UPDATE
    ), ranked AS (
        SELECT w.s AS stream_id, coalesce(l.version, 0) AS version, l.stream_id IS NOT NULL AS old,
               row_number() OVER (ORDER BY w.s COLLATE "C") AS pos
        FROM wanted w LEFT JOIN locked l ON l.stream_id = w.s
    )
    SELECT (SELECT array_agg(r.stream_id ORDER BY r.pos) FROM ranked r),
           (SELECT array_agg(r.version ORDER BY r.pos) FROM ranked r),
           (SELECT array_agg(r.old ORDER BY r.pos) FROM ranked r),
           (SELECT array_agg(r.pos::int ORDER BY g.i)
            FROM generate_subscripts(r_streams, 1) AS g(i)
            LEFT JOIN ranked r ON r.stream_id = r_streams[g.i])
    INTO s_ids, s_ver, s_old, s_of;

    FOR i IN 1..n LOOP
        CONTINUE WHEN outcomes[i] IS NOT NULL;
        IF keyed AND k_of[i] IS NOT NULL AND k_first[k_of[i]] IS NOT NULL THEN
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
        cur := s_ver[s_of[i]];
        IF NOT (r_expected[i] = -1 OR (r_expected[i] = -2 AND cur = 0) OR r_expected[i] = cur) THEN
            outcomes[i] := 'conflict';
            actuals[i] := cur;
            CONTINUE;
        END IF;
        s_ver[s_of[i]] := cur + r_counts[i];
        versions[i] := cur + r_counts[i];
        outcomes[i] := 'appended';
        IF keyed AND k_of[i] IS NOT NULL THEN
            k_first[k_of[i]] := i;
        END IF;
        p_off[i] := drawn;
        drawn := drawn + r_counts[i];
        appended := appended || i;
    END LOOP;

    IF drawn > 0 THEN
        -- New streams, at their final versions. One another transaction
        -- created since this batch looked is not inserted: the batch's
        -- versions for it are wrong, so it is refused as a whole and tried
        -- again (the committer retries serialization failures).
        INSERT INTO streams AS st (stream_id, version)
        SELECT v.stream_id, v.version
        FROM unnest(s_ids, s_ver, s_old) AS v(stream_id, version, old)
        WHERE NOT v.old AND v.version > 0
        ON CONFLICT (stream_id) DO NOTHING;
        GET DIAGNOSTICS created = ROW_COUNT;
        IF created <> (SELECT count(*) FROM unnest(s_ver, s_old) AS v(version, old)
                       WHERE NOT v.old AND v.version > 0) THEN
            RAISE EXCEPTION 'a stream of the batch was created by another transaction meanwhile'
                USING ERRCODE = 'serialization_failure';
        END IF;

        -- Existing streams that moved. Written as an upsert so each row is
        -- found through the primary key whatever the table's size was when
        -- the plan was cached (an UPDATE ... FROM planned while `streams`
        -- was small kept hashing a full scan of it long after); every row
        -- exists and is locked, so this only updates.
        INSERT INTO streams AS st (stream_id, version)
        SELECT v.stream_id, v.version
        FROM unnest(s_ids, s_ver, s_old) AS v(stream_id, version, old)
        WHERE v.old
        ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, updated_at = now()
        WHERE st.version <> EXCLUDED.version;

        -- Positions in request order and, within a stream, in version
        -- order: the projector's (tx_id, position) order is then the
        -- stream order.
        SELECT array_agg(nextval('events_position_seq')) INTO p_all
        FROM generate_series(1, drawn);

        INSERT INTO events (position, stream_id, stream_version, event_type, data, metadata)
        SELECT p_all[p_off[a.i] + g.j], r_streams[a.i], versions[a.i] - r_counts[a.i] + g.j,
               e_types[e_off[a.i] + g.j], e_data[e_off[a.i] + g.j], e_metadata[e_off[a.i] + g.j]
        FROM unnest(appended) AS a(i), generate_series(1, r_counts[a.i]) AS g(j);

        IF keyed THEN
            INSERT INTO idempotency_keys (key, request_hash, response)
            SELECT r_keys[a.i], r_hashes[a.i], jsonb_build_object(
                       'streamId', r_streams[a.i],
                       'version', versions[a.i],
                       'positions', to_jsonb(p_all[p_off[a.i] + 1 : p_off[a.i] + r_counts[a.i]]),
                       'token', xact::text || '.' || p_all[p_off[a.i] + r_counts[a.i]]::text)
            FROM unnest(appended) AS a(i) WHERE r_keys[a.i] IS NOT NULL;
        END IF;
    END IF;

    RETURN QUERY
    SELECT g.i,
           CASE WHEN outcomes[g.i] = 'same' THEN 'appended' ELSE outcomes[g.i] END,
           actuals[g.i],
           versions[coalesce(first_of[g.i], g.i)],
           p_all[p_off[coalesce(first_of[g.i], g.i)] + 1
                 : p_off[coalesce(first_of[g.i], g.i)] + r_counts[coalesce(first_of[g.i], g.i)]],
           CASE WHEN versions[coalesce(first_of[g.i], g.i)] IS NOT NULL THEN xact END,
           answered[g.i]
    FROM generate_subscripts(r_streams, 1) AS g(i)
    ORDER BY g.i;
END;
$$;
