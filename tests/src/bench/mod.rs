//! The benchmark harness: starts a full in-process stack on a fresh
//! database, drives commands, reads and projection lag against it, runs a
//! raw-Postgres baseline beside it, and reports the figures next to the
//! targets in DESIGN.md.

mod baseline;
mod database;
mod lag;
pub mod load;
pub mod openloop;
mod report;
pub mod yardstick;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use eventplane::server::{Stack, StackConfig};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::mpsc;

use database::BenchDatabase;
use load::Tag;
pub use report::Report;

/// Command-line flags of the `bench` binary.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "bench",
    about = "Measures Eventplane against the DESIGN.md targets"
)]
pub struct Args {
    /// Print one JSON object with every figure instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Seconds each measured phase runs.
    #[arg(long, env = "BENCH_DURATION_SECS", default_value_t = 10)]
    pub duration_secs: u64,
    /// Concurrent clients (HTTP connections, or Postgres connections for the baseline).
    #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Commands per second of the open-loop latency run; default the
    /// 10,000/s target if the closed-loop maximum reaches it, else 80% of
    /// that maximum.
    #[arg(long, env = "BENCH_RATE")]
    pub rate: Option<f64>,
    /// Cache-hit reads per second of the open-loop latency run; default as
    /// for --rate, with the 20,000/s target.
    #[arg(long, env = "BENCH_READ_RATE")]
    pub read_rate: Option<f64>,
    /// Events per second appended while projection lag is sampled (the
    /// DESIGN.md target's rate).
    #[arg(long, env = "BENCH_LAG_RATE", default_value_t = 10_000.0)]
    pub lag_rate: f64,
    /// Events per append in the lag run: an order placed, then paid and
    /// shipped in turn, all in one append (so the row appears once all are
    /// applied). Appends per second are the lag rate over this.
    #[arg(long, env = "BENCH_LAG_EVENTS_PER_APPEND", default_value_t = 5)]
    pub lag_events_per_append: usize,
    /// Sample the lag of every n-th append of the lag run.
    #[arg(long, env = "BENCH_LAG_SAMPLE_EVERY", default_value_t = 10)]
    pub lag_sample_every: u64,
    /// Server the benchmark database is created on.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Skip the outside load generator (wrk) and the pgbench and bare-server
    /// references.
    #[arg(long)]
    pub no_yardstick: bool,
    /// A Redis Cluster (`redis+cluster://host:port,...`) to compare the
    /// read path on, beside the one Redis.
    #[arg(long, env = "EVENTPLANE_REDIS_CLUSTER_URL")]
    pub redis_cluster_url: Option<String>,
    /// A streaming replica of the database server (its URL, any database)
    /// to compare L3 reads on, beside the primary.
    #[arg(long, env = "EVENTPLANE_REPLICA_URL")]
    pub replica_url: Option<String>,
    /// Orders appended (through the store, in bulk) for the cache-miss
    /// phases, so that none of their reads meets a key read before.
    #[arg(long, default_value_t = 400_000)]
    pub cold_orders: usize,
    /// Where the latency plots (SVG) go.
    #[arg(long, default_value = "bench-plots")]
    pub plots: std::path::PathBuf,
    /// Group-commit transactions in flight at once (the command service's
    /// `--append-writers`); default the service's own default.
    #[arg(long, env = "EVENTPLANE_APPEND_WRITERS")]
    pub append_writers: Option<usize>,
    /// Leave the benchmark database in place for inspection.
    #[arg(long, env = "BENCH_KEEP_DATABASE")]
    pub keep_database: bool,
}

/// Orders kept for the read phases (hot set and token reads).
const KEEP_ORDERS: usize = 20_000;
/// Keys the cache-hit phase cycles through.
const HOT_SET: usize = 1000;
/// Distinct customers, so a list page holds a realistic handful of rows.
const CUSTOMERS: u64 = 1000;
/// Longest wait for the projector to apply everything appended.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn run(args: Args) -> anyhow::Result<()> {
    let db = BenchDatabase::create(&args.database_url).await?;
    progress(&format!("database {}", db.name));
    let result = measure(&args, &db).await;
    if args.keep_database {
        progress(&format!("kept database {}", db.name));
    } else if let Err(err) = db.drop_database().await {
        eprintln!("bench: could not drop database {}: {err:#}", db.name);
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        println!("{}", report.render());
    }
    Ok(())
}

