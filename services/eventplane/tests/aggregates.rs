//! Column operations and handler conditions against real Postgres: after a
//! random event history, applied in batches of random sizes (so changes to
//! one key fold together, and are cut into rounds where they must be), the
//! table equals an in-memory model that applies the events one by one; a
//! rebuild of the same history through the rebuild path agrees.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use eventplane::projector::rebuild::{RebuildOptions, run};
use eventplane_store::Projection;
use serde_json::{Value, json};
use sqlx::PgPool;

const SPEC: &str = r#"
apiVersion: eventplane.io/v1alpha1
kind: Projection
metadata: {name: agg}
spec:
  table: agg
  key: id
  columns:
    - {name: id, type: text}
    - {name: n, type: bigint}
    - {name: total, type: numeric}
    - {name: lo, type: bigint}
    - {name: hi, type: bigint}
    - {name: first, type: text}
    - {name: tags, type: jsonb}
    - {name: attrs, type: jsonb}
    - {name: status, type: text}
    - {name: d, type: double}
  handlers:
    - eventType: Hit
      op: upsert
      key: /data/id
      when: "data.amount IS NULL OR data.amount > -1.5"
      set:
        - {column: n, op: add}
        - {column: total, op: add, from: /data/amount}
        - {column: lo, op: min, from: /data/v}
        - {column: hi, op: max, from: /data/v}
        - {column: first, op: setIfNull, from: /data/tag}
        - {column: tags, op: append, from: /data/tag}
        - {column: attrs, op: merge, fromFirst: [/data/attrs, /data/attributes], default: "{}"}
        - {column: d, op: add, from: /data/f}
    - eventType: Open
      op: upsert
      key: /data/id
      if: "status IS NULL OR status = 'CLOSED'"
      set:
        - {column: status, value: OPEN}
        - {column: n, op: add, value: "10"}
    - eventType: Close
      op: update
      key: /data/id
      if: "status = 'OPEN' AND n >= data.min"
      set:
        - {column: status, value: CLOSED}
        - {column: hi, op: max, from: /data/v}
    - eventType: Drop
      op: delete
      key: /data/id
      if: "status IN ('CLOSED')"
    - eventType: Reset
      op: update
      key: /data/id
      set:
        - {column: n, value: "0"}
        - {column: tags, value: "[]"}
        - {column: total, from: /data/amount, default: "0.00"}
    - eventType: Gone
      op: delete
      key: /data/id
"#;

/// One row of the model; `total` in cents.
#[derive(Debug, Clone, Default, PartialEq)]
struct Row {
    n: Option<i64>,
    total: Option<i64>,
    lo: Option<i64>,
    hi: Option<i64>,
    first: Option<String>,
    tags: Option<Value>,
    attrs: Option<Value>,
    status: Option<String>,
    d: Option<f64>,
}

fn cents(text: &str) -> i64 {
    let (int, frac) = text.split_once('.').unwrap();
    let sign = if int.starts_with('-') { -1 } else { 1 };
    sign * (int.trim_start_matches('-').parse::<i64>().unwrap() * 100
        + frac.parse::<i64>().unwrap())
}

fn render_cents(c: i64) -> String {
    let sign = if c < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", c.abs() / 100, c.abs() % 100)
}

