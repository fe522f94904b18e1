//! Rebuild and swap against real Postgres, with readers of the stable name
//! (plain SQL and the query service) running without pause and writers
//! appending throughout.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use eventplane::projector::rebuild::{RebuildError, RebuildOptions, run};
use eventplane::server::Roles;
use eventplane_api::ProjectionManifest;
use eventplane_store::Projection;
use serde_json::json;
use sqlx::PgPool;

/// The sample projection with another version number and name, and with
/// new orders marked `marker` instead of PENDING, so each version's rows
/// are recognisable.
fn orders_version(name: &str, table: &str, version: u32, marker: &str) -> Projection {
    Projection::from_manifest(orders_manifest(name, table, version, marker))
}

fn orders_manifest(name: &str, table: &str, version: u32, marker: &str) -> ProjectionManifest {
    let yaml = eventplane::dev::ORDERS_MANIFEST
        .replace("name: orders", &format!("name: {name}"))
        .replace("table: orders", &format!("table: {table}"))
        .replace("spec:\n", &format!("spec:\n  version: {version}\n"))
        .replace(
            "{column: status, value: PENDING}",
            &format!("{{column: status, value: {marker}}}"),
        );
    eventplane_api::load_manifests(&yaml).unwrap().remove(0)
}

/// Declares `projection`'s spec in the catalog, as the operator does
/// before it starts a rebuild Job.
async fn declare(pool: &PgPool, projection: &Projection) {
    eventplane_store::catalog::apply(pool, &projection.name, &projection.spec, "files")
        .await
        .expect("declared");
}

