//! `eventplane dev`: every role in one process against local Postgres and
//! Redis, the bundled `orders` and `customer-stats` projections, and a
//! short demo load whose summary shows what the stack does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use eventplane_api::ProjectionManifest;

use crate::cli::DevRole;
use crate::projections;
use crate::server::{Roles, Stack, StackConfig};

/// The bundled sample projection, also shipped as `crds/examples`.
pub const ORDERS_MANIFEST: &str = eventplane_api::examples::ORDERS;

/// Who the dev stack declares its projections as.
pub const DEV_SOURCE: &str = "dev";

/// The bundled sample, declared like any other manifest.
pub fn sample_projections() -> Vec<ProjectionManifest> {
    vec![eventplane_api::examples::orders_manifest()]
}

/// The aggregate sample, fed by the same order events.
pub const CUSTOMER_STATS_MANIFEST: &str = eventplane_api::examples::CUSTOMER_STATS;

/// What `eventplane dev` serves without `--projections`: both samples.
pub fn dev_projections() -> Vec<ProjectionManifest> {
    let mut all = sample_projections();
    all.push(eventplane_api::examples::customer_stats_manifest());
    all
}

pub async fn run(role: DevRole) -> anyhow::Result<()> {
    let declare = match &role.catalog.projections {
        Some(path) => projections::load(path)?,
        None => dev_projections(),
    };
    let config = StackConfig {
        database_url: role.db.database_url.clone(),
        read_database_url: role.query.read_database_url.clone(),
        db_max_connections: role.db.db_max_connections,
        read_max_connections: role.query.read_max_connections,
        acquire_timeout: role.db.acquire_timeout(),
        redis_url: Some(role.redis_url.clone()),
        declare,
        declared_by: DEV_SOURCE.into(),
        listen: role.listen,
        admin_listen: role.admin_listen,
        auth: role.auth.config(),
        roles: Roles::ALL,
        command: role.command.config(),
        projector: role.projector.config(),
        query: role.query.config(),
        catalog_resync: role.catalog.resync(),
        member: None,
    };
    let stack = Stack::start(config).await?;
    let maintenance = tokio::spawn(keep_events_partitioned(stack.pool.clone()));
    let base = stack.url("");
    let admin = stack.admin_url("");
    if role.demo_orders > 0 {
        let summary = demo(&base, &admin, role.demo_orders, role.demo_clients.max(1)).await?;
        println!("{summary}");
    }
    println!("{}", examples(&base, &admin));
    if role.exit_after_demo {
        stack.shutdown().await;
        return Ok(());
    }
    crate::roles::shutdown_signal().await;
    maintenance.abort();
    stack.shutdown().await;
    Ok(())
}

/// The local stack's own `events` table follows the bundled PartitionPolicy
/// example (monthly, three months ahead), through the same planner and
/// executor the operator uses.
pub const EVENTS_POLICY: &str = include_str!("../../../crds/examples/partitionpolicy-events.yaml");

/// Re-plans every hour; a month boundary is never more than an hour late
/// and three months are premade anyway.
const PARTITION_CHECK: Duration = Duration::from_secs(3600);

async fn keep_events_partitioned(pool: sqlx::PgPool) {
    let policy = match eventplane_api::load_partition_policies(EVENTS_POLICY) {
        Ok(mut policies) => policies.remove(0).spec,
        Err(err) => {
            tracing::error!(error = %err, "bundled events partition policy is invalid");
            return;
        }
    };
    // The local stack keeps everything: retention is for clusters.
    let policy = eventplane_api::PartitionPolicySpec {
        retention: None,
        ..policy
    };
    let options = eventplane_store::partitions::ApplyOptions::default();
    loop {
        match eventplane_store::partitions::apply(&pool, &policy, chrono::Utc::now(), &options)
            .await
        {
            Ok(report) => {
                for step in &report.executed {
                    tracing::info!(%step, "events partitions");
                }
            }
            Err(err) => tracing::warn!(error = %err, "events partition maintenance failed"),
        }
        tokio::time::sleep(PARTITION_CHECK).await;
    }
}