/// Applies one event as its handler says, one event at a time; false when
/// a condition held it back.
fn model(rows: &mut BTreeMap<String, Row>, ty: &str, data: &Value) -> bool {
    let id = data["id"].as_str().unwrap().to_string();
    let int = |k: &str| data.get(k).and_then(Value::as_i64);
    let amount = data.get("amount").and_then(Value::as_str).map(cents);
    let existing = rows.get(&id).cloned();
    match ty {
        "Hit" => {
            if amount.is_some_and(|a| a <= -150) {
                return false;
            }
            let mut r = existing.unwrap_or_default();
            r.n = Some(r.n.unwrap_or(0) + 1);
            if let Some(a) = amount {
                r.total = Some(r.total.unwrap_or(0) + a);
            }
            if let Some(v) = int("v") {
                r.lo = Some(r.lo.map_or(v, |lo| lo.min(v)));
                r.hi = Some(r.hi.map_or(v, |hi| hi.max(v)));
            }
            let tag = data.get("tag").cloned().unwrap_or(Value::Null);
            if let Some(t) = tag.as_str() {
                r.first.get_or_insert_with(|| t.to_string());
            }
            let mut tags = match r.tags.take() {
                Some(Value::Array(a)) => a,
                _ => vec![],
            };
            tags.push(tag);
            r.tags = Some(Value::Array(tags));
            let attrs = data
                .get("attrs")
                .filter(|v| !v.is_null())
                .or(data.get("attributes").filter(|v| !v.is_null()))
                .cloned()
                .unwrap_or(json!({}));
            let mut merged = match r.attrs.take() {
                Some(Value::Object(m)) => m,
                _ => Default::default(),
            };
            merged.extend(attrs.as_object().unwrap().clone());
            r.attrs = Some(Value::Object(merged));
            if let Some(f) = data.get("f").and_then(Value::as_f64) {
                r.d = Some(r.d.unwrap_or(0.0) + f);
            }
            rows.insert(id, r);
        }
        "Open" => {
            let r = existing.unwrap_or_default();
            let st = r.status.as_deref();
            if st.is_none() || st == Some("CLOSED") {
                let mut r = r;
                r.status = Some("OPEN".into());
                r.n = Some(r.n.unwrap_or(0) + 10);
                rows.insert(id, r);
                return true;
            }
            return false;
        }
        "Close" => {
            if let Some(mut r) = existing {
                let min = int("min");
                let holds = r.status.as_deref() == Some("OPEN")
                    && matches!((r.n, min), (Some(n), Some(m)) if n >= m);
                if holds {
                    r.status = Some("CLOSED".into());
                    if let Some(v) = int("v") {
                        r.hi = Some(r.hi.map_or(v, |hi| hi.max(v)));
                    }
                    rows.insert(id, r);
                    return true;
                }
            }
            return false;
        }
        "Drop" => {
            if existing.is_some_and(|r| r.status.as_deref() == Some("CLOSED")) {
                rows.remove(&id);
                return true;
            }
            return false;
        }
        "Reset" => {
            if let Some(mut r) = existing {
                r.n = Some(0);
                r.tags = Some(json!([]));
                r.total = Some(amount.unwrap_or(0));
                rows.insert(id, r);
            }
        }
        "Gone" => {
            rows.remove(&id);
        }
        other => panic!("unexpected {other}"),
    }
    true
}

fn random_event(rng: &mut Lcg) -> (String, Value) {
    let id = format!("k{}", rng.next(6));
    let ty = [
        "Hit", "Hit", "Hit", "Hit", "Open", "Close", "Drop", "Reset", "Gone",
    ][rng.next(9) as usize];
    let mut data = json!({"id": id});
    let amount = render_cents(rng.next(700) as i64 - 200);
    data["amount"] = json!(rng.maybe(amount));
    let v = rng.next(21) as i64 - 10;
    data["v"] = json!(rng.maybe(v));
    data["tag"] = match rng.next(5) {
        0 => Value::Null,
        n => json!(format!("t{n}")),
    };
    match rng.next(3) {
        0 => data["attrs"] = json!({format!("a{}", rng.next(3)): rng.next(9)}),
        1 => data["attributes"] = json!({format!("a{}", rng.next(3)): rng.next(9)}),
        _ => {}
    }
    let f = [0.1, 0.2, 0.3, 1e16, -1e16][rng.next(5) as usize];
    data["f"] = json!(rng.maybe(f));
    let m = rng.next(15) as i64;
    if let Some(m) = rng.maybe(m) {
        data["min"] = json!(m);
    }
    (ty.to_string(), data)
}

type DbRow = (
    String,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<Value>,
    Option<Value>,
    Option<String>,
    Option<f64>,
);

async fn table(pool: &PgPool) -> BTreeMap<String, Row> {
    let rows: Vec<DbRow> = sqlx::query_as(
        "SELECT id, n, total::text, lo, hi, first, tags, attrs, status, d FROM agg ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, n, total, lo, hi, first, tags, attrs, status, d)| {
            let total = total.map(|t| {
                assert!(t.contains('.'), "numeric keeps its two decimals: {t}");
                cents(&t)
            });
            (
                id,
                Row {
                    n,
                    total,
                    lo,
                    hi,
                    first,
                    tags,
                    attrs,
                    status,
                    d,
                },
            )
        })
        .collect()
}

