//! Measures what a partition `apply` costs a writer: builds an events table
//! with many loaded monthly partitions in a scratch database, punches holes
//! and ages some partitions past retention, then runs one `apply` while a
//! writer appends in a loop, and compares the writer's latency with a run
//! of the same length without `apply`.
//!
//! cargo run --release -p eventplane --example partition_measure -- --months 24 --rows-per-month 1000000

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Months, Utc};
use clap::Parser;
use eventplane_api::{DatabaseRef, Interval, PartitionPolicySpec, Retention, RetentionAction};
use eventplane_plan::{interval_start, next_start};
use eventplane_store::partitions::{ApplyOptions, apply};
use hdrhistogram::Histogram;
use sqlx::PgPool;

#[derive(Parser, Debug)]
struct Args {
    /// Monthly partitions loaded before the measurement, ending with the
    /// current month.
    #[arg(long, default_value_t = 24)]
    months: u32,
    /// Rows loaded into each month.
    #[arg(long, default_value_t = 1_000_000)]
    rows_per_month: u64,
    /// Loaded months dropped again to leave holes for `apply` to fill.
    #[arg(long, default_value_t = 3)]
    holes: u32,
    /// Months kept by the policy's retention (older ones are dropped).
    #[arg(long, default_value_t = 18)]
    keep: u32,
    /// Admin URL; a scratch database is created next to it and dropped.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Keep the scratch database for inspection.
    #[arg(long)]
    keep_database: bool,
}

struct WriterStats {
    inserts: u64,
    errors: Vec<String>,
    latency_us: Histogram<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let name = format!("ep_measure_{}", uuid::Uuid::new_v4().simple());
    let admin = PgPool::connect(&args.database_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    let mut url = url::Url::parse(&args.database_url).context("DATABASE_URL is a URL")?;
    url.set_path(&name);
    let result = measure(&args, url.as_str()).await;
    if !args.keep_database {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await?;
    } else {
        println!("database kept: {name}");
    }
    result
}

async fn measure(args: &Args, url: &str) -> anyhow::Result<()> {
    let pool = eventplane_store::db::connect(url, 8, "measure").await?;
    eventplane_store::db::migrate(&pool).await?;
    let now = Utc::now();
    let months = args.months.max(1);

    // The loaded months, oldest first, ending with the current one.
    let mut spec = policy(months - 1, None);
    let first = now
        .checked_sub_months(Months::new(months - 1))
        .context("months in range")?;
    apply(&pool, &spec, first, &ApplyOptions::default()).await?;
    let start = interval_start(&spec, first);
    let mut bounds = Vec::new();
    let mut from = start;
    for _ in 0..months {
        let to = next_start(&spec, from);
        bounds.push((from, to));
        from = to;
    }

    let loading = Instant::now();
    load(&pool, &bounds, args.rows_per_month).await?;
    sqlx::query("ANALYZE events").execute(&pool).await?;
    println!(
        "loaded {} months x {} rows in {:.1} s",
        months,
        args.rows_per_month,
        loading.elapsed().as_secs_f64()
    );

    // Holes in the kept range, away from the current month.
    let mut conn = pool.acquire().await?;
    let observed = eventplane_store::partitions::observe(&mut conn, &spec).await?;
    drop(conn);
    let mut dropped = Vec::new();
    for i in 0..args.holes as usize {
        let Some(index) = bounds.len().checked_sub(3 + 2 * i) else {
            break;
        };
        let (from, to) = bounds[index];
        let hole = observed
            .partitions
            .iter()
            .find(|p| p.bound == eventplane_plan::Bound::Range { from, to });
        if let Some(hole) = hole {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP TABLE {}",
                eventplane_api::quote_ident(&hole.name)
            )))
            .execute(&pool)
            .await?;
            dropped.push(hole.name.clone());
        }
    }
    println!("holes made: {}", dropped.join(", "));

    spec = policy(
        3,
        Some(Retention {
            keep: args.keep,
            action: RetentionAction::Drop,
        }),
    );

    // Writer during apply.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_loop(pool.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let report = apply(&pool, &spec, now, &ApplyOptions::default()).await?;
    let applied_in = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = writer.await??;

    // Same writer, same duration (including the warm-up), without apply.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_loop(pool.clone(), stop.clone()));
    tokio::time::sleep(applied_in + Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let baseline = writer.await??;

    println!(
        "apply: {:.3} s, {} steps executed",
        applied_in.as_secs_f64(),
        report.executed.len()
    );
    for step in &report.executed {
        println!("  {step}");
    }
    print_writer("writer during apply", &during);
    print_writer("writer baseline   ", &baseline);
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    println!(
        "p99 ratio (during / baseline): {:.2}, max ratio: {:.2}",
        ratio(
            during.latency_us.value_at_quantile(0.99),
            baseline.latency_us.value_at_quantile(0.99)
        ),
        ratio(during.latency_us.max(), baseline.latency_us.max())
    );
    for error in during.errors.iter().chain(&baseline.errors).take(5) {
        println!("  error: {error}");
    }
    pool.close().await;
    Ok(())
}

