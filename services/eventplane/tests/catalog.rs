//! The projection catalog on real Postgres and Redis: declarations reach
//! every running query process and exactly one projector, version changes
//! swap every query process over without a failed read, removals stop
//! serving everywhere, a killed projector's projections move to another,
//! a process that misses notifications converges, and bad declarations
//! change nothing.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use eventplane::server::{Roles, Stack, StackConfig};
use eventplane_api::ProjectionManifest;
use eventplane_store::catalog::{self, CatalogError};
use serde_json::{Value, json};
use sqlx::PgPool;

/// What the README promises: a declaration reaches a running process
/// through the notification at once, and through the resync within
/// `--catalog-resync-ms` if the notification was missed; the tests' stacks
/// resync every 100 ms.
const REACHES_EVERY_PROCESS: Duration = Duration::from_secs(2);

const COMMAND: Roles = Roles {
    command: true,
    projector: false,
    query: false,
};
const PROJECTOR: Roles = Roles {
    command: false,
    projector: true,
    query: false,
};
const QUERY: Roles = Roles {
    command: false,
    projector: false,
    query: true,
};

fn role(db: &TestDb, roles: Roles) -> StackConfig {
    let mut config = local(&db.url, Some(&redis_url()), Vec::new());
    config.roles = roles;
    config
}

async fn start(db: &TestDb, roles: Roles) -> Stack {
    stack_with(role(db, roles)).await
}

/// The sample under another name and table.
fn variant(name: &str, table: &str) -> ProjectionManifest {
    let yaml = eventplane::dev::ORDERS_MANIFEST
        .replace("name: orders", &format!("name: {name}"))
        .replace("table: orders", &format!("table: {table}"));
    eventplane_api::load_manifests(&yaml).unwrap().remove(0)
}

/// Version 2 of the sample: `customer_id` and `total` (which the
/// `by_customer` query filters on) are gone, `channel` is new, and the
/// queries are `by_status` and `by_channel`.
const ORDERS_V2: &str = r#"
apiVersion: eventplane.io/v1alpha1
kind: Projection
metadata:
  name: orders
spec:
  table: orders
  version: 2
  key: id
  columns:
    - {name: id, type: text, nullable: false}
    - {name: status, type: text, nullable: false}
    - {name: channel, type: text, nullable: false}
    - {name: created_at, type: timestamptz, nullable: false}
  handlers:
    - eventType: OrderPlaced
      op: upsert
      key: /data/orderId
      set:
        - {column: status, value: PENDING}
        - {column: channel, value: web}
        - {column: created_at, from: /recordedAt}
    - eventType: OrderPaid
      op: update
      key: /data/orderId
      set:
        - {column: status, value: PAID}
    - eventType: OrderCancelled
      op: delete
      key: /data/orderId
  indexes:
    - name: by_status_created
      columns: [{name: status}, {name: created_at, order: desc}]
    - name: by_channel_created
      columns: [{name: channel}, {name: created_at, order: desc}]
  queries:
    - name: by_status
      filters: [status]
      orderBy: [{column: created_at, order: desc}]
    - name: by_channel
      filters: [channel]
      orderBy: [{column: created_at, order: desc}]
"#;

async fn declare(pool: &PgPool, manifest: &ProjectionManifest) -> catalog::Applied {
    // The first declaration may come before any process set the schema up.
    eventplane_store::db::migrate(pool).await.unwrap();
    catalog::apply(pool, &manifest.metadata.name, &manifest.spec, "cli")
        .await
        .expect("the declaration is accepted")
}

async fn place_orders(http: &reqwest::Client, command: &Stack, prefix: &str, n: usize) {
    for i in 0..n {
        let (status, _) = append(
            http,
            command,
            &format!("order-{prefix}{i}"),
            json!("no_stream"),
            vec![placed(
                &format!("{prefix}{i}"),
                &format!("c{}", i % 3),
                "9.5",
            )],
        )
        .await;
        assert_eq!(status, 201);
    }
}

async fn status_of(http: &reqwest::Client, stack: &Stack, path: &str) -> u16 {
    get(http, stack, path).await.0
}