/// Reads the stable name in a loop; counts errors and answers that mix
/// two versions' markers.
fn plain_reader(
    pool: PgPool,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicUsize>,
    mixed: Arc<AtomicUsize>,
    reads: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let result: Result<Vec<String>, _> =
                sqlx::query_scalar("SELECT DISTINCT status FROM orders")
                    .fetch_all(&pool)
                    .await;
            match result {
                Ok(statuses) => {
                    if statuses.iter().any(|s| s == "PENDING")
                        && statuses.iter().any(|s| s == "OPEN")
                    {
                        mixed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(err) => {
                    eprintln!("reader error: {err}");
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            reads.fetch_add(1, Ordering::Relaxed);
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_swaps_in_under_readers_and_writers_and_can_swap_back() {
    let db = TestDb::new().await;
    // As in a cluster: the projector leaves rebuilds to their own runs
    // (Jobs there), and each version is declared before it is built.
    let mut config = local(&db.url, Some(&redis_url()), orders());
    config.projector.rebuild_in_process = false;
    let stack = stack_with(config).await;
    let http = client();
    for i in 0..300 {
        let (status, _) = append(
            &http,
            &stack,
            &format!("order-r{i}"),
            json!("no_stream"),
            vec![placed(&format!("r{i}"), &format!("c{}", i % 9), "3")],
        )
        .await;
        assert_eq!(status, 201);
        if i % 3 == 0 {
            append(
                &http,
                &stack,
                &format!("order-r{i}"),
                json!(1),
                vec![json!({"type": "OrderPaid", "data": {"orderId": format!("r{i}")}})],
            )
            .await;
        }
    }
    let pool = db.pool().await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);

    let stop = Arc::new(AtomicBool::new(false));
    let (errors, mixed, reads) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let readers: Vec<_> = (0..3)
        .map(|_| {
            plain_reader(
                pool.clone(),
                stop.clone(),
                errors.clone(),
                mixed.clone(),
                reads.clone(),
            )
        })
        .collect();
    // The query service reads the stable name too.
    let http_errors = Arc::new(AtomicUsize::new(0));
    let service_reader = {
        let (http, url, stop, http_errors) = (
            http.clone(),
            stack.url("/v1/projections/orders/queries/by_customer?customer_id=c1&limit=5"),
            stop.clone(),
            http_errors.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let status = http
                    .get(&url)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                if status != 200 {
                    http_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Writers keep going through the rebuild and the swap.
    let writer = {
        let (http, base, stop) = (http.clone(), stack.url(""), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = json!({"expectedVersion": "no_stream", "events": [placed(&format!("w{n}"), "c1", "1")]});
                let response = http
                    .post(format!("{base}/v1/streams/order-w{n}/events"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 201);
                n += 1;
            }
            n
        })
    };

    let v2 = orders_version("orders", "orders", 2, "OPEN");
    declare(&pool, &v2).await;
    let mut options = RebuildOptions::from_spec(&v2.spec);
    options.batch_size = 100;
    let report = run(&pool, &v2, None, stack.metrics.clone(), &options)
        .await
        .expect("rebuild succeeds");
    assert!(!report.already_active && !report.swapped_back);
    assert!(report.events_loaded >= 400, "{report:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    for reader in readers {
        reader.await.unwrap();
    }
    service_reader.await.unwrap();
    assert!(written > 0, "writers ran during the rebuild");
    assert!(
        reads.load(Ordering::Relaxed) > 10,
        "readers ran during the rebuild"
    );
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "no reader of the stable name saw an error"
    );
    assert_eq!(
        mixed.load(Ordering::Relaxed),
        0,
        "no answer mixed two versions"
    );
    assert_eq!(
        http_errors.load(Ordering::Relaxed),
        0,
        "the query service never failed"
    );

    let states: Vec<(i32, String)> = sqlx::query_as("SELECT version, state FROM projection_versions WHERE projection = 'orders' ORDER BY version")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(states, vec![(1, "retained".into()), (2, "active".into())]);

    // The live projector followed the swap: version 2 holds every event,
    // including those appended during the rebuild, exactly once. The
    // reference is version 2 built in one go under another name.
    let reference = orders_manifest("orders-check", "orders_check", 2, "OPEN");
    let mut config = local(&db.url, None, vec![reference]);
    config.roles = Roles {
        command: false,
        projector: true,
        query: false,
    };
    let check = stack_with(config).await;
    assert!(eventually(Duration::from_secs(30), || caught_up(&pool, "orders")).await);
    assert!(eventually(Duration::from_secs(30), || caught_up(&pool, "orders-check")).await);
    drop(check);
    let diff: Vec<(String, String)> = sqlx::query_as(
        "(SELECT 'live', to_jsonb(a)::text FROM (SELECT * FROM orders EXCEPT ALL SELECT * FROM orders_check) a) \
         UNION ALL (SELECT 'reference', to_jsonb(b)::text FROM (SELECT * FROM orders_check EXCEPT ALL SELECT * FROM orders) b)",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(diff.is_empty(), "{diff:#?}");
    assert_eq!(differences(&pool, "orders", "orders_check").await, 0);
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pending, 0, "every row comes from version 2");

    // Swap back: version 1 is caught up from where it stopped.
    let v1 = orders_version("orders", "orders", 1, "PENDING");
    for i in 0..20 {
        append(
            &http,
            &stack,
            &format!("order-late{i}"),
            json!("no_stream"),
            vec![placed(&format!("late{i}"), "c2", "4")],
        )
        .await;
    }
    declare(&pool, &v1).await;
    let report = run(
        &pool,
        &v1,
        None,
        stack.metrics.clone(),
        &RebuildOptions::from_spec(&v1.spec),
    )
    .await
    .expect("swap back succeeds");
    assert!(report.swapped_back);
    let late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders WHERE id LIKE 'late%' AND status = 'PENDING'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        late, 20,
        "the swapped-back version caught up with events appended since it retired"
    );
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'OPEN'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(open, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_rebuild_is_refused() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let pool = db.pool().await;
    let mut holder = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended('eventplane.rebuild:orders', 0))")
        .execute(&mut *holder)
        .await
        .unwrap();
    let v2 = orders_version("orders", "orders", 2, "OPEN");
    let result = run(
        &pool,
        &v2,
        None,
        stack.metrics.clone(),
        &RebuildOptions::from_spec(&v2.spec),
    )
    .await;
    assert!(
        matches!(result, Err(RebuildError::AlreadyRunning(ref name)) if name == "orders"),
        "{result:?}"
    );
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_versions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(versions, 1, "the refused rebuild touched nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilding_the_active_version_does_nothing() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let pool = db.pool().await;
    let v1 = orders_version("orders", "orders", 1, "PENDING");
    declare(&pool, &v1).await;
    let report = run(
        &pool,
        &v1,
        None,
        stack.metrics.clone(),
        &RebuildOptions::from_spec(&v1.spec),
    )
    .await
    .unwrap();
    assert!(report.already_active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_local_projector_started_with_a_higher_version_rebuilds_in_the_background() {
    let db = TestDb::new().await;
    let http = client();
    {
        let stack = stack(&db).await;
        for i in 0..30 {
            let (status, _) = append(
                &http,
                &stack,
                &format!("order-b{i}"),
                json!("no_stream"),
                vec![placed(&format!("b{i}"), "c", "1")],
            )
            .await;
            assert_eq!(status, 201);
        }
        let pool = db.pool().await;
        assert!(eventually(Duration::from_secs(10), || caught_up(&pool, "orders")).await);
    }
    // Restart with the spec at version 2: the old version keeps serving
    // while the new one is built, then it is swapped in.
    let v2 = orders_manifest("orders", "orders", 2, "OPEN");
    let stack = stack_with(local(&db.url, Some(&redis_url()), vec![v2])).await;
    let pool = db.pool().await;
    let swapped = eventually(Duration::from_secs(20), || {
        let pool = &pool;
        async move {
            let active: Option<i32> = sqlx::query_scalar("SELECT version FROM projection_versions WHERE projection = 'orders' AND state = 'active'")
                .fetch_optional(pool)
                .await
                .unwrap();
            active == Some(2)
        }
    })
    .await;
    assert!(swapped, "version 2 became active");
    let (status, row, _) = get(&http, &stack, "/v1/projections/orders/rows/b7").await;
    assert_eq!(status, 200);
    assert_eq!(row["status"], "OPEN");
    let (status, _) = append(
        &http,
        &stack,
        "order-b99",
        json!("no_stream"),
        vec![placed("b99", "c", "1")],
    )
    .await;
    assert_eq!(status, 201);
    assert!(
        eventually(Duration::from_secs(10), || row_is(&pool, "b99", "OPEN")).await,
        "the live projector follows version 2"
    );
}

async fn row_is(pool: &PgPool, id: &str, status: &str) -> bool {
    let found: Option<String> = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap();
    found.as_deref() == Some(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_from_before_versioning_is_adopted_as_its_first_version() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    eventplane_store::db::migrate(&pool).await.unwrap();
    let spec = orders_version("orders", "orders", 1, "PENDING").spec;
    for statement in eventplane_plan::create_table_sql(&spec, "orders") {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::query("INSERT INTO orders (id, status, customer_id, created_at) VALUES ('old-1', 'PAID', 'c', now())")
        .execute(&pool)
        .await
        .unwrap();
    // The projector that filled it kept its checkpoint: that is what marks
    // the table as this projection's.
    sqlx::query("INSERT INTO projection_checkpoints (projection) VALUES ('orders')")
        .execute(&pool)
        .await
        .unwrap();
    let _stack = stack(&db).await;
    let kind: String =
        sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE relname = 'orders'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(kind, "v", "the stable name became a view");
    assert!(
        row_is(&pool, "old-1", "PAID").await,
        "the old rows are the first version's"
    );
}

/// Readers on a streaming replica throughout a rebuild's swap on the
/// primary: the swap's replayed lock may cancel a read there, which the
/// query service runs again, so no reader sees a failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_swap_on_the_primary_fails_no_read_on_the_replica() {
    let db = TestDb::new().await;
    let mut config = local(&db.url, None, orders());
    config.projector.rebuild_in_process = false;
    // The replica holds the swap's lock until it replays the commit, which
    // behind the WAL of every other test's database can take seconds: the
    // claim here is that no read fails, not how fast it is.
    config.query.read_timeout = Duration::from_secs(60);
    drop(stack_with(config.clone()).await);
    config.read_database_url = Some(db.on_replica().await);
    let stack = stack_with(config).await;
    let http = client();
    for i in 0..200 {
        let (status, _) = append(
            &http,
            &stack,
            &format!("order-s{i}"),
            json!("no_stream"),
            vec![placed(&format!("s{i}"), &format!("c{}", i % 5), "2")],
        )
        .await;
        assert_eq!(status, 201);
    }
    let pool = db.pool().await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);
    // The replica has the rows too (it applies 50 ms late).
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(&http, &stack, "/v1/projections/orders/rows/s199")
                .await
                .0
                == 200
        })
        .await
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (failures, reads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let readers: Vec<_> = (0..4)
        .map(|n| {
            let (http, stop, failures, reads) =
                (http.clone(), stop.clone(), failures.clone(), reads.clone());
            let urls = [
                stack.url(&format!("/v1/projections/orders/rows/s{n}")),
                stack.url("/v1/projections/orders/queries/by_customer?customer_id=c1&limit=5"),
            ];
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for url in &urls {
                        let response = http.get(url).send().await.unwrap();
                        let status = response.status().as_u16();
                        if status != 200 {
                            eprintln!(
                                "replica read {url}: {status} {}",
                                response.text().await.unwrap_or_default()
                            );
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let v2 = orders_version("orders", "orders", 2, "OPEN");
    declare(&pool, &v2).await;
    let report = run(
        &pool,
        &v2,
        None,
        stack.metrics.clone(),
        &RebuildOptions::from_spec(&v2.spec),
    )
    .await
    .expect("rebuild succeeds");
    assert!(!report.already_active, "{report:?}");
    // Keep reading while the replica replays the swap and the query
    // service moves to version 2.
    let (http2, url) = (http.clone(), stack.url("/v1/projections/orders/rows/s1"));
    assert!(
        eventually(Duration::from_secs(15), || async {
            let row: serde_json::Value = http2
                .get(&url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap_or_default();
            row["status"] == "OPEN"
        })
        .await,
        "reads through the replica reach version 2"
    );
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    assert!(reads.load(Ordering::Relaxed) > 20, "readers ran throughout");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no read on the replica failed"
    );
}

/// A read that waits on the stable name's lock longer than the read
/// pool's `lock_timeout` (as one queued behind a swap replayed on a
/// replica does) gives up the wait and is read again, so the client gets
/// the row once the lock is gone, not an error.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_held_behind_a_lock_is_read_again_and_answers() {
    let db = TestDb::new().await;
    let stack = stack_with(local(&db.url, None, orders())).await;
    let http = client();
    let (status, _) = append(
        &http,
        &stack,
        "order-held",
        json!("no_stream"),
        vec![placed("held", "c1", "3")],
    )
    .await;
    assert_eq!(status, 201);
    let pool = db.pool().await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);

    // Hold the view as a swap does, for several lock timeouts.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let read = tokio::spawn({
        let (http, url) = (http.clone(), stack.url("/v1/projections/orders/rows/held"));
        async move {
            let response = http.get(url).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    });
    tokio::time::sleep(eventplane::query::replica::READ_LOCK_TIMEOUT * 4).await;
    assert!(!read.is_finished(), "the read waits while the lock is held");
    holder.commit().await.unwrap();

    let (status, body) = read.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let metrics = reqwest::get(stack.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let retries = metrics
        .lines()
        .find_map(|line| line.strip_prefix("replica_read_retries_total "))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(retries >= 1.0, "the read was run again: {retries}");
}
