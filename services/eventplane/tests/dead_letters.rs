//! Dead letters a client can act on: listed with the event and the reason,
//! counted with the oldest in the status, and replayed after the spec is
//! fixed: exactly once, in log order relative to each other; those that
//! still fail stay with their new reason. Also a rebuild of a projection
//! that has dead letters verifies.

mod common;

use std::time::Duration;

use common::*;
use eventplane_api::ProjectionManifest;
use eventplane_store::catalog;
use serde_json::{Value, json};

/// Places need a numeric total; shipments name their carrier.
const STRICT: &str = r#"
apiVersion: eventplane.io/v1alpha1
kind: Projection
metadata:
  name: shipments
spec:
  table: shipments
  key: id
  columns:
    - {name: id, type: text, nullable: false}
    - {name: status, type: text, nullable: false}
    - {name: total, type: numeric}
    - {name: carrier, type: text}
  handlers:
    - eventType: OrderPlaced
      op: upsert
      key: /data/orderId
      set:
        - {column: status, value: PENDING}
        - {column: total, from: /data/total}
    - eventType: OrderShipped
      op: update
      key: /data/orderId
      set:
        - {column: status, value: SHIPPED}
        - {column: carrier, from: /data/carrier}
  queries:
    - name: by_status
      filters: [status]
"#;

fn strict() -> ProjectionManifest {
    eventplane_api::load_manifests(STRICT).unwrap().remove(0)
}

/// The fix: a total that does not read as a number is left out, and a
/// shipment without a carrier is shipped by an unknown one.
fn fixed() -> ProjectionManifest {
    let yaml = STRICT
        .replace("        - {column: total, from: /data/total}\n", "")
        .replace(
            "{column: carrier, from: /data/carrier}",
            "{column: carrier, value: unknown}",
        );
    eventplane_api::load_manifests(&yaml).unwrap().remove(0)
}