fn applied_here(stack: &Stack, projection: &str) -> u64 {
    stack
        .metrics
        .projection_applied
        .get_or_create(&eventplane::metrics::ProjectionLabels {
            projection: projection.into(),
        })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projection_declared_while_services_run_is_served_everywhere_and_applied_once() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let command = start(&db, COMMAND).await;
    let queries = [start(&db, QUERY).await, start(&db, QUERY).await];
    let projectors = [start(&db, PROJECTOR).await, start(&db, PROJECTOR).await];
    let http = client();
    place_orders(&http, &command, "a", 30).await;
    for query in &queries {
        assert_eq!(
            status_of(&http, query, "/v1/projections/orders/rows/a1").await,
            404,
            "nothing is served before it is declared"
        );
    }

    let declared_at = Instant::now();
    declare(&pool, &variant("orders", "orders")).await;
    for query in &queries {
        let served = eventually(REACHES_EVERY_PROCESS, || async {
            status_of(&http, query, "/v1/projections/orders/status").await == 200
        })
        .await;
        assert!(served, "every query process serves the new projection");
    }
    eprintln!("served everywhere after {:?}", declared_at.elapsed());
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);
    for query in &queries {
        let (status, row, _) = get(&http, query, "/v1/projections/orders/rows/a7").await;
        assert_eq!((status, row["customer_id"].as_str()), (200, Some("c1")));
    }

    let holders: Vec<String> =
        sqlx::query_scalar("SELECT member FROM projection_leases WHERE projection = 'orders'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(holders.len(), 1, "one lease");
    let applying: Vec<u64> = projectors
        .iter()
        .map(|p| applied_here(p, "orders"))
        .collect();
    assert_eq!(
        applying.iter().filter(|n| **n > 0).count(),
        1,
        "exactly one projector applied it: {applying:?}"
    );
    assert_eq!(applying.iter().sum::<u64>(), 30);

    // The same spec recomputed from the log under another name agrees.
    declare(&pool, &variant("orders-check", "orders_check")).await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders-check")).await);
    assert_eq!(differences(&pool, "orders", "orders_check").await, 0);
    let shared: HashSet<String> = sqlx::query_scalar("SELECT member FROM projection_leases")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert!(!shared.is_empty());
    drop((command, queries, projectors));
}