fn policy(premake: u32, retention: Option<Retention>) -> PartitionPolicySpec {
    PartitionPolicySpec {
        database: DatabaseRef {
            secret_name: "unused".into(),
            key: "url".into(),
        },
        table: "events".into(),
        column: "recorded_at".into(),
        interval: Interval::Monthly,
        premake,
        time_zone: "UTC".into(),
        retention,
        default_partition: false,
        suspend: false,
        dry_run: false,
    }
}

/// Loads every month with `INSERT … SELECT generate_series`, two months at
/// a time (one per core).
async fn load(
    pool: &PgPool,
    bounds: &[(DateTime<Utc>, DateTime<Utc>)],
    rows: u64,
) -> anyhow::Result<()> {
    let rows = i64::try_from(rows)?;
    let mut chunks = bounds.chunks(2);
    for pair in chunks.by_ref() {
        let loads = pair.iter().map(|(from, to)| {
            sqlx::query(
                "INSERT INTO events (stream_id, stream_version, event_type, data, recorded_at)
                 SELECT 'stream-' || (g % 50000), g / 50000 + 1, 'Loaded',
                        jsonb_build_object('n', g, 'note', 'measurement row'),
                        $1::timestamptz + ($2::timestamptz - $1::timestamptz) * (g::float8 / ($3 + 1))
                   FROM generate_series(1, $3) g",
            )
            .bind(from)
            .bind(to)
            .bind(rows)
            .execute(pool)
        });
        for done in futures::future::join_all(loads).await {
            done?;
        }
    }
    Ok(())
}

async fn write_loop(pool: PgPool, stop: Arc<AtomicBool>) -> anyhow::Result<WriterStats> {
    let mut stats = WriterStats {
        inserts: 0,
        errors: Vec::new(),
        latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
    };
    let mut version = 0i64;
    while !stop.load(Ordering::Relaxed) {
        version += 1;
        let started = Instant::now();
        let result = sqlx::query(
            "INSERT INTO events (stream_id, stream_version, event_type, data)
             VALUES ('writer', $1, 'Measured', '{\"n\": 1}')",
        )
        .bind(version)
        .execute(&pool)
        .await;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        stats.latency_us.saturating_record(micros.max(1));
        match result {
            Ok(_) => stats.inserts += 1,
            Err(e) => stats.errors.push(e.to_string()),
        }
    }
    Ok(stats)
}

fn print_writer(label: &str, stats: &WriterStats) {
    let h = &stats.latency_us;
    println!(
        "{label}: {} inserts, {} errors, p50 {} us, p99 {} us, max {} us",
        stats.inserts,
        stats.errors.len(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    );
}
