//! One bad request never fails another, and no request waits without
//! bound: poisoned payloads among concurrent clean appends, the group
//! commit's one-by-one retry for a value only Postgres refuses, and 503s
//! within the deadline when a lock is held or the pool is exhausted, with
//! nothing half-written.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use eventplane::server::Roles;
use eventplane_store::events::group_commit::SubmitError;
use eventplane_store::events::notify::CommitSignal;
use eventplane_store::events::{AppendRequest, Appender, ExpectedVersion, GroupCommitConfig};
use serde_json::{Value, json};

/// The raw bodies of appends Postgres (or the JSON parser) must refuse, and
/// the code each gets.
fn poisons(n: usize) -> Vec<(String, &'static str)> {
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    vec![
        (
            format!(
                r#"{{"expectedVersion":"no_stream","events":[{{"type":"OrderPlaced","data":{{"orderId":"p{n}","note":"a\u0000b"}}}}]}}"#
            ),
            "unstorable_value",
        ),
        (
            format!(
                r#"{{"expectedVersion":"no_stream","events":[{{"type":"OrderPlaced","data":{{"orderId":"p{n}","k\u0000":1}}}}]}}"#
            ),
            "unstorable_value",
        ),
        (
            format!(
                r#"{{"expectedVersion":"no_stream","events":[{{"type":"OrderPlaced","data":{{"orderId":"p{n}"}},"metadata":{{"by":"\u0000"}}}}]}}"#
            ),
            "unstorable_value",
        ),
        (
            format!(
                r#"{{"expectedVersion":"no_stream","events":[{{"type":"OrderPlaced","data":{{"orderId":"p{n}","s":"\ud800"}}}}]}}"#
            ),
            "malformed_json",
        ),
        (
            format!(
                r#"{{"expectedVersion":"no_stream","events":[{{"type":"OrderPlaced","data":{{"orderId":"p{n}","deep":{deep}}}}}]}}"#
            ),
            "malformed_json",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poisoned_appends_fail_alone_among_concurrent_clean_ones() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let url = stack.url("");
    let mut clients = Vec::new();
    for client_no in 0..32 {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let http = client();
            let mut results = Vec::new();
            for i in 0..10 {
                let n = client_no * 10 + i;
                let (body, expected_code) = if i == 3 {
                    let all = poisons(n);
                    let (body, code) = all[n % all.len()].clone();
                    (body, Some(code))
                } else {
                    let clean = json!({"expectedVersion": "no_stream", "events": [placed(&format!("k{n}"), "c", "1")]});
                    (clean.to_string(), None)
                };
                let asynchronous = n % 7 == 0;
                let mut request = http
                    .post(format!("{url}/v1/streams/order-{n}/events"))
                    .header("content-type", "application/json")
                    .body(body);
                if asynchronous {
                    request = request.header("Prefer", "respond-async");
                }
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                results.push((n, asynchronous, expected_code, status, answer));
            }
            results
        }));
    }
    let mut clean = 0;
    for client in clients {
        for (n, asynchronous, expected_code, status, answer) in client.await.unwrap() {
            match expected_code {
                None => {
                    let ok = if asynchronous { 202 } else { 201 };
                    assert_eq!(status, ok, "clean append {n}: {answer}");
                    clean += 1;
                }
                Some(code) => {
                    assert!(
                        (400..500).contains(&status),
                        "poisoned append {n}: {status} {answer}"
                    );
                    assert_eq!(
                        answer["error"]["code"], code,
                        "poisoned append {n}: {answer}"
                    );
                }
            }
        }
    }
    assert_eq!(clean, 320 - 32);
    let pool = db.pool().await;
    let stored = eventually(Duration::from_secs(10), || async {
        count(&pool, "SELECT count(*) FROM events").await == 288
    })
    .await;
    assert!(stored, "every clean append is stored, async ones included");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM events WHERE stream_id IN (SELECT 'order-' || (c * 10 + 3) FROM generate_series(0, 31) c)").await,
        0,
        "nothing of a poisoned append is stored"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM command_jobs WHERE status <> 'succeeded'"
        )
        .await,
        0
    );
}

