//! Measures Kafka-fed projections against the Postgres tail in the same
//! run: events/s from a preloaded log to a caught-up table (for Kafka:
//! relay + broker + consumer-group projectors with 1, 2 and 3 replicas),
//! then end-to-end lag under a steady load (append committed → row
//! visible), P50 and P99. Each configuration gets a scratch database of
//! its own next to DATABASE_URL and a topic of its own.
//!
//! KAFKA_BROKERS=127.0.0.1:9092 cargo run --release -p eventplane --example kafka_measure

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use eventplane::metrics::Metrics;
use eventplane::projector::kafka::KafkaSource;
use eventplane::relay::{Relay, RelayConfig};
use eventplane::server::{Roles, Stack, StackConfig};
use eventplane_store::events::model::NamedVersion;
use eventplane_store::events::notify::CommitSignal;
use eventplane_store::events::{AppendRequest, ExpectedVersion, NewEvent, append};
use hdrhistogram::Histogram;
use serde_json::json;
use sqlx::PgPool;

#[derive(Parser, Debug)]
struct Args {
    /// Events preloaded for the throughput phase.
    #[arg(long, default_value_t = 200_000)]
    events: i64,
    /// Streams the events are spread over.
    #[arg(long, default_value_t = 1000)]
    streams: i64,
    /// Events per second of the lag phase.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Seconds of the lag phase.
    #[arg(long, default_value_t = 10)]
    lag_seconds: u64,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Admin URL; scratch databases are created next to it and dropped.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
}

/// One row per stream: the last sequence number and a count.
fn manifest(transport: &str) -> String {
    format!(
        r#"
apiVersion: eventplane.io/v1alpha1
kind: Projection
metadata: {{name: measured}}
spec:
  table: measured
  key: id
  {transport}
  columns:
    - {{name: id, type: text}}
    - {{name: seq, type: bigint}}
    - {{name: n, type: bigint}}
  handlers:
    - eventType: Ticked
      op: upsert
      key: /streamId
      set:
        - {{column: seq, from: /data/seq}}
        - {{column: n, op: add}}
"#
    )
}

struct Scratch {
    admin: PgPool,
    name: String,
    url: String,
    pool: PgPool,
}

impl Scratch {
    async fn new(admin_url: &str, what: &str) -> anyhow::Result<Scratch> {
        let admin = PgPool::connect(admin_url).await?;
        let name = format!("ep_kafka_measure_{what}_{}", std::process::id());
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name}"
        )))
        .execute(&admin)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        let mut url = url::Url::parse(admin_url)?;
        url.set_path(&name);
        let url = url.to_string();
        let pool = PgPool::connect(&url).await?;
        eventplane_store::db::migrate(&pool).await?;
        Ok(Scratch {
            admin,
            name,
            url,
            pool,
        })
    }

    async fn drop(self) -> anyhow::Result<()> {
        self.pool.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&self.admin)
        .await?;
        Ok(())
    }
}

/// The preloaded log: `events` Ticked events round-robin over `streams`,
/// a thousand per transaction, as group commits would write them.
async fn preload(pool: &PgPool, events: i64, streams: i64) -> anyhow::Result<()> {
    for from in (0..events).step_by(1000) {
        sqlx::query(
            "INSERT INTO events (stream_id, stream_version, event_type, data) \
             SELECT 's' || (g % $3), g / $3 + 1, 'Ticked', jsonb_build_object('seq', g) \
             FROM generate_series($1::bigint, $2::bigint - 1) g",
        )
        .bind(from)
        .bind((from + 1000).min(events))
        .bind(streams)
        .execute(pool)
        .await?;
    }
    sqlx::query("ANALYZE events").execute(pool).await?;
    Ok(())
}

/// Events the projection has applied: the tail's checkpoint, or what the
/// partitions applied.
async fn applied(pool: &PgPool) -> anyhow::Result<i64> {
    let applied: i64 = sqlx::query_scalar(
        "SELECT ((SELECT COALESCE(sum(applied), 0) FROM projection_checkpoints WHERE projection = 'measured') \
              + (SELECT COALESCE(sum(applied), 0) FROM kafka_offsets WHERE projection = 'measured'))::bigint",
    )
    .fetch_one(pool)
    .await?;
    Ok(applied)
}

struct Run {
    label: String,
    events_per_second: f64,
    lag: Histogram<u64>,
}

