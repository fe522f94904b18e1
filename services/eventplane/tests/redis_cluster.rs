//! L2 and invalidations on a real Redis Cluster: the shared 3-master
//! cluster `tests/ensure-redis-cluster.sh` keeps on 127.0.0.1:7000-7002,
//! and one a test makes for itself so it can kill a node.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use eventplane::invalidation::Scope;
use eventplane::server::{Roles, Stack};
use redis::AsyncCommands;
use serde_json::json;

fn shared_cluster_url() -> String {
    std::env::var("EVENTPLANE_REDIS_CLUSTER_URL")
        .unwrap_or_else(|_| "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002".into())
}

async fn cluster(url: &str) -> redis::cluster_async::ClusterConnection {
    let nodes = match eventplane::redis_conn::RedisTarget::parse(url).unwrap() {
        eventplane::redis_conn::RedisTarget::Cluster(nodes) => nodes,
        other => panic!("not a cluster URL: {other:?}"),
    };
    redis::cluster::ClusterClient::new(nodes)
        .unwrap()
        .get_async_connection()
        .await
        .expect("the Redis Cluster is up (tests/ensure-redis-cluster.sh starts one)")
}

async fn slot(conn: &mut redis::cluster_async::ClusterConnection, key: &str) -> i64 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_projections_keys_live_in_the_slot_of_their_hash_tag() {
    let db = TestDb::new().await;
    let url = shared_cluster_url();
    let stack = stack_with(local(&db.url, Some(&url), orders())).await;
    let http = client();
    append(
        &http,
        &stack,
        "order-k1",
        json!("no_stream"),
        vec![placed("k1", "c1", "5")],
    )
    .await;
    let pool = db.pool().await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);
    // Reads fill L2 on the cluster once the subscription is live (an L1
    // hit shows a fill happened).
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(&http, &stack, "/v1/projections/orders/rows/k1")
                .await
                .2
                .as_deref()
                == Some("l1")
        })
        .await
    );

    let scope = Scope::new(&eventplane_store::db::instance_id(&pool).await.unwrap());
    let mut conn = cluster(&url).await;
    let keys = [
        scope.generation_key("orders"),
        scope.epoch_key("orders"),
        scope.row_key("orders", 1, 42, "k1"),
        scope.list_key("orders", 1, 42, 7, "by_customer", "abc"),
    ];
    let tag = format!(
        "{}:orders",
        eventplane_store::db::instance_id(&pool).await.unwrap()
    );
    let expected = slot(&mut conn, &tag).await;
    for key in &keys {
        assert_eq!(
            slot(&mut conn, key).await,
            expected,
            "{key} is in the tag's slot"
        );
    }
    // The keys the stack really wrote are there, in that slot.
    let epoch: Option<u64> = conn.get(scope.epoch_key("orders")).await.unwrap();
    let epoch = epoch.expect("the projector set an epoch on the cluster");
    let row_key = scope.row_key("orders", 1, epoch, "k1");
    assert!(
        eventually(Duration::from_secs(5), || {
            let (mut conn, row_key) = (conn.clone(), row_key.clone());
            async move { conn.exists::<_, bool>(&row_key).await.unwrap() }
        })
        .await,
        "the row was cached under {row_key}"
    );
    let in_slot: i64 = redis::cmd("CLUSTER")
        .arg("COUNTKEYSINSLOT")
        .arg(expected)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        in_slot >= 3,
        "epoch, generation and row keys share the slot ({in_slot})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_invalidate_rows_and_lists_in_every_query_process_on_the_cluster() {
    let db = TestDb::new().await;
    let url = shared_cluster_url();
    let writer = stack_with(local(&db.url, Some(&url), orders())).await;
    let mut config = local(&db.url, Some(&url), orders());
    config.roles = Roles {
        command: false,
        projector: false,
        query: true,
    };
    let reader = stack_with(config).await;
    let http = client();
    append(
        &http,
        &writer,
        "order-i1",
        json!("no_stream"),
        vec![placed("i1", "ci", "5")],
    )
    .await;
    let pool = db.pool().await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);

    let row = "/v1/projections/orders/rows/i1";
    let list = "/v1/projections/orders/queries/by_customer?customer_id=ci&limit=5";
    for stack in [&writer, &reader] {
        // Until a process's subscription is live it reads Postgres; then
        // it caches.
        assert!(
            eventually(Duration::from_secs(10), || async {
                let (_, _, layer) = get(&http, stack, row).await;
                matches!(layer.as_deref(), Some("l1"))
            })
            .await,
            "{} caches the row",
            stack.url("")
        );
        get(&http, stack, list).await;
    }

    append(
        &http,
        &writer,
        "order-i1",
        json!(1),
        vec![json!({"type": "OrderPaid", "data": {"orderId": "i1"}})],
    )
    .await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);
    for stack in [&writer, &reader] {
        assert!(
            eventually(Duration::from_secs(5), || async {
                let (_, row, _) = get(&http, stack, row).await;
                let (_, page, _) = get(&http, stack, list).await;
                row["status"] == "PAID" && page["items"][0]["status"] == "PAID"
            })
            .await,
            "{} serves the paid order from row and list",
            stack.url("")
        );
    }
}

