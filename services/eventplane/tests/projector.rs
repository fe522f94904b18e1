//! The projector against real Postgres: gap safety under the xid8 horizon,
//! crash recovery (tasks aborted, and a real process killed with SIGKILL)
//! and the dead-letter / halt policies.

mod common;

use std::time::Duration;

use common::*;
use eventplane::server::Roles;
use eventplane_api::ProjectionManifest;
use serde_json::{Value, json};
use sqlx::PgPool;

fn variant(name: &str, table: &str, extra: &str) -> ProjectionManifest {
    let yaml = eventplane::dev::ORDERS_MANIFEST
        .replace("name: orders", &format!("name: {name}"))
        .replace("table: orders", &format!("table: {table}"))
        .replace("spec:\n", &format!("spec:\n{extra}"));
    eventplane_api::load_manifests(&yaml)
        .expect("variant is valid")
        .remove(0)
}

async fn row_exists(pool: &PgPool, table: &str, id: &str) -> bool {
    sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM {table} WHERE id = $1)"
    )))
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_that_commits_late_is_not_skipped() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let pool = db.pool().await;

    // Writer A takes an early position and an early transaction id, then
    // stays open while writer B commits a later event.
    let mut slow = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_type, data) \
         VALUES ('order-gap-a', 1, 'OrderPlaced', '{\"orderId\": \"gap-a\", \"customerId\": \"c\", \"total\": 1}')",
    )
    .execute(&mut *slow)
    .await
    .unwrap();
    let (status, _) = append(
        &http,
        &stack,
        "order-gap-b",
        json!("no_stream"),
        vec![placed("gap-b", "c", "2")],
    )
    .await;
    assert_eq!(status, 201);

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !row_exists(&pool, "orders", "gap-b").await,
        "B waits below the horizon while A is open"
    );
    slow.commit().await.unwrap();

    let both = eventually(Duration::from_secs(10), || {
        let pool = &pool;
        async move {
            row_exists(pool, "orders", "gap-a").await && row_exists(pool, "orders", "gap-b").await
        }
    })
    .await;
    assert!(
        both,
        "the late commit is applied, and so is the event after it"
    );
    let (_, status, _) = get(&http, &stack, "/v1/projections/orders/status").await;
    assert_eq!(status["eventsApplied"], 2);
    assert_eq!(status["lagEvents"], 0);
}

/// Appends a mixed workload: places, payments, shipments, cancellations and
/// re-placements on a small key space, plus some unmappable events.
async fn write_workload(stack: &eventplane::server::Stack, events: usize) {
    let http = client();
    let mut rng = Lcg(42);
    let mut batch: Vec<(String, Value)> = Vec::new();
    let flush = |batch: Vec<(String, Value)>| {
        let http = http.clone();
        async move {
            let sends = batch.into_iter().map(|(stream, event)| {
                let http = http.clone();
                async move { append(&http, stack, &stream, json!("any"), vec![event]).await }
            });
            let results = futures::future::join_all(sends).await;
            assert!(
                results.iter().all(|(s, _)| *s == 201),
                "workload appends succeed: {results:?}"
            );
        }
    };
    for _ in 0..events {
        let id = format!("w-{}", rng.next(150));
        let event = match rng.next(10) {
            0..=3 => {
                json!({"type": "OrderPlaced", "data": {"orderId": id, "customerId": format!("c-{}", rng.next(7)), "total": format!("{}.{}", rng.next(500), rng.next(100))}})
            }
            4 | 5 => json!({"type": "OrderPaid", "data": {"orderId": id}}),
            6 => json!({"type": "OrderShipped", "data": {"orderId": id}}),
            7 | 8 => json!({"type": "OrderCancelled", "data": {"orderId": id}}),
            _ => json!({"type": "OrderPaid", "data": {"order": id}}),
        };
        let stream = format!("order-{id}");
        // Appends to one stream stay in order: a stream appears at most once
        // per concurrent batch.
        if batch.len() == 32 || batch.iter().any(|(s, _)| *s == stream) {
            flush(std::mem::take(&mut batch)).await;
        }
        batch.push((stream, event));
    }
    flush(batch).await;
}