/// Reads rows and list queries from one query process until told to stop;
/// counts failures (anything but 200 and the 404 of a query the served
/// version does not declare) and row answers that mix the two versions.
fn reader(
    stack_url: String,
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
    mixed: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let http = client();
        let mut reads = 0;
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let row = http
                .get(format!(
                    "{stack_url}/v1/projections/orders/rows/v{}",
                    n % 20
                ))
                .send()
                .await;
            match row {
                Ok(answer) if answer.status() == 200 => {
                    let row: Value = answer.json().await.unwrap_or(Value::Null);
                    let v1 = row.get("customer_id").is_some() && row.get("total").is_some();
                    let v2 = row.get("channel").is_some();
                    if v1 == v2 {
                        mixed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("mixed row: {row}");
                    }
                }
                other => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("row read failed: {other:?}");
                }
            }
            for query in [
                "by_customer?customer_id=c1",
                "by_status?status=PENDING",
                "by_channel?channel=web",
            ] {
                let list = http
                    .get(format!("{stack_url}/v1/projections/orders/queries/{query}"))
                    .send()
                    .await;
                let ok = match list {
                    Ok(answer) if answer.status() == 200 => true,
                    Ok(answer) if answer.status() == 404 => {
                        let body: Value = answer.json().await.unwrap_or(Value::Null);
                        body["error"]["code"] == "query_not_found"
                    }
                    _ => false,
                };
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("list {query} failed");
                }
            }
            reads += 4;
        }
        reads
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_change_moves_every_query_process_to_the_new_columns_and_queries() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    declare(&pool, &variant("orders", "orders")).await;
    let command = start(&db, COMMAND).await;
    let projector = start(&db, PROJECTOR).await;
    let queries = [start(&db, QUERY).await, start(&db, QUERY).await];
    let http = client();
    place_orders(&http, &command, "v", 20).await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let mixed = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = queries
        .iter()
        .map(|q| reader(q.url(""), stop.clone(), failures.clone(), mixed.clone()))
        .collect();

    let v2 = eventplane_api::load_manifests(ORDERS_V2).unwrap().remove(0);
    declare(&pool, &v2).await;
    let swapped = eventually(Duration::from_secs(30), || async {
        let active: Option<i32> = sqlx::query_scalar(
            "SELECT version FROM projection_versions WHERE projection = 'orders' AND state = 'active'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        active == Some(2)
    })
    .await;
    assert!(swapped, "the projector rebuilt version 2 and swapped it in");
    for query in &queries {
        let moved = eventually(REACHES_EVERY_PROCESS, || async {
            let (status, row, _) = get(&http, query, "/v1/projections/orders/rows/v3").await;
            status == 200 && row["channel"] == "web"
        })
        .await;
        assert!(moved, "every query process serves version 2's columns");
        assert_eq!(
            status_of(
                &http,
                query,
                "/v1/projections/orders/queries/by_channel?channel=web"
            )
            .await,
            200
        );
        let (status, body, _) = get(
            &http,
            query,
            "/v1/projections/orders/queries/by_customer?customer_id=c1",
        )
        .await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (404, &json!("query_not_found"))
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut reads = 0;
    for reader in readers {
        reads += reader.await.unwrap();
    }
    assert!(reads > 100, "the readers ran throughout ({reads} reads)");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no read failed");
    assert_eq!(mixed.load(Ordering::Relaxed), 0, "no answer mixed versions");
    drop((command, projector, queries));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_projection_stops_it_everywhere_and_drops_tables_only_when_asked() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    declare(&pool, &variant("orders", "orders")).await;
    declare(&pool, &variant("orders-b", "orders_b")).await;
    let command = start(&db, COMMAND).await;
    let projector = start(&db, PROJECTOR).await;
    let queries = [start(&db, QUERY).await, start(&db, QUERY).await];
    let http = client();
    place_orders(&http, &command, "r", 5).await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders-b")).await);

    let kept = catalog::remove(&pool, "orders", Some("cli"), false)
        .await
        .unwrap();
    assert!(kept.dropped.is_empty());
    let dropped = catalog::remove(&pool, "orders-b", Some("cli"), true)
        .await
        .unwrap();
    assert_eq!(dropped.dropped, vec!["orders_b_v1".to_string()]);
    for query in &queries {
        for name in ["orders", "orders-b"] {
            let gone = eventually(REACHES_EVERY_PROCESS, || async {
                let (status, body, _) =
                    get(&http, query, &format!("/v1/projections/{name}/rows/r1")).await;
                status == 404 && body["error"]["code"] == "projection_not_found"
            })
            .await;
            assert!(gone, "{name} answers 404 on every query process");
        }
    }
    let relations: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relname IN ('orders', 'orders_v1', 'orders_b', 'orders_b_v1') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        relations,
        vec!["orders", "orders_v1"],
        "Retain keeps, Delete drops"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM orders").await, 5);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM projection_checkpoints WHERE projection LIKE 'orders-b%'"
        )
        .await,
        0
    );
    let leases = eventually(Duration::from_secs(5), || async {
        count(&pool, "SELECT count(*) FROM projection_leases").await == 0
    })
    .await;
    assert!(
        leases,
        "the projector gave the removed projections' leases up"
    );
    drop((command, projector, queries));
}

