//! The query service against real Postgres and Redis: cache layers and
//! their invalidation, Redis outages, read-your-writes, pagination and bad
//! parameters.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use eventplane::server::Stack;
use serde_json::{Value, json};

/// A Redis server of the test's own, so stopping it affects no other test.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = free_port();
        let mut redis = OwnRedis { port, child: None };
        redis.restart();
        redis
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn place(
    http: &reqwest::Client,
    stack: &Stack,
    order: &str,
    customer: &str,
    total: &str,
) -> String {
    let (status, body) = append(
        http,
        stack,
        &format!("order-{order}"),
        json!("any"),
        vec![placed(order, customer, total)],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_string()
}

async fn pay(http: &reqwest::Client, stack: &Stack, order: &str) -> String {
    let event = json!({"type": "OrderPaid", "data": {"orderId": order}});
    let (status, body) = append(
        http,
        stack,
        &format!("order-{order}"),
        json!("any"),
        vec![event],
    )
    .await;
    assert_eq!(status, 201);
    body["token"].as_str().unwrap().to_string()
}

/// The text Redis holds under `key`, if any.
async fn redis_get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

async fn live(stack: &Stack) {
    // The invalidation subscription comes up asynchronously.
    let http = client();
    assert!(
        eventually(Duration::from_secs(5), || {
            let http = &http;
            async move {
                let text = http
                    .get(stack.admin_url("/metrics"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                text.contains("cache_hit_rate")
            }
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_invalidates_the_row_and_its_lists_in_l1_and_l2() {
    let db = TestDb::new().await;
    let redis = OwnRedis::start();
    let stack = stack_with(local(&db.url, Some(&redis.url()), orders())).await;
    live(&stack).await;
    let http = client();
    let token = place(&http, &stack, "a1", "cust-a", "10").await;

    let (status, row, layer) = get(
        &http,
        &stack,
        &format!("/v1/projections/orders/rows/a1?token={token}"),
    )
    .await;
    assert_eq!((status, layer.as_deref()), (200, Some("l3")));
    assert_eq!(row["status"], "PENDING");
    let (_, _, layer) = get(&http, &stack, "/v1/projections/orders/rows/a1").await;
    assert_ne!(
        layer.as_deref(),
        Some("l1"),
        "the first cached read loads from a lower layer"
    );
    // The invalidation of the write above may still be on its way and empty
    // L1 once more; after it, reads come from L1.
    let from_l1 = eventually(Duration::from_secs(2), || {
        let (http, stack) = (&http, &stack);
        async move {
            get(http, stack, "/v1/projections/orders/rows/a1")
                .await
                .2
                .as_deref()
                == Some("l1")
        }
    })
    .await;
    assert!(from_l1, "repeated reads are answered by L1");
    let list = "/v1/projections/orders/queries/by_customer?customer_id=cust-a";
    let (_, page, _) = get(&http, &stack, list).await;
    assert_eq!(page["items"][0]["status"], "PENDING");
    let list_from_l1 = eventually(Duration::from_secs(2), || {
        let (http, stack) = (&http, &stack);
        async move { get(http, stack, list).await.2.as_deref() == Some("l1") }
    })
    .await;
    assert!(list_from_l1, "repeated list reads are answered by L1");

    let token = pay(&http, &stack, "a1").await;
    let (_, row, _) = get(
        &http,
        &stack,
        &format!("/v1/projections/orders/rows/a1?token={token}"),
    )
    .await;
    assert_eq!(row["status"], "PAID");
    // Without a token the caches must not serve the old row for long: the
    // invalidation follows the projector's commit.
    let fresh = eventually(Duration::from_secs(2), || {
        let http = &http;
        let stack = &stack;
        async move {
            let (_, row, _) = get(http, stack, "/v1/projections/orders/rows/a1").await;
            let (_, page, _) = get(http, stack, list).await;
            row["status"] == "PAID" && page["items"][0]["status"] == "PAID"
        }
    })
    .await;
    assert!(fresh, "row and list caches were invalidated");
    // An L1 hit here means the row was loaded after the last invalidation,
    // so its L2 fill was not refused as stale.
    let settled = eventually(Duration::from_secs(2), || {
        let (http, stack) = (&http, &stack);
        async move {
            get(http, stack, "/v1/projections/orders/rows/a1")
                .await
                .2
                .as_deref()
                == Some("l1")
        }
    })
    .await;
    assert!(settled);

    // L2 alone: a second query process with its own empty L1 gets the new
    // row from Redis, never the old one.
    let mut second = local(&db.url, Some(&redis.url()), orders());
    second.roles = eventplane::server::Roles {
        command: false,
        projector: false,
        query: true,
    };
    let reader = stack_with(second).await;
    live(&reader).await;
    let (_, row, layer) = get(&http, &reader, "/v1/projections/orders/rows/a1").await;
    assert_eq!(row["status"], "PAID");
    assert_eq!(layer.as_deref(), Some("l2"), "the first process filled L2");
    pay(&http, &stack, "a1").await;
    let shipped = json!({"type": "OrderShipped", "data": {"orderId": "a1"}});
    let (_, body) = append(&http, &stack, "order-a1", json!("any"), vec![shipped]).await;
    let token = body["token"].as_str().unwrap();
    get(
        &http,
        &stack,
        &format!("/v1/projections/orders/rows/a1?token={token}"),
    )
    .await;
    let shipped_seen =
        eventually(Duration::from_secs(2), || {
            let (http, reader) = (&http, &reader);
            async move {
                get(http, reader, "/v1/projections/orders/rows/a1").await.1["status"] == "SHIPPED"
            }
        })
        .await;
    assert!(
        shipped_seen,
        "the other process's L1 and the shared L2 were invalidated"
    );
}

/// L2 fills are queued and written in batches by EVALSHA; a Redis that
/// lost its scripts (a restart, `SCRIPT FLUSH`) gets the script again and
/// the fills still land, for another process to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn l2_fills_land_after_redis_forgets_the_fill_script() {
    let db = TestDb::new().await;
    let redis = OwnRedis::start();
    let stack = stack_with(local(&db.url, Some(&redis.url()), orders())).await;
    live(&stack).await;
    let http = client();
    for order in ["f1", "f2"] {
        let token = place(&http, &stack, order, "cust-f", "4").await;
        get(
            &http,
            &stack,
            &format!("/v1/projections/orders/rows/{order}?token={token}"),
        )
        .await;
    }
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut second = local(&db.url, Some(&redis.url()), orders());
    second.roles = eventplane::server::Roles {
        command: false,
        projector: false,
        query: true,
    };
    let reader = stack_with(second).await;
    live(&reader).await;
    for order in ["f1", "f2"] {
        let path = format!("/v1/projections/orders/rows/{order}");
        let (status, _, layer) = get(&http, &stack, &path).await;
        assert_eq!((status, layer.as_deref()), (200, Some("l3")));
        let filled = eventually(Duration::from_secs(5), || {
            let (http, reader, path) = (&http, &reader, &path);
            async move { get(http, reader, path).await.2.as_deref() == Some("l2") }
        })
        .await;
        assert!(filled, "{order} reached L2 for the other process");
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_go_on_from_postgres_while_redis_is_down_and_caching_returns_after() {
    let db = TestDb::new().await;
    let mut redis = OwnRedis::start();
    let stack = stack_with(local(&db.url, Some(&redis.url()), orders())).await;
    live(&stack).await;
    let http = client();
    let token = place(&http, &stack, "r1", "cust-r", "1").await;
    get(
        &http,
        &stack,
        &format!("/v1/projections/orders/rows/r1?token={token}"),
    )
    .await;
    get(&http, &stack, "/v1/projections/orders/rows/r1").await;

    redis.stop();
    // L1 is dropped and bypassed once the subscription is lost.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let token = pay(&http, &stack, "r1").await;
    get(
        &http,
        &stack,
        &format!("/v1/projections/orders/rows/r1?token={token}"),
    )
    .await;
    for _ in 0..20 {
        let (status, row, layer) = get(&http, &stack, "/v1/projections/orders/rows/r1").await;
        assert_eq!(status, 200);
        assert_eq!(
            row["status"], "PAID",
            "no stale read while invalidations cannot arrive"
        );
        assert_eq!(layer.as_deref(), Some("l3"));
        let (status, page, _) = get(
            &http,
            &stack,
            "/v1/projections/orders/queries/by_customer?customer_id=cust-r",
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(page["items"].as_array().unwrap().len(), 1);
    }
    let metrics = stack.metrics.encode();
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("redis_errors_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(errors > 0.0, "the outage is visible in the metrics");

    redis.restart();
    let cached_again = eventually(Duration::from_secs(10), || {
        let (http, stack) = (&http, &stack);
        async move {
            get(http, stack, "/v1/projections/orders/rows/r1")
                .await
                .2
                .as_deref()
                == Some("l1")
        }
    })
    .await;
    assert!(cached_again, "caching resumes when Redis is back");
    let (_, row, _) = get(&http, &stack, "/v1/projections/orders/rows/r1").await;
    assert_eq!(row["status"], "PAID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_waits_for_the_projection_and_times_out_clearly() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    for i in 0..20 {
        let token = place(&http, &stack, &format!("t{i}"), "cust-t", "2").await;
        let (status, row, _) = get(
            &http,
            &stack,
            &format!("/v1/projections/orders/rows/t{i}?token={token}"),
        )
        .await;
        assert_eq!(status, 200, "read-your-writes sees the order at once");
        assert_eq!(row["id"], format!("t{i}"));
    }
    let (status, body, _) = get(
        &http,
        &stack,
        "/v1/projections/orders/rows/t1?token=99999999999.1",
    )
    .await;
    assert_eq!(status, 504);
    assert_eq!(body["error"]["code"], "consistency_timeout");
    let (status, body, _) = get(&http, &stack, "/v1/projections/orders/rows/t1?token=abc").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_queries_page_with_an_opaque_cursor_and_enforce_their_declaration() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let mut token = String::new();
    for i in 0..25 {
        token = place(
            &http,
            &stack,
            &format!("p{i:02}"),
            "cust-p",
            &format!("{i}.5"),
        )
        .await;
    }
    place(&http, &stack, "other", "cust-q", "1").await;
    let base = "/v1/projections/orders/queries/by_customer?customer_id=cust-p";
    let (status, _, _) = get(&http, &stack, &format!("{base}&limit=1&token={token}")).await;
    assert_eq!(status, 200);

    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &next {
            Some(cursor) => format!("{base}&limit=10&after={cursor}"),
            None => format!("{base}&limit=10"),
        };
        let (status, page, _) = get(&http, &stack, &path).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            assert_eq!(item["customer_id"], "cust-p");
            seen.push((
                item["created_at"].as_str().unwrap().to_string(),
                item["id"].as_str().unwrap().to_string(),
            ));
        }
        match page["next"].as_str() {
            Some(cursor) => next = Some(cursor.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    let unique: HashSet<&String> = seen.iter().map(|(_, id)| id).collect();
    assert_eq!(unique.len(), 25, "no row twice across pages");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first, as declared");

    let bad: Vec<(String, u16, &str)> = vec![
        (format!("{base}&limit=0"), 400, "invalid_limit"),
        (format!("{base}&limit=501"), 400, "invalid_limit"),
        (format!("{base}&after=not-a-cursor"), 400, "invalid_cursor"),
        (format!("{base}&status=PAID"), 400, "unknown_parameter"),
        (
            "/v1/projections/orders/queries/by_customer".into(),
            400,
            "missing_filter",
        ),
        (
            "/v1/projections/orders/queries/everything".into(),
            404,
            "query_not_found",
        ),
        (
            "/v1/projections/nope/queries/by_customer".into(),
            404,
            "projection_not_found",
        ),
        (
            "/v1/projections/orders/rows/p01?color=red".into(),
            400,
            "unknown_parameter",
        ),
        (
            "/v1/projections/orders/rows/missing".into(),
            404,
            "row_not_found",
        ),
    ];
    for (path, status, code) in bad {
        let (got, body, _) = get(&http, &stack, &path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert_eq!(body["error"]["code"], code, "{path}");
    }
    let (_, listing, _) = get(&http, &stack, "/v1/projections").await;
    assert_eq!(listing["projections"], json!(["orders"]));
    let _: Value = listing;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_on_one_key_load_once() {
    let db = TestDb::new().await;
    let redis = OwnRedis::start();
    let stack = stack_with(local(&db.url, Some(&redis.url()), orders())).await;
    live(&stack).await;
    let http = client();
    let token = place(&http, &stack, "hot", "cust-h", "9").await;
    get(
        &http,
        &stack,
        &format!("/v1/projections/orders/rows/other?token={token}"),
    )
    .await;
    // Let the write's invalidation (which empties L1) land first: it is
    // published together with the generation bump.
    let client = redis::Client::open(redis.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let scope = eventplane::invalidation::Scope::new(
        &eventplane_store::db::instance_id(&stack.pool)
            .await
            .unwrap(),
    );
    let generation_key = scope.generation_key("orders");
    let published = eventually(Duration::from_secs(5), || {
        let (mut conn, generation_key) = (conn.clone(), generation_key.clone());
        async move { redis_get(&mut conn, &generation_key).await.is_some() }
    })
    .await;
    assert!(published);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reads = (0..40).map(|_| {
        let http = http.clone();
        let url = stack.url("/v1/projections/orders/rows/hot");
        async move {
            let response = http.get(url).send().await.unwrap();
            response.headers()["eventplane-cache"]
                .to_str()
                .unwrap()
                .to_string()
        }
    });
    let layers = futures::future::join_all(reads).await;
    let loads = layers.iter().filter(|l| l.as_str() != "l1").count();
    assert_eq!(loads, 1, "one load, the rest waited for it: {layers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_over_the_slow_query_threshold_are_counted() {
    let db = TestDb::new().await;
    let mut config = local(&db.url, None, orders());
    config.query.slow_query = Duration::ZERO;
    let stack = stack_with(config).await;
    let http = client();
    place(&http, &stack, "s1", "cust-s", "1").await;
    get(&http, &stack, "/v1/projections/orders/rows/s1").await;
    get(
        &http,
        &stack,
        "/v1/projections/orders/queries/by_customer?customer_id=cust-s",
    )
    .await;
    let text = stack.metrics.encode();
    for query_type in ["row", "list"] {
        let line = format!("slow_queries_total{{query_type=\"{query_type}\"}} ");
        let count: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(count >= 1.0, "{query_type} reads were counted:\n{text}");
    }
}

/// The sample with an L1 TTL long enough that a stale entry would outlive
/// the test: only invalidation can make a read current.
fn long_lived_cache() -> Vec<eventplane_api::ProjectionManifest> {
    let mut manifest = orders().remove(0);
    manifest.spec.cache.l1_ttl_ms = 600_000;
    vec![manifest]
}

async fn list_ids(http: &reqwest::Client, stack: &Stack, customer: &str) -> HashSet<String> {
    let (status, page, _) = get(
        http,
        stack,
        &format!("/v1/projections/orders/queries/by_customer?customer_id={customer}"),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["id"].as_str().unwrap().to_string())
        .collect()
}

/// Until `ids` are all listed; then the list must keep them.
async fn lists_and_keeps(http: &reqwest::Client, stack: &Stack, customer: &str, ids: &[&str]) {
    let want: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    let listed = eventually(Duration::from_secs(5), || async {
        list_ids(http, stack, customer).await.is_superset(&want)
    })
    .await;
    assert!(
        listed,
        "the list shows {ids:?}: {:?}",
        list_ids(http, stack, customer).await
    );
    for _ in 0..20 {
        assert!(
            list_ids(http, stack, customer).await.is_superset(&want),
            "a stale list came back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lists_stay_current_after_redis_restarts_empty() {
    let db = TestDb::new().await;
    let mut redis = OwnRedis::start();
    let stack = stack_with(local(&db.url, Some(&redis.url()), long_lived_cache())).await;
    live(&stack).await;
    let http = client();
    // Several writes move the list generation well past 1.
    for n in 0..5 {
        place(&http, &stack, &format!("e{n}"), "cust-e", "1").await;
    }
    lists_and_keeps(&http, &stack, "cust-e", &["e0", "e4"]).await;

    redis.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart();
    live(&stack).await;
    let back = eventually(Duration::from_secs(10), || async {
        get(&http, &stack, "/v1/projections/orders/rows/e0")
            .await
            .2
            .as_deref()
            == Some("l1")
    })
    .await;
    assert!(back, "caching resumed on the empty Redis");
    // The counters start again from nothing in Redis; cached lists must
    // still follow every write.
    for n in 5..8 {
        place(&http, &stack, &format!("e{n}"), "cust-e", "1").await;
        lists_and_keeps(&http, &stack, "cust-e", &[&format!("e{n}")]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_databases_sharing_one_redis_never_see_each_others_rows() {
    let (db_a, db_b) = (TestDb::new().await, TestDb::new().await);
    let redis = OwnRedis::start();
    let a = stack_with(local(&db_a.url, Some(&redis.url()), long_lived_cache())).await;
    let b = stack_with(local(&db_b.url, Some(&redis.url()), long_lived_cache())).await;
    live(&a).await;
    live(&b).await;
    let http = client();
    // The same projection, key and customer in both, with other values.
    let token_a = place(&http, &a, "same", "cust-t", "1.00").await;
    let token_b = place(&http, &b, "same", "cust-t", "2.00").await;
    get(
        &http,
        &a,
        &format!("/v1/projections/orders/rows/same?token={token_a}"),
    )
    .await;
    get(
        &http,
        &b,
        &format!("/v1/projections/orders/rows/same?token={token_b}"),
    )
    .await;
    place(&http, &b, "only-b", "cust-t", "3.00").await;
    lists_and_keeps(&http, &b, "cust-t", &["same", "only-b"]).await;
    for _ in 0..20 {
        for (stack, total) in [(&a, 1.0), (&b, 2.0)] {
            let (status, row, _) = get(&http, stack, "/v1/projections/orders/rows/same").await;
            assert_eq!(status, 200);
            assert_eq!(row["total"].as_f64(), Some(total), "{row}");
        }
        assert_eq!(
            list_ids(&http, &a, "cust-t").await,
            HashSet::from(["same".to_string()]),
            "database A never lists B's rows"
        );
    }
    let (_, _, layer) = get(&http, &a, "/v1/projections/orders/rows/same").await;
    assert_eq!(
        layer.as_deref(),
        Some("l1"),
        "the reads were cached, not only loaded"
    );
}

/// One batch of L2 fills goes to Redis as one script call, which must still
/// judge each fill on its own: a fill whose read an invalidation overtook
/// (an older generation) or whose epoch Redis has left is dropped, and the
/// others of the same batch land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_l2_fills_stores_only_the_fills_no_invalidation_overtook() {
    use bytes::Bytes;
    use eventplane::query::cache::{CacheBus, Cached, ProjectionCache};
    use std::sync::Arc;

    let redis = OwnRedis::start();
    let target = eventplane::redis_conn::RedisTarget::parse(&redis.url()).unwrap();
    let conn = eventplane::redis_conn::connect(&target).await.unwrap();
    let scope = eventplane::invalidation::Scope::new("fill-batch-test");
    let bus = CacheBus::new(
        scope.clone(),
        Some(conn.clone()),
        eventplane::metrics::Metrics::new(),
    );
    let cache = Arc::new(ProjectionCache::new(
        "orders",
        &eventplane_api::CacheSpec::default(),
        1 << 20,
    ));
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::pipe()
        .set(scope.generation_key("orders"), 5)
        .ignore()
        .set(scope.epoch_key("orders"), 2)
        .ignore()
        .query_async(&mut admin)
        .await
        .unwrap();
    let row =
        |body: &'static str| -> Cached { Arc::new(Some(Bytes::from_static(body.as_bytes()))) };
    let key = |name: &str| scope.row_key("orders", 1, 2, name);
    // The last fill queued is a current one: once it is in Redis, every
    // fill before it has been judged.
    let fills = [
        ("overtaken", 4, 2, row("{\"v\":\"overtaken\"}")),
        ("current-a", 5, 2, row("{\"v\":\"a\"}")),
        ("old-epoch", 5, 1, row("{\"v\":\"old-epoch\"}")),
        ("absent", 5, 2, Arc::new(None)),
        ("current-b", 5, 2, row("{\"v\":\"b\"}")),
    ];
    for (name, generation, epoch, value) in &fills {
        bus.l2_fill(&cache, key(name), *epoch, *generation, value);
    }
    let last = key("current-b");
    let landed = eventually(Duration::from_secs(5), || {
        let (mut admin, last) = (admin.clone(), last.clone());
        async move { redis_get(&mut admin, &last).await.is_some() }
    })
    .await;
    assert!(landed, "the current fills were written");
    let mut stored = Vec::new();
    for (name, ..) in &fills {
        stored.push((*name, redis_get(&mut admin, &key(name)).await));
    }
    assert_eq!(
        stored,
        vec![
            ("overtaken", None),
            ("current-a", Some("1{\"v\":\"a\"}".to_string())),
            ("old-epoch", None),
            ("absent", Some("0".to_string())),
            ("current-b", Some("1{\"v\":\"b\"}".to_string())),
        ],
        "each fill judged on its own generation and epoch"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(key("current-a"))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(ttl > 0, "a fill carries the L2 TTL, got {ttl}");
}
