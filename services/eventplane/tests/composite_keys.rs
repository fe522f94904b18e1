//! Composite keys against real Postgres and Redis: a random history over
//! rows named by (tenant, order id), applied in batches of random sizes and
//! again through a rebuild, equals a model applied event by event; the row
//! route addresses a row by one path segment per key column, its cache
//! entry is invalidated with the row, and bad keys are refused by name.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use eventplane::projector::rebuild::{RebuildOptions, run};
use eventplane_store::Projection;
use serde_json::{Value, json};
use sqlx::PgPool;

const SPEC: &str = r#"
apiVersion: eventplane.io/v1alpha1
kind: Projection
metadata: {name: tenant-orders}
spec:
  table: tenant_orders
  keys: [tenant, order_id]
  columns:
    - {name: tenant, type: text, nullable: false}
    - {name: order_id, type: bigint, nullable: false}
    - {name: status, type: text}
    - {name: items, type: bigint}
  handlers:
    - eventType: Placed
      op: upsert
      keys:
        - {column: order_id, fromFirst: [/data/orderId, /data/order_id]}
        - {column: tenant, from: /metadata/tenant}
      set:
        - {column: status, value: PENDING}
        - {column: items, op: add, value: "0"}
    - eventType: ItemAdded
      op: update
      keys:
        - {column: tenant, from: /metadata/tenant}
        - {column: order_id, from: /data/orderId}
      set: [{column: items, op: add}]
    - eventType: Cancelled
      op: delete
      keys:
        - {column: tenant, from: /metadata/tenant}
        - {column: order_id, from: /data/orderId}
  queries:
    - name: by_status
      filters: [status]
"#;

type Key = (String, i64);
type Model = BTreeMap<Key, (String, i64)>;

/// Tenants whose texts would collide if the key parts were joined
/// naively, or that need escaping in a URL.
const TENANTS: [&str; 4] = ["a", "a/b", "a\",\"1", "b"];

fn random_event(rng: &mut Lcg) -> (String, Value, Value) {
    let tenant = TENANTS[rng.next(4) as usize];
    let id = rng.next(3) as i64;
    let ty = ["Placed", "ItemAdded", "ItemAdded", "Cancelled"][rng.next(4) as usize];
    // Placed events of the old version spell the field order_id.
    let data = if ty == "Placed" && rng.next(2) == 0 {
        json!({"order_id": id})
    } else {
        json!({"orderId": id})
    };
    (ty.to_string(), data, json!({"tenant": tenant}))
}

fn model(rows: &mut Model, ty: &str, data: &Value, metadata: &Value) {
    let id = data
        .get("orderId")
        .or(data.get("order_id"))
        .and_then(Value::as_i64)
        .unwrap();
    let key = (metadata["tenant"].as_str().unwrap().to_string(), id);
    match ty {
        "Placed" => {
            let items = rows.get(&key).map_or(0, |r| r.1);
            rows.insert(key, ("PENDING".into(), items));
        }
        "ItemAdded" => {
            if let Some(r) = rows.get_mut(&key) {
                r.1 += 1;
            }
        }
        "Cancelled" => {
            rows.remove(&key);
        }
        other => panic!("unexpected {other}"),
    }
}

async fn table(pool: &PgPool) -> Model {
    let rows: Vec<(String, i64, String, i64)> =
        sqlx::query_as("SELECT tenant, order_id, status, items FROM tenant_orders")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(t, id, status, items)| ((t, id), (status, items)))
        .collect()
}