async fn insert_events(pool: &PgPool, events: &[(String, Value)]) {
    for (i, (ty, data)) in events.iter().enumerate() {
        sqlx::query(
            "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES ($1, $2, $3, $4)",
        )
        .bind(format!("s-{i}"))
        .bind(1i64)
        .bind(ty)
        .bind(data)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// Applies batches of random sizes until the projection has passed every
/// event.
async fn catch_up(pool: &PgPool, projection: &mut Arc<Projection>, rng: &mut Lcg) -> usize {
    let mut applied = 0;
    loop {
        let limit = 1 + rng.next(25) as i64;
        let outcome = eventplane_store::batch::apply_batch(pool, projection, limit)
            .await
            .unwrap();
        if outcome.dead_letters > 0 {
            let reasons: Vec<String> =
                sqlx::query_scalar("SELECT reason FROM projection_dead_letters")
                    .fetch_all(pool)
                    .await
                    .unwrap();
            panic!("every event maps: {reasons:?}");
        }
        applied += outcome.events;
        // A short batch can also mean that the horizon, which other
        // databases' transactions hold too, has not passed every event.
        if !outcome.full {
            if caught_up(pool, "agg").await {
                return applied;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_and_conditions_equal_one_by_one_application_live_and_rebuilt() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    eventplane_store::db::migrate(&pool).await.unwrap();
    let manifest = eventplane_api::load_manifests(SPEC).unwrap().remove(0);
    let v1 = Projection::from_manifest(manifest.clone());
    eventplane_store::catalog::apply(&pool, "agg", &v1.spec, "files")
        .await
        .unwrap();
    let mut live = Arc::new(v1);
    let mut rng = Lcg(7);
    // Batch sizes come from a generator of their own, so the history stays
    // the same however many batches a catch-up takes.
    let mut sizes = Lcg(11);
    let mut expected = BTreeMap::new();
    let mut total_events = 0;
    let mut outcomes: BTreeMap<(String, bool), usize> = BTreeMap::new();
    for round in 0..6 {
        let events: Vec<(String, Value)> = (0..120).map(|_| random_event(&mut rng)).collect();
        for (ty, data) in &events {
            let applied = model(&mut expected, ty, data);
            *outcomes.entry((ty.clone(), applied)).or_insert(0) += 1;
        }
        insert_events(&pool, &events).await;
        total_events += events.len();
        catch_up(&pool, &mut live, &mut sizes).await;
        assert_eq!(table(&pool).await, expected, "after round {round}");
    }
    for ty in ["Hit", "Open", "Close", "Drop"] {
        for applied in [true, false] {
            assert!(
                outcomes.contains_key(&(ty.to_string(), applied)),
                "the history has {ty} events that conditions {} : {outcomes:?}",
                if applied { "let through" } else { "held back" }
            );
        }
    }
    assert!(expected.len() >= 3, "rows remain: {expected:?}");

    // The same history replayed into version 2 through the rebuild path.
    let mut spec2 = live.spec.clone();
    spec2.version = 2;
    let v2 = Projection::live("agg".into(), spec2);
    eventplane_store::catalog::apply(&pool, "agg", &v2.spec, "files")
        .await
        .unwrap();
    let options = RebuildOptions {
        batch_size: 13,
        ..RebuildOptions::from_spec(&v2.spec)
    };
    let report = run(
        &pool,
        &v2,
        None,
        eventplane::metrics::Metrics::new(),
        &options,
    )
    .await
    .unwrap();
    assert!(!report.already_active);
    let active: i32 = sqlx::query_scalar(
        "SELECT version FROM projection_versions WHERE projection = 'agg' AND state = 'active'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(active, 2);
    assert_eq!(table(&pool).await, expected, "the rebuild agrees");
    assert!(total_events > 0);
}

type StatsRow = (String, i64, String, String, String);

async fn customer_stats(pool: &PgPool) -> Vec<StatsRow> {
    sqlx::query_as(
        "SELECT customer_id, orders_placed, total_spent::text, first_order_at::text, last_order_at::text \
         FROM customer_stats ORDER BY customer_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// What `customer_stats` must hold, computed from the log itself. The
/// first order is the first in log order (`setIfNull` keeps what it saw
/// first), which under concurrent appends need not be the earliest
/// `recorded_at`: a transaction's clock starts before its turn in the log.
async fn stats_from_log(pool: &PgPool) -> Vec<StatsRow> {
    sqlx::query_as(
        "SELECT data->>'customerId', count(*), sum((data->>'total')::numeric)::text, \
                ((array_agg(recorded_at ORDER BY tx_id, position))[1])::text, max(recorded_at)::text \
         FROM events WHERE event_type = 'OrderPlaced' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn customer_stats_stays_exact_under_concurrent_appends_and_a_rebuild() {
    let db = TestDb::new().await;
    let stack = stack_with(local(
        &db.url,
        Some(&redis_url()),
        eventplane::dev::dev_projections(),
    ))
    .await;
    let pool = db.pool().await;
    let http = client();
    // 24 writers, each placing orders on streams of its own for five
    // shared customers, so batches fold many orders of one customer.
    let writers = (0..24).map(|w| {
        let (http, stack) = (http.clone(), &stack);
        async move {
            let mut rng = Lcg(w + 1);
            let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
            for i in 0..25 {
                let customer = format!("c{}", rng.next(5));
                let cents = rng.next(100_000) as i64;
                let total = render_cents(cents);
                let (status, body) = append(
                    &http,
                    stack,
                    &format!("order-{w}-{i}"),
                    json!("no_stream"),
                    vec![placed(&format!("{w}-{i}"), &customer, &total)],
                )
                .await;
                assert_eq!(status, 201, "{body}");
                let e = expected.entry(customer).or_default();
                e.0 += 1;
                e.1 += cents;
            }
            expected
        }
    });
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for part in futures::future::join_all(writers).await {
        for (customer, (n, cents)) in part {
            let e = expected.entry(customer).or_default();
            e.0 += n;
            e.1 += cents;
        }
    }
    assert!(
        eventually(std::time::Duration::from_secs(20), || caught_up(
            &pool,
            "customer-stats"
        ))
        .await,
        "the projector catches up"
    );
    let live = customer_stats(&pool).await;
    assert_eq!(live, stats_from_log(&pool).await);
    let counted: BTreeMap<String, (i64, i64)> = live
        .iter()
        .map(|(c, n, total, _, _)| (c.clone(), (*n, cents(total))))
        .collect();
    assert_eq!(counted, expected, "every acknowledged order counted once");
    assert_eq!(counted.values().map(|v| v.0).sum::<i64>(), 24 * 25);

    let (status, row, _) = get(&http, &stack, "/v1/projections/customer-stats/rows/c1").await;
    assert_eq!(status, 200);
    assert_eq!(row["orders_placed"], json!(expected["c1"].0));

    // Rebuilt from the log into version 2 while the stack runs, then
    // swapped in: the same figures.
    let mut manifest = eventplane_api::examples::customer_stats_manifest();
    manifest.spec.version = 2;
    let v2 = Projection::from_manifest(manifest);
    eventplane_store::catalog::apply(&pool, &v2.name, &v2.spec, "files")
        .await
        .unwrap();
    let options = RebuildOptions {
        batch_size: 37,
        ..RebuildOptions::from_spec(&v2.spec)
    };
    run(&pool, &v2, None, stack.metrics.clone(), &options)
        .await
        .unwrap();
    assert_eq!(customer_stats(&pool).await, live, "the rebuild agrees");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_stats_stays_exact_through_projector_kills_mid_batch() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    eventplane_store::db::migrate(&pool).await.unwrap();
    let manifest = eventplane_api::load_manifests(eventplane::dev::CUSTOMER_STATS_MANIFEST)
        .unwrap()
        .remove(0);
    eventplane_store::catalog::apply(&pool, "customer-stats", &manifest.spec, "cli")
        .await
        .unwrap();
    let mut projector = spawn_projector(&db, 5, 500);
    let mut rng = Lcg(17);
    for kill in 0..4 {
        // Orders keep arriving while the projector works through them.
        for i in 0..150 {
            let customer = format!("c{}", rng.next(4));
            let total = render_cents(rng.next(50_000) as i64);
            sqlx::query(
                "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES ($1, 1, 'OrderPlaced', $2)",
            )
            .bind(format!("order-{kill}-{i}"))
            .bind(json!({"orderId": format!("{kill}-{i}"), "customerId": customer, "total": total}))
            .execute(&pool)
            .await
            .unwrap();
        }
        // Kill it once it has applied some of this round, not all.
        let started = eventually(std::time::Duration::from_secs(20), || async {
            let applied: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(orders_placed), 0)::bigint FROM customer_stats",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
            applied > kill * 150
        })
        .await;
        assert!(started, "the projector applies round {kill}");
        unsafe { libc::kill(projector.id() as i32, libc::SIGKILL) };
        projector.wait().unwrap();
        projector = spawn_projector(&db, 5, 500);
    }
    assert!(
        eventually(std::time::Duration::from_secs(30), || caught_up(
            &pool,
            "customer-stats"
        ))
        .await,
        "the last projector catches up"
    );
    let _ = projector.kill();
    let _ = projector.wait();
    let live = customer_stats(&pool).await;
    assert_eq!(live, stats_from_log(&pool).await, "each order counted once");
    assert_eq!(live.iter().map(|r| r.1).sum::<i64>(), 4 * 150);
}