async fn measure(args: &Args, replicas: usize) -> anyhow::Result<Run> {
    let label = if replicas == 0 {
        "postgres tail".to_string()
    } else {
        format!("kafka, {replicas} replica(s)")
    };
    let scratch = Scratch::new(&args.database_url, &format!("r{replicas}")).await?;
    let topic = format!("kafka-measure-{}-{replicas}", std::process::id());
    let transport = if replicas == 0 {
        String::new()
    } else {
        format!("transport: {{kind: kafka, topic: {topic}}}")
    };
    let declared = eventplane_api::load_manifests(&manifest(&transport))?;
    preload(&scratch.pool, args.events, args.streams).await?;

    let started = Instant::now();
    let relay = if replicas == 0 {
        None
    } else {
        let config = RelayConfig {
            brokers: args.brokers.clone(),
            topic: topic.clone(),
            name: topic.clone(),
            holder: "measure".into(),
            batch_size: 5000,
            lease_ttl: Duration::from_secs(10),
            poll_interval: Duration::from_millis(100),
            delivery_timeout: Duration::from_secs(10),
            create_partitions: args.partitions,
        };
        Some(Relay::start(scratch.pool.clone(), config, Metrics::new()).await?)
    };
    let mut stacks = Vec::new();
    for i in 0..replicas.max(1) {
        let mut config = StackConfig::local(&scratch.url, None, declared.clone());
        config.roles = Roles {
            command: false,
            projector: true,
            query: false,
        };
        config.member = Some(format!("measure-{i}"));
        config.catalog_resync = Duration::from_millis(200);
        config.projector.kafka = (replicas > 0).then(|| KafkaSource {
            brokers: args.brokers.clone(),
            group_prefix: format!("measure-{}", std::process::id()),
            session_timeout: Duration::from_secs(10),
        });
        stacks.push(Stack::start(config).await?);
    }
    while applied(&scratch.pool).await? < args.events {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let events_per_second = args.events as f64 / elapsed;
    // Every event counted once in its stream's row: the figure is of
    // events applied, not of messages read.
    let counted: i64 = sqlx::query_scalar("SELECT COALESCE(sum(n), 0)::bigint FROM measured")
        .fetch_one(&scratch.pool)
        .await?;
    anyhow::ensure!(
        counted == args.events,
        "{label}: the table counts {counted} events of {}",
        args.events
    );
    println!(
        "{label}: {} events applied in {elapsed:.2} s: {events_per_second:.0} events/s",
        args.events
    );

    let lag = steady_lag(args, &scratch.pool).await?;
    println!(
        "{label}: lag at {} events/s: P50 {} ms, P99 {} ms, max {} ms ({} events)",
        args.rate,
        lag.value_at_quantile(0.5),
        lag.value_at_quantile(0.99),
        lag.max(),
        lag.len()
    );
    for stack in stacks {
        stack.shutdown().await;
    }
    if let Some(relay) = relay {
        relay.stop().await;
    }
    scratch.drop().await?;
    Ok(Run {
        label,
        events_per_second,
        lag,
    })
}

/// Appends `rate` events/s for `lag_seconds`, one per stream and tick, and
/// records for each how long after its commit its row showed it.
async fn steady_lag(args: &Args, pool: &PgPool) -> anyhow::Result<Histogram<u64>> {
    let tick = Duration::from_millis(10);
    let per_tick = (args.rate / 100).max(1) as i64;
    let ticks = args.lag_seconds * 100;
    // Sequence numbers continue past the preloaded ones.
    let mut seq = args.events;
    let mut pending: HashMap<String, (i64, Instant)> = HashMap::new();
    let mut lag = Histogram::<u64>::new_with_bounds(1, 600_000, 3)?;
    let mut next = Instant::now();
    let stream_of = |s: i64| format!("s{}", s % args.streams);
    // Wakes the projectors and the relay after each commit, as the
    // command service does.
    let (signal, notifier) = CommitSignal::start(pool.clone());
    for _ in 0..ticks {
        let requests: Vec<AppendRequest> = (0..per_tick)
            .map(|i| AppendRequest {
                stream_id: stream_of(seq + i),
                expected_version: ExpectedVersion::Named(NamedVersion::Any),
                events: vec![NewEvent::new("Ticked", &json!({"seq": seq + i}))],
                idempotency_key: None,
                traceparent: None,
            })
            .collect();
        let refs: Vec<&AppendRequest> = requests.iter().collect();
        append(pool, &refs).await?;
        signal.committed();
        let committed = Instant::now();
        for i in 0..per_tick {
            pending.insert(stream_of(seq + i), (seq + i, committed));
        }
        seq += per_tick;
        observe(pool, &mut pending, &mut lag).await?;
        next += tick;
        tokio::time::sleep_until(next.into()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() && Instant::now() < deadline {
        observe(pool, &mut pending, &mut lag).await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    notifier.abort();
    Ok(lag)
}

/// Records the rows that now show their stream's last appended event.
async fn observe(
    pool: &PgPool,
    pending: &mut HashMap<String, (i64, Instant)>,
    lag: &mut Histogram<u64>,
) -> anyhow::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let streams: Vec<String> = pending.keys().cloned().collect();
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT id, seq FROM measured WHERE id = ANY($1)")
            .bind(&streams)
            .fetch_all(pool)
            .await?;
    let now = Instant::now();
    for (stream, seen) in rows {
        if let Some((wanted, at)) = pending.get(&stream)
            && seen >= *wanted
        {
            lag.record((now - *at).as_millis().max(1) as u64)?;
            pending.remove(&stream);
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = eventplane_telemetry::init(false);
    let mut runs = Vec::new();
    for replicas in 0..=3 {
        runs.push(measure(&args, replicas).await?);
    }
    let base = runs[0].events_per_second;
    println!();
    println!("| path | events/s | vs tail | lag P50 ms | lag P99 ms |");
    println!("|---|---|---|---|---|");
    for run in &runs {
        println!(
            "| {} | {:.0} | {:.2}x | {} | {} |",
            run.label,
            run.events_per_second,
            run.events_per_second / base,
            run.lag.value_at_quantile(0.5),
            run.lag.value_at_quantile(0.99)
        );
    }
    Ok(())
}
