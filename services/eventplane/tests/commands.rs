//! The command service against real Postgres: optimistic concurrency, group
//! commit isolation, idempotency, async jobs and bad input.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_appends_with_one_expected_version_yield_one_winner() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let (status, _) = append(
        &http,
        &stack,
        "race-1",
        json!("no_stream"),
        vec![placed("race-1", "c", "1")],
    )
    .await;
    assert_eq!(status, 201);

    let attempts = (0..50).map(|i| {
        let http = http.clone();
        let url = stack.url("/v1/streams/race-1/events");
        async move {
            let body = json!({"expectedVersion": 1, "events": [{"type": "OrderPaid", "data": {"orderId": "race-1", "n": i}}]});
            let response = http.post(url).json(&body).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    });
    let results = futures::future::join_all(attempts).await;
    let created: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b)
        .collect();
    let conflicts: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 409)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(created.len(), 1, "exactly one append wins: {results:?}");
    assert_eq!(conflicts.len(), 49);
    assert_eq!(created[0]["version"], 2);
    for body in conflicts {
        assert_eq!(body["error"]["code"], "version_conflict");
        assert_eq!(
            body["error"]["actualVersion"], 2,
            "a loser sees the winner's version"
        );
    }
    let pool = db.pool().await;
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT stream_version FROM events WHERE stream_id = 'race-1' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2], "no duplicate versions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicting_appends_do_not_fail_clean_neighbours_in_a_batch() {
    let db = TestDb::new().await;
    let mut config = local(&db.url, None, orders());
    // One committer with a wait window: concurrent requests share batches.
    config.command.group_commit.writers = 1;
    config.command.group_commit.max_wait = Duration::from_millis(20);
    let stack = stack_with(config).await;
    let http = client();
    for i in 0..10 {
        let (status, _) = append(
            &http,
            &stack,
            &format!("pre-{i}"),
            json!("no_stream"),
            vec![placed("x", "c", "1")],
        )
        .await;
        assert_eq!(status, 201);
    }
    // Even streams: a stale expected version (conflict); odd: correct.
    let requests = (0..10).map(|i| {
        let http = http.clone();
        let url = stack.url(&format!("/v1/streams/pre-{i}/events"));
        let expected = if i % 2 == 0 { 7 } else { 1 };
        async move {
            let body =
                json!({"expectedVersion": expected, "events": [{"type": "Noted", "data": {}}]});
            http.post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = futures::future::join_all(requests).await;
    for (i, status) in statuses.iter().enumerate() {
        let want = if i % 2 == 0 { 409 } else { 201 };
        assert_eq!(*status, want, "stream pre-{i}");
    }
    let pool = db.pool().await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM events WHERE event_type = 'Noted'"
        )
        .await,
        5
    );
    // The ten requests really shared transactions.
    let text = stack.metrics.encode();
    let metric = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let (appends, batches) = (
        metric("command_batch_size_sum "),
        metric("command_batch_size_count "),
    );
    assert!(appends > batches, "{appends} appends in {batches} batches");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appended_events_get_versions_positions_and_a_token_in_order() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let events = vec![
        placed("o-1", "c", "5"),
        json!({"type": "OrderPaid", "data": {"orderId": "o-1"}}),
    ];
    let (status, body) = append(&http, &stack, "order-o-1", json!("no_stream"), events).await;
    assert_eq!(status, 201);
    assert_eq!(body["version"], 2);
    let positions: Vec<i64> = serde_json::from_value(body["positions"].clone()).unwrap();
    assert_eq!(positions.len(), 2);
    assert!(
        positions[0] < positions[1],
        "positions follow version order"
    );
    assert!(
        body["token"]
            .as_str()
            .unwrap()
            .ends_with(&format!(".{}", positions[1]))
    );

    let (status, page, _) = get(&http, &stack, "/v1/streams/order-o-1?limit=1").await;
    assert_eq!(status, 200);
    assert_eq!(page["version"], 2);
    assert_eq!(page["events"][0]["type"], "OrderPlaced");
    assert_eq!(page["next"], 2);
    let (_, page, _) = get(&http, &stack, "/v1/streams/order-o-1?from=2").await;
    assert_eq!(page["events"][0]["type"], "OrderPaid");
    assert!(page.get("next").is_none());
    let (status, body, _) = get(&http, &stack, "/v1/streams/nothing-here").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "stream_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_replays_the_first_result_and_writes_nothing() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let body = json!({"expectedVersion": "any", "events": [placed("i-1", "c", "3")]});
    let send = |body: Value, key: &'static str| {
        let http = http.clone();
        let url = stack.url("/v1/streams/idem-1/events");
        async move {
            let response = http
                .post(url)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (s1, first) = send(body.clone(), "key-1").await;
    // Concurrent retries with the same key: all see the first answer.
    let retries = futures::future::join_all((0..5).map(|_| send(body.clone(), "key-1"))).await;
    assert_eq!(s1, 201);
    for (status, again) in retries {
        assert_eq!(status, 201);
        assert_eq!(again, first);
    }
    let other = json!({"expectedVersion": "any", "events": [placed("i-2", "c", "3")]});
    let (status, error) = send(other, "key-1").await;
    assert_eq!(status, 422);
    assert_eq!(error["error"]["code"], "idempotency_key_reused");
    let pool = db.pool().await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM events WHERE stream_id = 'idem-1'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_clear_error_and_writes_nothing() {
    let db = TestDb::new().await;
    let mut config = local(&db.url, None, orders());
    config.command.max_body_bytes = 4096;
    let stack = stack_with(config).await;
    let http = client();
    let url = |stream: &str| stack.url(&format!("/v1/streams/{stream}/events"));
    let big = "x".repeat(8192);
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        ("malformed JSON", url("s-1"), "{\"expectedVersion\": ".into(), 400, "malformed_json"),
        ("unknown field", url("s-1"), json!({"expectedVersion": "any", "events": [], "x": 1}).to_string(), 422, "invalid_body"),
        ("unknown event field", url("s-1"), json!({"expectedVersion": "any", "events": [{"type": "A", "data": {}, "extra": 1}]}).to_string(), 422, "invalid_body"),
        ("bad expected version", url("s-1"), json!({"expectedVersion": "latest", "events": [{"type": "A", "data": {}}]}).to_string(), 422, "invalid_body"),
        ("negative expected version", url("s-1"), json!({"expectedVersion": -2, "events": [{"type": "A", "data": {}}]}).to_string(), 422, "invalid_expected_version"),
        ("empty event list", url("s-1"), json!({"expectedVersion": "any", "events": []}).to_string(), 422, "no_events"),
        ("bad event type", url("s-1"), json!({"expectedVersion": "any", "events": [{"type": "drop table;", "data": {}}]}).to_string(), 422, "invalid_event_type"),
        ("bad metadata", url("s-1"), json!({"expectedVersion": "any", "events": [{"type": "A", "data": {}, "metadata": [1]}]}).to_string(), 422, "invalid_metadata"),
        ("bad stream id", url("bad%20stream"), json!({"expectedVersion": "any", "events": [{"type": "A", "data": {}}]}).to_string(), 400, "invalid_stream_id"),
        ("body over the limit", url("s-1"), json!({"expectedVersion": "any", "events": [{"type": "A", "data": {"pad": big}}]}).to_string(), 413, "payload_too_large"),
    ];
    for (name, url, body, status, code) in cases {
        let response = http
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{name}");
        let error: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{name}: body is not JSON: {e}"));
        assert_eq!(error["error"]["code"], code, "{name}: {error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
    for content_type in [None, Some("text/plain")] {
        let mut request = http.post(url("s-1")).body("{}");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            415,
            "content type {content_type:?}"
        );
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "unsupported_media_type");
    }
    let response = http
        .post(url("s-1"))
        .header("Prefer", "respond-async")
        .header("Eventplane-Priority", "urgent")
        .json(&json!({"expectedVersion": "any", "events": [{"type": "A", "data": {}}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400, "bad priority");
    let pool = db.pool().await;
    assert_eq!(count(&pool, "SELECT count(*) FROM events").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM command_jobs").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_jobs_survive_a_restart_and_run_in_priority_order() {
    let db = TestDb::new().await;
    let mut config = local(&db.url, None, orders());
    config.command.job_workers = 0;
    let stack = stack_with(config.clone()).await;
    let http = client();
    let mut jobs = Vec::new();
    for (i, priority) in ["low", "normal", "high", "low", "high", "normal"]
        .iter()
        .enumerate()
    {
        let response = http
            .post(stack.url(&format!("/v1/streams/job-{i}/events")))
            .header("Prefer", "respond-async")
            .header("Eventplane-Priority", *priority)
            .json(&json!({"expectedVersion": "no_stream", "events": [placed(&format!("j{i}"), "c", "1")]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        let location = response.headers()["location"].to_str().unwrap().to_string();
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            location,
            format!("/v1/jobs/{}", body["jobId"].as_str().unwrap())
        );
        assert_eq!(body["status"], "pending");
        jobs.push((priority.to_string(), location));
    }
    let (_, pending, _) = get(&http, &stack, &jobs[0].1).await;
    assert_eq!(pending["status"], "pending");
    // Restart: the process goes away with the jobs only in the database.
    drop(stack);
    config.command.job_workers = 1;
    let stack = stack_with(config).await;
    let http = client();
    let all_done = eventually(Duration::from_secs(20), || {
        let (http, stack, jobs) = (&http, &stack, &jobs);
        async move {
            for (_, location) in jobs {
                if get(http, stack, location).await.1["status"] != "succeeded" {
                    return false;
                }
            }
            true
        }
    })
    .await;
    assert!(all_done, "every accepted job ran after the restart");
    let (_, done, _) = get(&http, &stack, &jobs[2].1).await;
    assert_eq!(done["result"]["version"], 1);
    let pool = db.pool().await;
    let order: Vec<i16> =
        sqlx::query_scalar("SELECT priority FROM command_jobs ORDER BY finished_at")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(order, vec![0, 0, 1, 1, 2, 2], "high, then normal, then low");
    assert_eq!(count(&pool, "SELECT count(*) FROM events").await, 6);
    let (status, _, _) = get(&http, &stack, "/v1/jobs/not-a-uuid").await;
    assert_eq!(status, 400);
    let (status, _, _) = get(&http, &stack, &format!("/v1/jobs/{}", uuid::Uuid::nil())).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_async_job_reports_its_error() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let (status, _) = append(
        &http,
        &stack,
        "jf-1",
        json!("no_stream"),
        vec![placed("jf", "c", "1")],
    )
    .await;
    assert_eq!(status, 201);
    let response = http
        .post(stack.url("/v1/streams/jf-1/events"))
        .header("Prefer", "respond-async")
        .json(&json!({"expectedVersion": "no_stream", "events": [placed("jf", "c", "1")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let failed = eventually(Duration::from_secs(10), || {
        let (http, stack, location) = (&http, &stack, &location);
        async move { get(http, stack, location).await.1["status"] == "failed" }
    })
    .await;
    assert!(failed);
    let (_, job, _) = get(&http, &stack, &location).await;
    assert_eq!(job["error"]["error"]["code"], "version_conflict");
    let streams: HashSet<String> = sqlx::query_scalar("SELECT stream_id FROM events")
        .fetch_all(&db.pool().await)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(streams.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_the_seed_names_and_pool_usage() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let (status, _) = append(
        &http,
        &stack,
        "m-1",
        json!("no_stream"),
        vec![placed("m1", "c", "1")],
    )
    .await;
    assert_eq!(status, 201);
    get(&http, &stack, "/v1/projections/orders/rows/m1").await;
    let text = http
        .get(stack.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        "command_latency_bucket{le=",
        "command_type=\"append\"",
        "query_latency_count{query_type=\"row\"}",
        "cache_hit_rate{cache_layer=\"l1\"}",
        "db_pool_connections{pool=\"primary\",state=\"idle\"}",
        "command_batch_size_count",
    ] {
        assert!(
            text.contains(expected),
            "/metrics lacks {expected}:\n{text}"
        );
    }
}

/// One batch, composed exactly, through the store's `append`: each
/// request's outcome is its own, in request order, whatever its
/// neighbours do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_answers_each_request_on_its_own() {
    use eventplane_store::events::model::NamedVersion;
    use eventplane_store::events::{AppendError, AppendRequest, ExpectedVersion, NewEvent, append};

    let db = TestDb::new().await;
    let pool = db.pool().await;
    eventplane_store::db::migrate(&pool).await.unwrap();
    let request =
        |stream: &str, expected: ExpectedVersion, events: usize, key: Option<&str>| AppendRequest {
            stream_id: stream.into(),
            expected_version: expected,
            events: (0..events)
                .map(|n| NewEvent::new("Noted", &json!({"n": n, "stream": stream})))
                .collect(),
            idempotency_key: key.map(str::to_string),
            traceparent: None,
        };
    let any = || ExpectedVersion::Named(NamedVersion::Any);
    let fresh = || ExpectedVersion::Named(NamedVersion::NoStream);
    let first = [
        request("b-1", fresh(), 2, None),
        request("b-2", any(), 1, Some("k-a")),
        // The same key and request again in the batch: the same answer.
        request("b-2", any(), 1, Some("k-a")),
        // The same key for another request: refused.
        request("b-3", any(), 1, Some("k-a")),
        // b-1 is at 2 by now within the batch.
        request("b-1", ExpectedVersion::Exact(2), 1, None),
        request("b-1", ExpectedVersion::Exact(2), 1, None),
        request("b-1", fresh(), 1, None),
    ];
    let refs: Vec<&AppendRequest> = first.iter().collect();
    let outcomes = append(&pool, &refs).await.unwrap();
    assert_eq!(outcomes.len(), first.len());
    let ok = |i: usize| {
        outcomes[i]
            .clone()
            .unwrap_or_else(|e| panic!("request {i}: {e}"))
    };
    assert_eq!((ok(0).stream_id.as_str(), ok(0).version), ("b-1", 2));
    assert_eq!(ok(0).positions.len(), 2);
    assert_eq!(ok(1).version, 1);
    assert_eq!(
        ok(2),
        ok(1),
        "a repeated key in one batch gets the first answer"
    );
    assert_eq!(
        outcomes[3],
        Err(AppendError::IdempotencyMismatch("k-a".into()))
    );
    assert_eq!(ok(4).version, 3);
    assert_eq!(
        outcomes[5],
        Err(AppendError::Conflict {
            expected: ExpectedVersion::Exact(2),
            actual: 3
        })
    );
    assert_eq!(
        outcomes[6],
        Err(AppendError::Conflict {
            expected: fresh(),
            actual: 3
        })
    );
    // Positions rise in request order, and a token names the last one.
    let positions: Vec<i64> = [0, 1, 4].iter().flat_map(|&i| ok(i).positions).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    for i in [0, 1, 4] {
        let token: eventplane_store::Token = ok(i).token.parse().unwrap();
        assert_eq!(Some(&token.position), ok(i).positions.last());
    }

    // The next batch: the stored key answers with the stored result, and
    // a batch without keys writes what it says.
    let second = [
        request("b-2", any(), 1, Some("k-a")),
        request("b-3", any(), 1, Some("k-a")),
        request("b-4", fresh(), 1, None),
    ];
    let refs: Vec<&AppendRequest> = second.iter().collect();
    let again = append(&pool, &refs).await.unwrap();
    assert_eq!(again[0].clone().unwrap(), ok(1));
    assert_eq!(
        again[1],
        Err(AppendError::IdempotencyMismatch("k-a".into()))
    );
    assert_eq!(again[2].clone().unwrap().version, 1);

    let pairs = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, i64)>(sql)
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    let owned = |pairs: &[(&str, i64)]| -> Vec<(String, i64)> {
        pairs.iter().map(|(s, v)| (s.to_string(), *v)).collect()
    };
    // b-3 was locked and refused: its row stays at version 0.
    assert_eq!(
        pairs("SELECT stream_id, version FROM streams ORDER BY stream_id").await,
        owned(&[("b-1", 3), ("b-2", 1), ("b-3", 0), ("b-4", 1)])
    );
    assert_eq!(
        pairs("SELECT stream_id, stream_version FROM events ORDER BY position").await,
        owned(&[("b-1", 1), ("b-1", 2), ("b-2", 1), ("b-1", 3), ("b-4", 1)])
    );
}

/// Two transactions create one stream at once: the first to commit wins,
/// and the other waits for its row and is answered with a conflict at the
/// winner's version, never a second version 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_by_another_transaction_meanwhile_is_a_conflict_not_a_duplicate() {
    use eventplane_store::events::group_commit::commit_with_retry;
    use eventplane_store::events::model::NamedVersion;
    use eventplane_store::events::{AppendError, AppendRequest, ExpectedVersion, NewEvent, append};

    let db = TestDb::new().await;
    let pool = db.pool().await;
    eventplane_store::db::migrate(&pool).await.unwrap();
    let create = |n: i64| AppendRequest {
        stream_id: "born-twice".into(),
        expected_version: ExpectedVersion::Named(NamedVersion::NoStream),
        events: vec![NewEvent::new("Born", &json!({"n": n}))],
        idempotency_key: None,
        traceparent: None,
    };
    let (first, second) = (create(1), create(2));
    let mut tx = pool.begin().await.unwrap();
    let won = append(&mut *tx, &[&first]).await.unwrap();
    assert_eq!(won[0].clone().unwrap().version, 1);
    // The second looks while the first is still open: no stream yet.
    let racer = tokio::spawn({
        let pool = pool.clone();
        async move { commit_with_retry(&pool, &[&second]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!racer.is_finished(), "the second waits for the first's row");
    tx.commit().await.unwrap();
    let lost = racer.await.unwrap().unwrap();
    assert_eq!(
        lost[0],
        Err(AppendError::Conflict {
            expected: ExpectedVersion::Named(NamedVersion::NoStream),
            actual: 1
        })
    );
    let stored: Vec<(i64, Value)> = sqlx::query_as(
        "SELECT stream_version, data FROM events WHERE stream_id = 'born-twice' ORDER BY position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(stored, vec![(1, json!({"n": 1}))]);
}