async fn holders(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT projection, member FROM projection_leases WHERE expires_at > now() ORDER BY projection",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_projector_hands_its_projections_over_and_nothing_is_lost() {
    const LEASE_TTL_MS: u64 = 1000;
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let names: Vec<String> = (0..6).map(|i| format!("orders-{i}")).collect();
    for name in &names {
        declare(&pool, &variant(name, &name.replace('-', "_"))).await;
    }
    let command = start(&db, COMMAND).await;
    let http = client();
    let mut first = spawn_projector(&db, 7, LEASE_TTL_MS);
    let mut second = spawn_projector(&db, 7, LEASE_TTL_MS);

    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (http, url, writing) = (http.clone(), command.url(""), writing.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while writing.load(Ordering::Relaxed) {
                let body = json!({"expectedVersion": "no_stream", "events": [placed(&format!("k{n}"), "c", "1")]});
                let answer = http
                    .post(format!("{url}/v1/streams/order-k{n}/events"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 201);
                n += 1;
                // A steady stream, not a flood: the handover under writes is
                // what is tested, and a writer as fast as the machine allows
                // can starve the projectors' one-second heartbeats when the
                // other tests run beside this one.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };
    let split = eventually(Duration::from_secs(15), || async {
        let held = holders(&pool).await;
        let members: HashSet<&String> = held.iter().map(|(_, m)| m).collect();
        held.len() == names.len() && members.len() == 2
    })
    .await;
    assert!(
        split,
        "both projectors hold a share: {:?}",
        holders(&pool).await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // SIGKILL the first: its leases stay until they expire, then the
    // second takes them over.
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    first.wait().unwrap();
    let killed_at = Instant::now();
    let taken_over = eventually(Duration::from_secs(15), || async {
        let held = holders(&pool).await;
        let members: HashSet<&String> = held.iter().map(|(_, m)| m).collect();
        held.len() == names.len() && members.len() == 1
    })
    .await;
    let took = killed_at.elapsed();
    assert!(
        taken_over,
        "the survivor holds every projection: {:?}",
        holders(&pool).await
    );
    eprintln!("taken over {took:?} after the kill (lease {LEASE_TTL_MS} ms)");
    assert!(
        took < Duration::from_millis(3 * LEASE_TTL_MS) + Duration::from_secs(2),
        "the takeover took {took:?}"
    );

    writing.store(false, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 0);
    for name in &names {
        assert!(
            eventually(Duration::from_secs(30), || caught_up(&pool, name)).await,
            "{name} caught up"
        );
    }
    let _ = second.kill();
    second.wait().unwrap();
    declare(&pool, &variant("orders-ref", "orders_ref")).await;
    let reference = start(&db, PROJECTOR).await;
    assert!(eventually(Duration::from_secs(30), || caught_up(&pool, "orders-ref")).await);
    for name in &names {
        let table = name.replace('-', "_");
        assert_eq!(
            differences(&pool, &table, "orders_ref").await,
            0,
            "{table} equals the reference"
        );
        let applied: i64 =
            sqlx::query_scalar("SELECT applied FROM projection_checkpoints WHERE projection = $1")
                .bind(name)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(applied, written as i64, "{name}: every event once");
    }
    drop((command, reference));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_that_misses_notifications_converges_through_the_resync() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let mut config = role(&db, QUERY);
    config.catalog_resync = Duration::from_millis(300);
    let query = stack_with(config).await;
    let http = client();
    // Postgres keeps the notification channel per session: cut the
    // process's listening sessions, so what is notified now never reaches
    // it.
    let listening = eventually(Duration::from_secs(5), || async {
        count(
            &pool,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .await
            > 0
    })
    .await;
    assert!(listening, "the query process listens for catalog changes");
    let cut: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() \
         AND query ILIKE 'LISTEN%' AND pg_terminate_backend(pid)",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!cut.is_empty());
    declare(&pool, &variant("orders", "orders")).await;
    let served = eventually(Duration::from_secs(3), || async {
        status_of(&http, &query, "/v1/projections/orders/status").await == 200
    })
    .await;
    assert!(served, "the resync brought the declaration in");
    let (_, body, _) = get(&http, &query, "/v1/projections").await;
    assert_eq!(body["projections"], json!(["orders"]));
    let generation = catalog::generation(&pool).await.unwrap();
    assert_eq!(body["catalogGeneration"], json!(generation));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_declarations_are_refused_and_change_nothing() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    eventplane_store::db::migrate(&pool).await.unwrap();
    declare(&pool, &variant("orders", "orders")).await;
    let before = catalog::generation(&pool).await.unwrap();

    let mut invalid = variant("broken", "broken");
    invalid.spec.indexes[0].columns[1].name = "nope".into();
    let err = catalog::apply(&pool, "broken", &invalid.spec, "cli")
        .await
        .unwrap_err();
    assert!(matches!(err, CatalogError::Invalid(_)), "{err}");
    assert!(
        err.to_string().contains("spec.indexes[0].columns[1].name"),
        "{err}"
    );

    let stealing = variant("other", "orders");
    let err = catalog::apply(&pool, "other", &stealing.spec, "cli")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CatalogError::TableTaken { table, by } if table == "orders" && by.contains("\"orders\"")),
        "{err}"
    );
    for taken in ["events", "streams", "command_jobs"] {
        let intruder = variant("intruder", taken);
        let err = catalog::apply(&pool, "intruder", &intruder.spec, "cli")
            .await
            .unwrap_err();
        assert!(
            matches!(err, CatalogError::TableTaken { .. }),
            "{taken}: {err}"
        );
    }
    let mut moved = variant("orders", "orders_elsewhere");
    moved.spec.version = 2;
    let err = catalog::apply(&pool, "orders", &moved.spec, "cli")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CatalogError::Immutable {
                field: "spec.table",
                ..
            }
        ),
        "{err}"
    );
    let mut changed = variant("orders", "orders");
    changed.spec.version = 2;
    let err = catalog::apply(&pool, "orders", &changed.spec, "operator:ns/orders")
        .await
        .unwrap_err();
    assert!(matches!(err, CatalogError::Owned { .. }), "{err}");

    assert_eq!(
        catalog::generation(&pool).await.unwrap(),
        before,
        "nothing changed"
    );
    assert_eq!(
        catalog::load(&pool)
            .await
            .unwrap()
            .entries
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        vec!["orders"]
    );
    let kinds: Vec<(String, String)> = sqlx::query_as(
        "SELECT relname::text, relkind::text FROM pg_class WHERE relname IN ('events', 'streams', 'command_jobs', 'orders') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        kinds,
        vec![
            ("command_jobs".into(), "r".into()),
            ("events".into(), "p".into()),
            ("orders".into(), "v".into()),
            ("streams".into(), "r".into()),
        ],
        "the event store's tables are untouched"
    );
    let same = catalog::apply(&pool, "orders", &variant("orders", "orders").spec, "cli")
        .await
        .unwrap();
    assert_eq!(
        same.change,
        catalog::Change::Unchanged,
        "declaring the same spec again changes nothing"
    );
    assert_eq!(same.generation, before);
}

fn eventplane(db: &TestDb, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_eventplane"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "error")
        .output()
        .expect("eventplane runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_applies_lists_and_deletes_projections() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("{}-manifests", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("orders.yaml"), eventplane::dev::ORDERS_MANIFEST).unwrap();
    let b = eventplane::dev::ORDERS_MANIFEST
        .replace("name: orders", "name: orders-b")
        .replace("table: orders", "table: orders_b");
    std::fs::write(dir.join("orders-b.yaml"), b).unwrap();

    let out = eventplane(&db, &["projections", "apply", "-f", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("projection/orders created") && text.contains("projection/orders-b created"),
        "{text}"
    );
    let again = eventplane(&db, &["projections", "apply", "-f", dir.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("projection/orders unchanged"));

    let out = eventplane(&db, &["projections", "get"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("DEAD LETTERS"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("orders ") && lines[1].contains("Ready"),
        "{table}"
    );
    assert!(lines[2].starts_with("orders-b"), "{table}");

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        eventplane::dev::ORDERS_MANIFEST
            .replace("name: orders", "name: bad")
            .replace("table: orders", "table: events"),
    )
    .unwrap();
    let out = eventplane(&db, &["projections", "apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("table \"events\" is taken"), "{err}");

    let out = eventplane(&db, &["projections", "delete", "orders-b", "--drop-tables"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("dropped orders_b_v1"));
    let out = eventplane(&db, &["projections", "get", "--json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["name"], "orders");
    let out = eventplane(&db, &["projections", "delete", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no projection named \"nope\""));
    let _ = std::fs::remove_dir_all(dir);
}