fn request(stream: &str, data: Value) -> AppendRequest {
    AppendRequest {
        stream_id: stream.into(),
        expected_version: ExpectedVersion::Exact(0),
        events: serde_json::from_value(json!([{"type": "OrderPlaced", "data": data}])).unwrap(),
        idempotency_key: None,
        traceparent: None,
    }
}

/// Below the HTTP edge's validation: a batch that Postgres refuses as a
/// whole is appended again one request at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_postgres_refuses_is_retried_request_by_request() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    eventplane_store::db::migrate(&pool).await.unwrap();
    let (signal, _notifier) = CommitSignal::start(pool.clone());
    let config = GroupCommitConfig {
        writers: 1,
        max_wait: Duration::from_millis(50),
        ..GroupCommitConfig::default()
    };
    let batch_sizes = eventplane::metrics::Metrics::new()
        .command_batch_size
        .clone();
    let (appender, _committers) = Appender::start(pool.clone(), config, batch_sizes, signal);
    let mut sent = Vec::new();
    for n in 0..20 {
        let data = if n % 5 == 2 {
            json!({"orderId": format!("b{n}"), "bad": "\u{0}"})
        } else {
            json!({"orderId": format!("b{n}")})
        };
        let appender = appender.clone();
        sent.push(tokio::spawn(async move {
            (
                n,
                appender.append(request(&format!("order-b{n}"), data)).await,
            )
        }));
    }
    for handle in sent {
        let (n, answer) = handle.await.unwrap();
        if n % 5 == 2 {
            assert!(
                matches!(answer, Err(SubmitError::Unstorable(_))),
                "{n}: {answer:?}"
            );
        } else {
            assert!(matches!(answer, Ok(Ok(_))), "{n}: {answer:?}");
        }
    }
    assert_eq!(count(&pool, "SELECT count(*) FROM events").await, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_lock_or_an_exhausted_pool_answers_503_in_time_and_writes_nothing() {
    let db = TestDb::new().await;
    let mut config = local(&db.url, None, Vec::new());
    config.roles = Roles {
        command: true,
        projector: false,
        query: false,
    };
    config.command.append_timeout = Duration::from_millis(500);
    config.command.group_commit.deadline = Duration::from_millis(500);
    // One connection listens for job notifications; the committers share
    // the other two, so some of them wait for a lock and the rest for a
    // connection.
    config.db_max_connections = 3;
    config.acquire_timeout = Duration::from_millis(200);
    let stack = Arc::new(stack_with(config).await);
    let http = client();
    let pool = db.pool().await;

    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE streams IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let started = Instant::now();
    let mut waiting = Vec::new();
    for n in 0..6 {
        let (http, stack) = (http.clone(), stack.clone());
        waiting.push(tokio::spawn(async move {
            let response = http
                .post(stack.url(&format!("/v1/streams/order-l{n}/events")))
                .json(&json!({"expectedVersion": "no_stream", "events": [placed(&format!("l{n}"), "c", "1")]}))
                .send()
                .await
                .unwrap();
            let retry_after = response.headers().get("retry-after").cloned();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, retry_after, body, started.elapsed())
        }));
    }
    for handle in waiting {
        let (status, retry_after, body, took) = handle.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "database_busy", "{body}");
        assert!(retry_after.is_some());
        assert!(
            took < Duration::from_secs(3),
            "answered after {took:?}, the deadline is 500 ms and the acquire timeout 200 ms"
        );
    }
    lock.rollback().await.unwrap();
    assert_eq!(
        count(&pool, "SELECT count(*) FROM events").await,
        0,
        "nothing half-written"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM streams WHERE version > 0").await,
        0
    );
    let (status, _) = append(
        &http,
        &stack,
        "order-after",
        json!("no_stream"),
        vec![placed("after", "c", "1")],
    )
    .await;
    assert_eq!(status, 201, "appends go through once the lock is gone");
}