/// A 3-master cluster of the test's own on free ports.
struct OwnCluster {
    dir: PathBuf,
    ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
}

impl OwnCluster {
    fn start() -> OwnCluster {
        let dir =
            std::env::temp_dir().join(format!("ep-cluster-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        // Cluster bus ports are the data port + 10000: keep both free, and
        // both below the ephemeral range.
        let ports: Vec<u16> = (0..3)
            .map(|_| {
                loop {
                    let port = free_port_in(10_000..EPHEMERAL_START - 10_000);
                    if std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
                        break port;
                    }
                }
            })
            .collect();
        let mut cluster = OwnCluster {
            dir,
            ports,
            nodes: Vec::new(),
        };
        for i in 0..3 {
            let child = cluster.spawn(i);
            cluster.nodes.push(Some(child));
        }
        for port in &cluster.ports {
            wait_for_ping(*port);
        }
        let hosts: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&hosts)
            .arg("--cluster-yes")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "redis-cli --cluster create");
        assert!(
            cluster.wait_healthy(Duration::from_secs(20)),
            "own cluster healthy"
        );
        cluster
    }

    fn spawn(&self, i: usize) -> Child {
        let port = self.ports[i];
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .arg("--cluster-config-file")
            .arg(self.dir.join(format!("nodes-{port}.conf")))
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs")
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    fn healthy(&self) -> bool {
        self.ports.iter().enumerate().all(|(i, port)| {
            self.nodes[i].is_none()
                || Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        })
    }

    fn wait_healthy(&self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if self.healthy() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self, i: usize) {
        let child = self.spawn(i);
        self.nodes[i] = Some(child);
        wait_for_ping(self.ports[i]);
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for_ping(port: u16) {
    for _ in 0..100 {
        let pong = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"PONG"));
        if pong {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis-server on port {port} did not answer");
}

async fn status_of(http: &reqwest::Client, stack: &Stack, id: &str) -> (u16, String, String) {
    let (code, row, layer) = get(http, stack, &format!("/v1/projections/orders/rows/{id}")).await;
    (
        code,
        row["status"].as_str().unwrap_or_default().to_string(),
        layer.unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_node_down_sends_reads_to_postgres_never_stale_and_caching_resumes() {
    let mut own = OwnCluster::start();
    let db = TestDb::new().await;
    let stack = stack_with(local(&db.url, Some(&own.url()), orders())).await;
    let http = client();
    append(
        &http,
        &stack,
        "order-n1",
        json!("no_stream"),
        vec![placed("n1", "cn", "5")],
    )
    .await;
    let pool = db.pool().await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);
    assert!(
        eventually(Duration::from_secs(10), || async {
            status_of(&http, &stack, "n1").await.2 == "l1"
        })
        .await,
        "the row is cached in L1"
    );

    // A master goes away: with full coverage required, the cluster refuses
    // every key until it is back.
    own.kill(1);
    assert!(
        eventually(Duration::from_secs(10), || async {
            let out = Command::new("redis-cli")
                .args(["-p", &own.ports[0].to_string(), "cluster", "info"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("cluster_state:fail")
        })
        .await,
        "the cluster notices the lost master"
    );
    let (status, _) = append(
        &http,
        &stack,
        "order-n1",
        json!(1),
        vec![json!({"type": "OrderPaid", "data": {"orderId": "n1"}})],
    )
    .await;
    assert_eq!(status, 201, "commands do not need Redis");
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);
    // The L1 flush is published right after the failed invalidation; give
    // it a moment, then every read must be the new row, never the cached one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        let (code, status, layer) = status_of(&http, &stack, "n1").await;
        assert_eq!(code, 200, "reads keep succeeding while the cluster is down");
        assert_eq!(status, "PAID", "never stale (answered by {layer})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The node comes back (empty): the cluster heals and caching resumes.
    own.restart(1);
    assert!(
        own.wait_healthy(Duration::from_secs(30)),
        "the cluster heals"
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            let (code, status, layer) = status_of(&http, &stack, "n1").await;
            assert_eq!((code, status.as_str()), (200, "PAID"));
            layer == "l1" || layer == "l2"
        })
        .await,
        "caching resumes once the cluster is healthy"
    );
    // And invalidation works again end to end.
    append(
        &http,
        &stack,
        "order-n1",
        json!(2),
        vec![json!({"type": "OrderShipped", "data": {"orderId": "n1"}})],
    )
    .await;
    assert!(eventually(Duration::from_secs(20), || caught_up(&pool, "orders")).await);
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(&http, &stack, "n1").await.1 == "SHIPPED"
        })
        .await
    );
}