async fn catch_up(pool: &PgPool, projection: &mut Arc<Projection>, rng: &mut Lcg) {
    loop {
        let limit = 1 + rng.next(9) as i64;
        let outcome = eventplane_store::batch::apply_batch(pool, projection, limit)
            .await
            .unwrap();
        assert_eq!(outcome.dead_letters, 0, "every event maps");
        if !outcome.full {
            if caught_up(pool, "tenant-orders").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_composite_key_history_equals_the_model_live_and_rebuilt() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    eventplane_store::db::migrate(&pool).await.unwrap();
    let manifest = eventplane_api::load_manifests(SPEC).unwrap().remove(0);
    let v1 = Projection::from_manifest(manifest);
    eventplane_store::catalog::apply(&pool, "tenant-orders", &v1.spec, "files")
        .await
        .unwrap();
    let mut live = Arc::new(v1);
    let (mut rng, mut sizes) = (Lcg(3), Lcg(5));
    let mut expected = Model::new();
    for round in 0..5 {
        for i in 0..80 {
            let (ty, data, metadata) = random_event(&mut rng);
            model(&mut expected, &ty, &data, &metadata);
            sqlx::query(
                "INSERT INTO events (stream_id, stream_version, event_type, data, metadata) VALUES ($1, 1, $2, $3, $4)",
            )
            .bind(format!("s-{round}-{i}"))
            .bind(&ty)
            .bind(&data)
            .bind(&metadata)
            .execute(&pool)
            .await
            .unwrap();
        }
        catch_up(&pool, &mut live, &mut sizes).await;
        assert_eq!(table(&pool).await, expected, "after round {round}");
    }
    let tenants: std::collections::BTreeSet<&str> =
        expected.keys().map(|(t, _)| t.as_str()).collect();
    assert!(tenants.len() >= 3, "rows of several tenants: {expected:?}");

    let mut spec2 = live.spec.clone();
    spec2.version = 2;
    let v2 = Projection::live("tenant-orders".into(), spec2);
    eventplane_store::catalog::apply(&pool, "tenant-orders", &v2.spec, "files")
        .await
        .unwrap();
    let options = RebuildOptions {
        batch_size: 7,
        ..RebuildOptions::from_spec(&v2.spec)
    };
    run(
        &pool,
        &v2,
        None,
        eventplane::metrics::Metrics::new(),
        &options,
    )
    .await
    .unwrap();
    assert_eq!(table(&pool).await, expected, "the rebuild agrees");
    let primary_key: String = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'tenant_orders_v2'::regclass AND contype = 'p'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(primary_key, "PRIMARY KEY (tenant, order_id)");
}

fn event(ty: &str, id: i64, tenant: &str) -> Value {
    json!({"type": ty, "data": {"orderId": id}, "metadata": {"tenant": tenant}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_read_by_one_segment_per_key_column_and_invalidated_with_the_row() {
    let db = TestDb::new().await;
    let manifest = eventplane_api::load_manifests(SPEC).unwrap().remove(0);
    let stack = stack_with(local(&db.url, Some(&redis_url()), vec![manifest])).await;
    let http = client();
    for (stream, tenant) in [("o-1", "a/b"), ("o-2", "a")] {
        let (status, _) = append(
            &http,
            &stack,
            stream,
            json!("no_stream"),
            vec![event("Placed", 1, tenant), event("ItemAdded", 1, tenant)],
        )
        .await;
        assert_eq!(status, 201);
    }
    let path = "/v1/projections/tenant-orders/rows/a%2Fb/1";
    let arrived = eventually(Duration::from_secs(10), || async {
        get(&http, &stack, path).await.0 == 200
    })
    .await;
    assert!(arrived, "the row of tenant a/b is served");
    let (_, row, _) = get(&http, &stack, path).await;
    assert_eq!(
        row,
        json!({"tenant": "a/b", "order_id": 1, "status": "PENDING", "items": 1})
    );
    // The same order id of another tenant is another row (appended in
    // its own transaction, so it may be applied a batch later).
    let other_path = "/v1/projections/tenant-orders/rows/a/1";
    let arrived = eventually(Duration::from_secs(10), || async {
        get(&http, &stack, other_path).await.0 == 200
    })
    .await;
    assert!(arrived, "the row of tenant a is served");
    let (_, other, _) = get(&http, &stack, other_path).await;
    assert_eq!(other["tenant"], "a");
    // A leading zero is the same bigint: the same row, and the same cache
    // entry as the canonical spelling.
    let (_, again, layer) = get(&http, &stack, "/v1/projections/tenant-orders/rows/a%2Fb/01").await;
    assert_eq!(again, row);
    assert_ne!(layer.as_deref(), Some("l3"), "one cache entry per row");

    // A change to the row invalidates its cached answer.
    let (status, _) = append(
        &http,
        &stack,
        "o-1",
        json!(2),
        vec![event("ItemAdded", 1, "a/b")],
    )
    .await;
    assert_eq!(status, 201);
    let updated = eventually(Duration::from_secs(10), || async {
        get(&http, &stack, path).await.1["items"] == 2
    })
    .await;
    assert!(updated, "the cached row follows the change");
    let (_, other_now, _) = get(&http, &stack, "/v1/projections/tenant-orders/rows/a/1").await;
    assert_eq!(other_now["items"], 1, "the other tenant's row is untouched");

    for (bad, names) in [
        ("/v1/projections/tenant-orders/rows/a%2Fb", "2 column(s)"),
        ("/v1/projections/tenant-orders/rows/a/1/2", "2 column(s)"),
        ("/v1/projections/tenant-orders/rows/a/x", "order_id"),
    ] {
        let (status, body, _) = get(&http, &stack, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_key", "{bad}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(names), "{bad}: {body}");
    }
    let (status, body, _) = get(&http, &stack, "/v1/projections/tenant-orders/rows/a/404").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "row_not_found");
    stack.shutdown().await;
}