fn event(kind: &str, data: Value) -> Value {
    json!({"type": kind, "data": data})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_listed_and_replayed_once_in_log_order_after_a_fix() {
    let db = TestDb::new().await;
    let stack = stack_with(local(&db.url, Some(&redis_url()), vec![strict()])).await;
    let http = client();
    // k1: placed with a bad total, then shipped without a carrier: both
    // dead. k2: placed fine, shipped without a carrier. k3: a bad total.
    let writes = [
        (
            "order-k1",
            event("OrderPlaced", json!({"orderId": "k1", "total": "lots"})),
        ),
        (
            "order-k2",
            event("OrderPlaced", json!({"orderId": "k2", "total": "2.50"})),
        ),
        ("order-k1", event("OrderShipped", json!({"orderId": "k1"}))),
        ("order-k2", event("OrderShipped", json!({"orderId": "k2"}))),
        (
            "order-k3",
            event("OrderPlaced", json!({"orderId": "k3", "total": {"n": 1}})),
        ),
    ];
    let mut token = String::new();
    for (stream, e) in writes {
        let (status, body) = append(&http, &stack, stream, json!("any"), vec![e]).await;
        assert_eq!(status, 201, "{body}");
        token = body["token"].as_str().unwrap().to_string();
    }
    // Waits until the projection has passed the last append.
    get(
        &http,
        &stack,
        &format!("/v1/projections/shipments/rows/k2?token={token}"),
    )
    .await;

    let (_, status, _) = get(&http, &stack, "/v1/projections/shipments/status").await;
    assert_eq!(status["deadLetters"], 4, "{status}");
    assert!(status["oldestDeadLetterAt"].is_string(), "{status}");

    // Listed in log order, paged, each with its event and reason.
    let (code, first, _) = get(
        &http,
        &stack,
        "/v1/projections/shipments/dead-letters?limit=3",
    )
    .await;
    assert_eq!(code, 200, "{first}");
    let items = first["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["event"]["data"]["orderId"], "k1");
    assert_eq!(items[0]["event"]["type"], "OrderPlaced");
    assert!(
        items[0]["reason"].as_str().unwrap().contains("/data/total"),
        "{}",
        items[0]
    );
    assert_eq!(items[1]["event"]["type"], "OrderShipped");
    assert!(
        items[1]["reason"]
            .as_str()
            .unwrap()
            .contains("/data/carrier")
    );
    let next = first["next"].as_i64().expect("a next page");
    let (_, second, _) = get(
        &http,
        &stack,
        &format!("/v1/projections/shipments/dead-letters?limit=3&after={next}"),
    )
    .await;
    let rest = second["items"].as_array().unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["event"]["data"]["orderId"], "k3");
    assert!(second["next"].is_null());

    // Replaying before the fix changes nothing.
    let replay = |http: reqwest::Client, url: String| async move {
        let response = http.post(url).send().await.unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    };
    let url = stack.url("/v1/projections/shipments/dead-letters/replay");
    let (code, body) = replay(http.clone(), url.clone()).await;
    assert_eq!(
        (code, &body["applied"], &body["stillDead"]),
        (200, &json!(0), &json!(4)),
        "{body}"
    );

    // The fix, declared in place (same version), then the replay.
    let pool = db.pool().await;
    let fix = fixed();
    catalog::apply(&pool, "shipments", &fix.spec, "files")
        .await
        .unwrap();
    let (code, body) = replay(http.clone(), url.clone()).await;
    assert_eq!(
        (code, &body["applied"], &body["stillDead"]),
        (200, &json!(4), &json!(0)),
        "{body}"
    );
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT id, status, carrier FROM shipments ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            ("k1".into(), "SHIPPED".into(), Some("unknown".into())),
            ("k2".into(), "SHIPPED".into(), Some("unknown".into())),
            ("k3".into(), "PENDING".into(), None),
        ],
        "k1 placed then shipped: the replay kept the log's order"
    );
    // Served fresh, not from a cache filled before the replay.
    let cached = eventually(Duration::from_secs(5), || async {
        let (code, row, _) = get(&http, &stack, "/v1/projections/shipments/rows/k1").await;
        code == 200 && row["status"] == "SHIPPED"
    })
    .await;
    assert!(cached);
    // Exactly once: nothing left to replay.
    let (_, body) = replay(http.clone(), url).await;
    assert_eq!(body["applied"], 0);
    let (_, status, _) = get(&http, &stack, "/v1/projections/shipments/status").await;
    assert_eq!(status["deadLetters"], 0);
    assert!(status.get("oldestDeadLetterAt").is_none(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_needs_its_own_scope_and_a_served_projection() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let response = http
        .post(stack.url("/v1/projections/nope/dead-letters/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let (code, body, _) = get(&http, &stack, "/v1/projections/orders/dead-letters?limit=0").await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("invalid_limit"))
    );
    let (code, body, _) = get(&http, &stack, "/v1/projections/orders/dead-letters?x=1").await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("unknown_parameter"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projection_with_dead_letters_rebuilds_and_verifies() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    for n in 0..10 {
        let total = if n % 3 == 0 {
            json!("oops")
        } else {
            json!("1.00")
        };
        let placed = json!({"type": "OrderPlaced", "data": {"orderId": format!("r{n}"), "customerId": "c", "total": total}});
        let (status, _) = append(
            &http,
            &stack,
            &format!("order-r{n}"),
            json!("any"),
            vec![placed],
        )
        .await;
        assert_eq!(status, 201);
    }
    let pool = db.pool().await;
    assert!(eventually(Duration::from_secs(10), || caught_up(&pool, "orders")).await);
    let mut v2 = orders().remove(0);
    v2.spec.version = 2;
    catalog::apply(&pool, "orders", &v2.spec, "files")
        .await
        .unwrap();
    let swapped = eventually(Duration::from_secs(20), || async {
        count(
            &pool,
            "SELECT count(*) FROM projection_versions WHERE projection = 'orders' AND version = 2 AND state = 'active'",
        )
        .await
            == 1
    })
    .await;
    assert!(
        swapped,
        "the rebuild verified and swapped in despite the dead letters"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM orders").await, 6);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM projection_dead_letters WHERE projection = 'orders'"
        )
        .await,
        4,
        "the new version's dead letters are the live ones now"
    );
}
