//! The query service reading from a real streaming replica (started by
//! `tests/ensure-replica.sh`, applying WAL 50 ms late): read-your-writes
//! through it, its lag on the status endpoint, and what happens when it is
//! out of reach, with and without fallback to the primary.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn reads_with_a_token_through_a_delayed_replica_always_see_the_write() {
    let db = TestDb::new().await;
    let mut config = local(&db.url, None, orders());
    let stack_start = stack_with(config.clone()).await;
    // Migrations ran on the primary; the replica has them once it shows
    // the database.
    drop(stack_start);
    config.read_database_url = Some(db.on_replica().await);
    let stack = stack_with(config).await;
    let http = client();

    let mut stale_without_token = 0;
    for i in 0..40 {
        let (status, body) = append(
            &http,
            &stack,
            &format!("order-y{i}"),
            json!("no_stream"),
            vec![placed(&format!("y{i}"), "c1", "7.50")],
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let token = body["token"].as_str().unwrap();
        // Without the token the replica, 50 ms behind, usually has nothing.
        let (plain, _, _) = get(&http, &stack, &format!("/v1/projections/orders/rows/y{i}")).await;
        if plain == 404 {
            stale_without_token += 1;
        }
        let (status, row, _) = get(
            &http,
            &stack,
            &format!("/v1/projections/orders/rows/y{i}?token={token}"),
        )
        .await;
        assert_eq!(status, 200, "read {i} with its token: {row}");
        assert_eq!(row["id"], format!("y{i}"));
        assert_eq!(row["total"], json!(7.50));
    }
    assert!(
        stale_without_token > 0,
        "the replica really trails the primary (else this test shows nothing)"
    );

    // The status endpoint says where reads go and how far behind it is.
    let (_, status, _) = get(&http, &stack, "/v1/projections/orders/status").await;
    let replica = &status["readReplica"];
    assert_eq!(replica["up"], true, "{status}");
    assert_eq!(replica["replica"], true, "{status}");
    assert!(replica["lagSeconds"].as_f64().is_some(), "{status}");
    let metrics = reqwest::get(stack.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("replica_lag_seconds"), "{metrics}");
    assert!(metrics.contains("replica_up 1"), "{metrics}");
}

/// A read database that refuses connections, as a replica that is down.
fn unreachable_url(db: &TestDb) -> String {
    let port = free_port();
    format!("postgres://postgres@127.0.0.1:{port}/{}", db.name)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_is_down_fails_reads_unless_fallback_is_on() {
    let db = TestDb::new().await;
    let http = client();
    let mut config = local(&db.url, None, orders());
    config.acquire_timeout = Duration::from_millis(500);
    config.read_database_url = Some(unreachable_url(&db));

    // Off by default: the primary takes no reads; the client is told to retry.
    let strict = stack_with(config.clone()).await;
    let (status, body) = append(
        &http,
        &strict,
        "order-f1",
        json!("no_stream"),
        vec![placed("f1", "c1", "1")],
    )
    .await;
    assert_eq!(status, 201, "appends do not need the replica: {body}");
    let (status, body, _) = get(&http, &strict, "/v1/projections/orders/rows/f1").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "database_busy", "{body}");
    drop(strict);

    // With fallback: the same read is answered by the primary and counted.
    config.query.replica.fallback = true;
    let lenient = stack_with(config).await;
    let pool = db.pool().await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);
    for _ in 0..3 {
        let (status, row, _) = get(&http, &lenient, "/v1/projections/orders/rows/f1").await;
        assert_eq!(status, 200, "{row}");
        assert_eq!(row["id"], "f1");
    }
    let (_, status, _) = get(&http, &lenient, "/v1/projections/orders/status").await;
    assert_eq!(status["readReplica"]["up"], false, "{status}");
    let metrics = reqwest::get(lenient.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let fallbacks: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("replica_fallback_reads_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("replica_fallback_reads_total exported");
    assert!(fallbacks >= 3.0, "{metrics}");
}