fn progress(message: &str) {
    eprintln!("bench: {message}");
}

#[derive(Clone)]
struct Placed {
    n: u64,
    id: String,
    token: String,
}

#[derive(Deserialize)]
struct Appended {
    token: String,
}

/// The HTTP side: places orders on new streams and reads them back.
struct Client {
    http: reqwest::Client,
    base: String,
    run: String,
    next: AtomicU64,
    kept: Mutex<Vec<Placed>>,
}

impl Client {
    async fn place(&self) -> anyhow::Result<Placed> {
        self.place_with_updates(0).await
    }

    /// Places an order on a stream of its own, with `updates` more events
    /// (paid, shipped, paid, ...) in the same append.
    async fn place_with_updates(&self, updates: usize) -> anyhow::Result<Placed> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", self.run);
        let mut events = vec![json!({"type": "OrderPlaced", "data": {
            "orderId": id,
            "customerId": format!("c-{}", n % CUSTOMERS),
            "total": format!("{}.{:02}", 10 + n % 90, n % 100),
        }})];
        events.extend((0..updates).map(|i| {
            let kind = if i % 2 == 0 {
                "OrderPaid"
            } else {
                "OrderShipped"
            };
            json!({"type": kind, "data": {"orderId": id}})
        }));
        let body = json!({"expectedVersion": "no_stream", "events": events});
        let response = self
            .http
            .post(format!("{}/v1/streams/order-{id}/events", self.base))
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        if status != StatusCode::CREATED {
            bail!(
                "append answered {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        let appended: Appended = response.json().await?;
        let placed = Placed {
            n,
            id,
            token: appended.token,
        };
        if (n as usize) < KEEP_ORDERS {
            self.kept
                .lock()
                .expect("kept orders lock")
                .push(placed.clone());
        }
        Ok(placed)
    }

    /// GETs `path` and reads the whole body; the tag is the cache layer that
    /// answered.
    async fn get(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<Tag> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .send()
            .await?;
        let status = response.status();
        let layer = match response
            .headers()
            .get("eventplane-cache")
            .and_then(|v| v.to_str().ok())
        {
            Some("l1") => "l1",
            Some("l2") => "l2",
            Some("l3") => "l3",
            Some(_) => "other",
            None => "",
        };
        let body = response.bytes().await?;
        if !status.is_success() {
            bail!(
                "GET {path} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(layer)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn kept(&self) -> Vec<Placed> {
        let mut kept = self.kept.lock().expect("kept orders lock").clone();
        kept.sort_by_key(|p| p.n);
        kept
    }
}

/// The open-loop rate when none is given: the target rate when the
/// closed-loop maximum reaches it, since that is the load the target is
/// stated at; otherwise 80% of the maximum, below saturation, where latency
/// still means something.
fn default_rate(max: f64, target: f64) -> f64 {
    if max >= target {
        target
    } else {
        (0.8 * max).max(1.0)
    }
}

async fn measure(args: &Args, db: &BenchDatabase) -> anyhow::Result<Report> {
    let duration = Duration::from_secs(args.duration_secs.max(1));
    let half = duration / 2;
    let warmup = duration.min(Duration::from_secs(2));
    let clients = args.concurrency.max(1);

    let projections = eventplane::dev::sample_projections();
    let orders = projections
        .iter()
        .find(|p| p.metadata.name == "orders")
        .map(|m| eventplane_store::Projection::from_manifest(m.clone()))
        .context("the sample projections have no `orders`")?;
    let mut config = StackConfig::local(&db.url, Some(&args.redis_url), projections);
    if let Some(writers) = args.append_writers {
        config.command.group_commit.writers = writers.max(1);
    }
    let stack = Stack::start(config).await.context("starting the stack")?;
    let fsync: String = sqlx::query_scalar("SHOW fsync")
        .fetch_one(&stack.pool)
        .await?;
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&stack.pool)
        .await?;

    let noise_before = Noise::observe(&stack.pool).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients * 2)
        .tcp_nodelay(true)
        .build()?;
    let client = Arc::new(Client {
        http,
        base: stack.url(""),
        run: format!("{:x}", chrono::Utc::now().timestamp_millis()),
        next: AtomicU64::new(0),
        kept: Mutex::new(Vec::new()),
    });
    let place = {
        let client = client.clone();
        move || {
            let client = client.clone();
            async move { client.place().await.map(|_| "") }
        }
    };

    progress(&format!(
        "commands: {}s warm-up, then {}s closed loop with {clients} clients",
        warmup.as_secs(),
        duration.as_secs()
    ));
    load::closed_loop(clients, warmup, place.clone()).await;
    let commands_closed = load::closed_loop(clients, duration, place.clone()).await;
    let command_rate = args
        .rate
        .unwrap_or_else(|| default_rate(commands_closed.rate(), report::COMMAND_RATE_TARGET));
    progress(&format!(
        "commands: {}s open loop at {command_rate:.0}/s",
        duration.as_secs()
    ));
    let open = OpenLoop {
        addr: stack.addr.to_string(),
        connections: clients,
        duration,
    };
    let commands_open = open
        .run(
            "POST",
            vec![format!("/v1/streams/order-{}-o{{n}}/events", client.run)],
            Some(format!(
                r#"{{"expectedVersion":"no_stream","events":[{{"type":"OrderPlaced","data":{{"orderId":"{}-o{{n}}","customerId":"c-1","total":"12.50"}}}}]}}"#,
                client.run
            )),
            command_rate,
            201,
        )
        .await?;

    let scratch = std::env::temp_dir().join(format!("eventplane-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    // Each append phase and its reference start with the projector idle:
    // a backlog left by the phase before would take Postgres time from
    // the one measured.
    wait_for_projector(&client, &orders.name).await?;
    let yardstick_appends = match yardstick::available() {
        _ if args.no_yardstick => Err("--no-yardstick".to_string()),
        Err(why) => Err(why),
        Ok(()) => {
            progress(&format!(
                "yardstick: {0}s of wrk appends, {0}s of pgbench inserts, then both on a schedule of {command_rate:.0}/s, {clients} connections",
                duration.as_secs()
            ));
            Ok(yardstick::appends(
                &scratch,
                &stack.url(""),
                &stack.pool,
                &db.url,
                clients,
                duration,
                command_rate,
            )
            .await?)
        }
    };
    wait_for_projector(&client, &orders.name).await?;

    progress(&format!(
        "baseline: single-row INSERT per transaction, {clients} connections, {}s",
        duration.as_secs()
    ));
    let baseline = baseline::run(&db.url, clients, Duration::from_secs(1), duration).await?;
    if let Ok(appends) = &yardstick_appends {
        progress(&format!(
            "{} orders for the cache-miss phases",
            args.cold_orders
        ));
        yardstick::seed_cold_orders(&stack.pool, &appends.run_id, args.cold_orders)
            .await
            .context("seeding orders for the miss phases")?;
    }

    let catch_up = wait_for_projector(&client, &orders.name).await?;

    let kept = Arc::new(client.kept());
    if kept.is_empty() {
        bail!("no order was placed; see the command errors above");
    }
    let hot: Arc<Vec<String>> = Arc::new(kept.iter().take(HOT_SET).map(|p| p.id.clone()).collect());
    let rows = format!("/v1/projections/{}/rows/", orders.name);
    for id in hot.iter() {
        // Fill the caches so the measured phase reads hits only.
        client.get(&format!("{rows}{id}"), &[]).await?;
    }
    let hit = {
        let (client, hot, rows, i) = (
            client.clone(),
            hot.clone(),
            rows.clone(),
            Arc::new(AtomicU64::new(0)),
        );
        move || {
            let (client, hot, rows, i) = (client.clone(), hot.clone(), rows.clone(), i.clone());
            async move {
                let id = &hot[i.fetch_add(1, Ordering::Relaxed) as usize % hot.len()];
                client.get(&format!("{rows}{id}"), &[]).await
            }
        }
    };
    progress(&format!(
        "cache-hit reads: {}s closed loop over {} keys",
        duration.as_secs(),
        hot.len()
    ));
    let hits_closed = load::closed_loop(clients, duration, hit.clone()).await;
    let read_rate = args
        .read_rate
        .unwrap_or_else(|| default_rate(hits_closed.rate(), report::HIT_RATE_TARGET));
    progress(&format!(
        "cache-hit reads: {}s open loop at {read_rate:.0}/s",
        duration.as_secs()
    ));
    let hits_open = open
        .run(
            "GET",
            hot.iter().map(|id| format!("{rows}{id}")).collect(),
            None,
            read_rate,
            200,
        )
        .await?;

    let miss = {
        let (client, kept, rows, i) = (
            client.clone(),
            kept.clone(),
            rows.clone(),
            Arc::new(AtomicU64::new(0)),
        );
        move || {
            let (client, kept, rows, i) = (client.clone(), kept.clone(), rows.clone(), i.clone());
            async move {
                let placed = &kept[i.fetch_add(1, Ordering::Relaxed) as usize % kept.len()];
                client
                    .get(
                        &format!("{rows}{}", placed.id),
                        &[("token", placed.token.as_str())],
                    )
                    .await
            }
        }
    };
    progress(&format!(
        "token reads (cache bypassed): {}s closed, {}s open loop",
        half.as_secs_f64(),
        half.as_secs_f64()
    ));
    let misses_closed = load::closed_loop(clients, half, miss.clone()).await;
    let misses_open = open
        .halved()
        .run(
            "GET",
            kept.iter()
                .map(|placed| format!("{rows}{}?token={}", placed.id, placed.token))
                .collect(),
            None,
            0.8 * misses_closed.rate(),
            200,
        )
        .await?;

    let list = {
        let (client, path, i) = (
            client.clone(),
            format!("/v1/projections/{}/queries/by_customer", orders.name),
            Arc::new(AtomicU64::new(0)),
        );
        move || {
            let (client, path, i) = (client.clone(), path.clone(), i.clone());
            async move {
                let customer = format!("c-{}", i.fetch_add(1, Ordering::Relaxed) % CUSTOMERS);
                client
                    .get(
                        &path,
                        &[("customer_id", customer.as_str()), ("limit", "20")],
                    )
                    .await
            }
        }
    };
    progress(&format!(
        "list query by_customer: {}s closed, {}s open loop",
        half.as_secs_f64(),
        half.as_secs_f64()
    ));
    let list_closed = load::closed_loop(clients, half, list.clone()).await;
    let list_open = open
        .halved()
        .run(
            "GET",
            (0..CUSTOMERS)
                .map(|c| {
                    format!(
                        "/v1/projections/{}/queries/by_customer?customer_id=c-{c}&limit=20",
                        orders.name
                    )
                })
                .collect(),
            None,
            0.8 * list_closed.rate(),
            200,
        )
        .await?;

    let yardstick = match yardstick_appends {
        Ok(appends) => {
            progress(&format!(
                "yardstick: cache hits (wrk, then on a schedule) and misses beside bare axum references, {}s each",
                duration.as_secs()
            ));
            let hot_row = client
                .http
                .get(client.url(&format!("{rows}{}", hot[0])))
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            let reads = yardstick::Reads {
                base: &stack.url(""),
                database_url: &db.url,
                projection: &orders.name,
                table: &orders.table,
                key_column: &orders.spec.key,
                hot: &hot,
                hot_row,
            };
            let backends = yardstick::read_paths::Backends {
                redis_url: args.redis_url.clone(),
                cluster_url: args.redis_cluster_url.clone(),
                replica_url: match &args.replica_url {
                    Some(server) => Some(db.on(server)?),
                    None => None,
                },
            };
            Ok(yardstick::reads(
                &scratch,
                appends,
                reads,
                clients,
                duration,
                &args.plots,
                &backends,
            )
            .await?)
        }
        Err(why) => {
            progress(&format!("yardstick skipped: {why}"));
            Err(why)
        }
    };
    let _ = std::fs::remove_dir_all(&scratch);

    let per_append = args.lag_events_per_append.max(1);
    let lag_append_rate = args.lag_rate / per_append as f64;
    progress(&format!(
        "projection lag: {}s of {per_append}-event appends at {lag_append_rate:.0}/s ({:.0} events/s), every {}th sampled",
        duration.as_secs(),
        args.lag_rate,
        args.lag_sample_every
    ));
    let watch_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&db.url)
        .await?;
    let (samples, receiver) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(lag::watch(
        watch_pool.clone(),
        orders.table.clone(),
        orders.spec.key.clone(),
        receiver,
    ));
    let every = args.lag_sample_every.max(1);
    let sampled_place = {
        let client = client.clone();
        move || {
            let (client, samples) = (client.clone(), samples.clone());
            async move {
                let placed = client.place_with_updates(per_append - 1).await?;
                if placed.n % every == 0 {
                    // A closed channel only means the watcher failed; its error is reported below.
                    let _ = samples.send((placed.id, Instant::now()));
                }
                Ok("")
            }
        }
    };
    let lag_appends = load::open_loop(clients, duration, lag_append_rate, sampled_place).await;
    let lag = watcher.await.context("lag watcher")??;
    watch_pool.close().await;

    let status: serde_json::Value = client
        .http
        .get(client.url(&format!("/v1/projections/{}/status", orders.name)))
        .send()
        .await?
        .json()
        .await?;
    let noise_after = Noise::observe(&stack.pool).await;
    drop(stack);

    Ok(Report {
        noise: [noise_before, noise_after],
        duration,
        clients,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        fsync,
        synchronous_commit,
        commands_closed,
        commands_open,
        baseline,
        catch_up,
        hits_closed,
        hits_open,
        misses_closed,
        misses_open,
        list_closed,
        list_open,
        lag_appends,
        lag_rate: args.lag_rate,
        lag_events_per_append: per_append,
        lag: lag.lag,
        lag_missing: lag.missing,
        projection_status: status,
        yardstick,
    })
}

/// Where and how the open-loop phases run: in a load-generator process of
/// their own (see [`openloop`]), against the stack's API.
struct OpenLoop {
    addr: String,
    connections: usize,
    duration: Duration,
}

impl OpenLoop {
    fn halved(&self) -> OpenLoop {
        OpenLoop {
            addr: self.addr.clone(),
            connections: self.connections,
            duration: (self.duration / 2).max(Duration::from_secs(1)),
        }
    }

    async fn run(
        &self,
        method: &str,
        paths: Vec<String>,
        body: Option<String>,
        rate: f64,
        expect: u16,
    ) -> anyhow::Result<load::Phase> {
        let spec = openloop::Spec {
            addr: self.addr.clone(),
            method: method.to_string(),
            paths,
            body,
            rate,
            duration_ms: self.duration.as_millis() as u64,
            connections: self.connections,
            expect,
        };
        let (mut phase, cpu) = openloop::run(&spec).await?;
        phase.cpu = Some(cpu);
        Ok(phase)
    }
}

/// Other work on the machine or the database server that skews the figures:
/// the benchmark cannot prevent it, so it reports it.
#[derive(Clone, Debug, Default)]
pub struct Noise {
    /// Sessions running a statement in other databases of the same server.
    pub foreign_active_sessions: i64,
    /// One-minute load average (Linux), if readable.
    pub load_average: Option<f64>,
}

impl Noise {
    async fn observe(pool: &sqlx::PgPool) -> Noise {
        let foreign_active_sessions = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'active' AND backend_type = 'client backend' AND datname <> current_database()",
        )
        .fetch_one(pool)
        .await
        .unwrap_or(0);
        let load_average = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()));
        Noise {
            foreign_active_sessions,
            load_average,
        }
    }
}

/// Polls the projection's status until nothing is left to apply; returns
/// how long that took.
async fn wait_for_projector(client: &Client, projection: &str) -> anyhow::Result<Duration> {
    progress("waiting for the projector to catch up");
    let started = Instant::now();
    loop {
        let status: serde_json::Value = client
            .http
            .get(client.url(&format!("/v1/projections/{projection}/status")))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if status["lagEvents"].as_i64() == Some(0) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > CATCH_UP_TIMEOUT {
            bail!("projection {projection} still behind after {CATCH_UP_TIMEOUT:?}: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::default_rate;

    #[test]
    fn rate_is_the_target_when_the_server_reaches_it() {
        assert_eq!(default_rate(50_000.0, 20_000.0), 20_000.0);
        assert_eq!(default_rate(20_000.0, 20_000.0), 20_000.0);
    }

    #[test]
    fn rate_is_eighty_percent_of_a_maximum_below_the_target() {
        assert_eq!(default_rate(5_000.0, 10_000.0), 4_000.0);
    }
}