async fn assert_tables_equal(pool: &PgPool, a: &str, b: &str) {
    assert_eq!(differences(pool, a, b).await, 0, "{a} and {b} differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_aborted_between_and_inside_batches_loses_and_repeats_nothing() {
    let db = TestDb::new().await;
    let mut writer = local(&db.url, None, orders());
    writer.roles = Roles {
        command: true,
        projector: false,
        query: false,
    };
    let command = stack_with(writer).await;
    write_workload(&command, 1500).await;
    let pool = db.pool().await;

    let mut rng = Lcg(7);
    let mut config = local(&db.url, None, orders());
    config.roles = Roles {
        command: false,
        projector: true,
        query: false,
    };
    config.projector.batch_size = 25;
    for _ in 0..12 {
        let projector = stack_with(config.clone()).await;
        tokio::time::sleep(Duration::from_millis(5 + rng.next(60))).await;
        // Dropping the stack aborts its tasks wherever they are, as a crash would.
        drop(projector);
    }
    let projector = stack_with(config.clone()).await;
    assert!(eventually(Duration::from_secs(30), || caught_up(&pool, "orders")).await);
    drop(projector);

    // The reference: the same projection computed in one uninterrupted run.
    let mut reference = config.clone();
    reference.declare = vec![variant("orders-check", "orders_check", "")];
    let check = stack_with(reference).await;
    assert!(eventually(Duration::from_secs(30), || caught_up(&pool, "orders-check")).await);
    drop(check);
    assert_tables_equal(&pool, "orders", "orders_check").await;
    assert!(count(&pool, "SELECT count(*) FROM orders").await > 0);
    let dead: Vec<(String, i64)> = sqlx::query_as(
        "SELECT projection, count(*) FROM projection_dead_letters GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(
        dead[0].1, dead[1].1,
        "each unmappable event is dead-lettered exactly once per projection"
    );
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT applied FROM projection_checkpoints ORDER BY projection")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(applied[0], applied[1], "no event counted twice");
    assert_eq!(applied[0], 1500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_process_killed_mid_batch_recovers_exactly() {
    let db = TestDb::new().await;
    let mut writer = local(&db.url, None, orders());
    writer.roles = Roles {
        command: true,
        projector: false,
        query: false,
    };
    let command = stack_with(writer).await;
    write_workload(&command, 1200).await;
    let pool = db.pool().await;

    let manifest = std::env::temp_dir().join(format!("{}-orders.yaml", db.name));
    std::fs::write(&manifest, eventplane::dev::ORDERS_MANIFEST).unwrap();
    let mut rng = Lcg(11);
    let mut kills = 0;
    for _ in 0..8 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_eventplane"))
            .args([
                "projector",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--batch-size",
                "5",
                "--projections",
            ])
            .arg(&manifest)
            .env("DATABASE_URL", &db.url)
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "error")
            .spawn()
            .expect("projector starts");
        tokio::time::sleep(Duration::from_millis(150 + rng.next(250))).await;
        // SIGKILL: no destructor, no rollback from our side; Postgres
        // aborts whatever transaction the process had open.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        kills += 1;
        if caught_up(&pool, "orders").await {
            break;
        }
    }
    assert!(
        kills > 1,
        "the projector was killed while it still had work"
    );
    let mut config = local(
        &db.url,
        None,
        vec![variant("orders-check", "orders_check", "")],
    );
    config.roles = Roles {
        command: false,
        projector: true,
        query: false,
    };
    let check = stack_with(config.clone()).await;
    config.declare = orders();
    let finish = stack_with(config).await;
    assert!(eventually(Duration::from_secs(30), || caught_up(&pool, "orders")).await);
    assert!(eventually(Duration::from_secs(30), || caught_up(&pool, "orders-check")).await);
    drop((check, finish));
    assert_tables_equal(&pool, "orders", "orders_check").await;
    let _ = std::fs::remove_file(manifest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unmappable_events_go_to_dead_letters_or_halt_as_the_spec_says() {
    let db = TestDb::new().await;
    let halting = variant("orders-strict", "orders_strict", "  onError: halt\n");
    let config = local(&db.url, None, vec![orders().remove(0), halting]);
    let stack = stack_with(config).await;
    let http = client();
    let (s1, _) = append(
        &http,
        &stack,
        "order-d1",
        json!("no_stream"),
        vec![placed("d1", "c", "1")],
    )
    .await;
    let bad = json!({"type": "OrderPlaced", "data": {"orderId": "d2", "customerId": "c", "total": "not a number"}});
    let (s2, _) = append(&http, &stack, "order-d2", json!("no_stream"), vec![bad]).await;
    let (s3, _) = append(
        &http,
        &stack,
        "order-d3",
        json!("no_stream"),
        vec![placed("d3", "c", "3")],
    )
    .await;
    assert_eq!((s1, s2, s3), (201, 201, 201));
    let pool = db.pool().await;

    assert!(
        eventually(Duration::from_secs(10), || row_exists(
            &pool, "orders", "d3"
        ))
        .await,
        "dead-letter policy goes on"
    );
    assert!(!row_exists(&pool, "orders", "d2").await);
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM projection_dead_letters WHERE projection = 'orders'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        reason.contains("/data/total"),
        "the reason names the field: {reason}"
    );

    let halted = eventually(Duration::from_secs(10), || {
        let (http, stack) = (&http, &stack);
        async move {
            get(http, stack, "/v1/projections/orders-strict/status")
                .await
                .1["haltedReason"]
                .is_string()
        }
    })
    .await;
    assert!(halted);
    let (_, status, _) = get(&http, &stack, "/v1/projections/orders-strict/status").await;
    assert!(
        status["haltedReason"]
            .as_str()
            .unwrap()
            .contains("/data/total"),
        "{status}"
    );
    assert_eq!(status["eventsApplied"], 1);
    assert_eq!(
        status["lagEvents"], 2,
        "the bad event and the one after it wait"
    );
    assert!(row_exists(&pool, "orders_strict", "d1").await);
    assert!(
        !row_exists(&pool, "orders_strict", "d3").await,
        "halt stops before the bad event"
    );
    // The halt is exported for alerting; the dead-letter policy's is not.
    let metrics = stack.metrics.encode();
    assert!(
        metrics.contains("projection_halted{projection=\"orders-strict\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("projection_halted{projection=\"orders\"} 1"),
        "{metrics}"
    );
    let _: Value = status;
}