fn examples(base: &str, admin: &str) -> String {
    format!(
        r#"Eventplane is serving at {base}. Try:
  curl -s -X POST {base}/v1/streams/order-demo-1/events -H 'content-type: application/json' \
       -d '{{"expectedVersion":"no_stream","events":[{{"type":"OrderPlaced","data":{{"orderId":"demo-1","customerId":"c-1","total":"42.50"}}}}]}}'
  curl -s {base}/v1/projections/orders/rows/demo-1
  curl -s '{base}/v1/projections/orders/queries/by_customer?customer_id=c-1&limit=10'
  curl -s {base}/v1/projections/orders/status
  curl -s {base}/v1/projections/customer-stats/rows/c-1
  curl -s '{base}/v1/projections/customer-stats/queries/top-spenders'
  curl -s {admin}/metrics | grep -E '^(command_latency|query_latency|cache_hit_rate)'
Stop with Ctrl-C."#
    )
}

#[derive(Default)]
struct Recorder {
    commands: Option<Histogram<u64>>,
    reads: Option<Histogram<u64>>,
    consistent_reads: Option<Histogram<u64>>,
}

fn record(slot: &mut Option<Histogram<u64>>, started: Instant) {
    let h = slot
        .get_or_insert_with(|| Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"));
    let _ = h.record(started.elapsed().as_micros().max(1) as u64);
}

fn line(name: &str, h: &Option<Histogram<u64>>) -> String {
    match h {
        Some(h) => format!(
            "  {name:<26} {:>7}   p50 {:>8.2} ms   p99 {:>8.2} ms",
            h.len(),
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0
        ),
        None => format!("  {name:<26} none"),
    }
}

/// Places `orders` orders from `clients` concurrent clients over HTTP: each
/// order is placed, read back with its token (read-your-writes), read again
/// (cache), half are paid; then the customers' lists are read.
async fn demo(base: &str, admin: &str, orders: usize, clients: usize) -> anyhow::Result<String> {
    let http = reqwest::Client::new();
    let run = format!("{:x}", chrono::Utc::now().timestamp_millis());
    let next = Arc::new(AtomicUsize::new(0));
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (http, base, run, next, recorder) = (
            http.clone(),
            base.to_string(),
            run.clone(),
            next.clone(),
            recorder.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= orders {
                    return Ok::<_, anyhow::Error>(());
                }
                let order = format!("{run}-{n}");
                let body = json!({
                    "expectedVersion": "no_stream",
                    "events": [{"type": "OrderPlaced", "data": {
                        "orderId": order, "customerId": format!("c-{}", n % 50), "total": format!("{}.{:02}", 10 + n % 90, n % 100)
                    }}]
                });
                let t = Instant::now();
                let placed: Value = http.post(format!("{base}/v1/streams/order-{order}/events")).json(&body).send().await?.error_for_status()?.json().await?;
                record(&mut recorder.lock().await.commands, t);
                let token = placed["token"].as_str().unwrap_or_default().to_string();

                let t = Instant::now();
                http.get(format!("{base}/v1/projections/orders/rows/{order}?token={token}")).send().await?.error_for_status()?;
                record(&mut recorder.lock().await.consistent_reads, t);
                for _ in 0..3 {
                    let t = Instant::now();
                    http.get(format!("{base}/v1/projections/orders/rows/{order}")).send().await?.error_for_status()?;
                    record(&mut recorder.lock().await.reads, t);
                }
                if n % 2 == 0 {
                    let paid = json!({"expectedVersion": 1, "events": [{"type": "OrderPaid", "data": {"orderId": order}}]});
                    let t = Instant::now();
                    http.post(format!("{base}/v1/streams/order-{order}/events")).json(&paid).send().await?.error_for_status()?;
                    record(&mut recorder.lock().await.commands, t);
                }
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    let elapsed = started.elapsed();
    // Let the projector drain, then read its status.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status: Value = http
        .get(format!("{base}/v1/projections/orders/status"))
        .send()
        .await?
        .json()
        .await?;
    let metrics = http
        .get(format!("{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let hit_rates: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("cache_hit_rate{"))
        .map(|l| format!("  {l}"))
        .collect();
    let r = recorder.lock().await;
    Ok(format!(
        "\nDemo: {orders} orders from {clients} clients in {:.2} s\n{}\n{}\n{}\nProjection orders: {} events applied, lag {} events / {} s, {} dead letters\nCache hit rates:\n{}\n",
        elapsed.as_secs_f64(),
        line("commands", &r.commands),
        line("reads with token (RYW)", &r.consistent_reads),
        line("reads", &r.reads),
        status["eventsApplied"],
        status["lagEvents"],
        status["lagSeconds"],
        status["deadLetters"],
        hit_rates.join("\n"),
    ))
}
