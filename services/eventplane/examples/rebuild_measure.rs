//! Measures a rebuild: the replay rate into a new table version over a
//! large log, against a raw `INSERT … SELECT` of the same rows in the same
//! run, and what readers of the stable name wait while it runs and swaps.
//!
//! cargo run --release -p eventplane --example rebuild_measure -- --events 1000000

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use eventplane::metrics::Metrics;
use eventplane::projector::rebuild::{RebuildOptions, run};
use eventplane_store::Projection;
use hdrhistogram::Histogram;
use sqlx::PgPool;

#[derive(Parser, Debug)]
struct Args {
    /// Events in the log (80% OrderPlaced, 20% OrderPaid).
    #[arg(long, default_value_t = 1_000_000)]
    events: i64,
    /// Events replayed per batch.
    #[arg(long, default_value_t = 10_000)]
    batch_size: i64,
    /// Admin URL; a scratch database is created next to it and dropped.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
}

fn orders(version: u32) -> Projection {
    let yaml = eventplane::dev::ORDERS_MANIFEST
        .replace("spec:\n", &format!("spec:\n  version: {version}\n"));
    Projection::from_manifest(
        eventplane_api::load_manifests(&yaml)
            .expect("sample is valid")
            .remove(0),
    )
}

async fn load_log(pool: &PgPool, events: i64) -> anyhow::Result<()> {
    let placed = events * 4 / 5;
    let chunk = 100_000;
    let mut from = 1;
    while from <= placed {
        let to = (from + chunk - 1).min(placed);
        sqlx::query(
            "INSERT INTO events (stream_id, stream_version, event_type, data) \
             SELECT 'order-' || g, 1, 'OrderPlaced', \
                    jsonb_build_object('orderId', 'o' || g, 'customerId', 'c' || (g % 1000), 'total', ((g % 500) || '.25')) \
             FROM generate_series($1::bigint, $2::bigint) g",
        )
        .bind(from)
        .bind(to)
        .execute(pool)
        .await?;
        from = to + 1;
    }
    // Every fourth order is paid.
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_type, data) \
         SELECT 'order-' || (g * 4), 2, 'OrderPaid', jsonb_build_object('orderId', 'o' || (g * 4)) \
         FROM generate_series(1::bigint, $1::bigint) g",
    )
    .bind(events - placed)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE events").execute(pool).await?;
    Ok(())
}

/// The same rows, computed by Postgres alone: one INSERT … SELECT for the
/// places and one UPDATE … FROM for the payments.
async fn baseline(
    pool: &PgPool,
    spec: &eventplane_api::ProjectionSpec,
) -> anyhow::Result<Duration> {
    let ddl = eventplane_plan::create_table_sql(spec, "baseline").remove(0);
    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(pool).await?;
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO baseline (id, status, customer_id, total, created_at, updated_at) \
         SELECT data->>'orderId', 'PENDING', data->>'customerId', (data->>'total')::numeric, recorded_at, recorded_at \
         FROM events WHERE event_type = 'OrderPlaced' ON CONFLICT (id) DO NOTHING",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "UPDATE baseline b SET status = 'PAID', updated_at = e.recorded_at \
         FROM events e WHERE e.event_type = 'OrderPaid' AND b.id = e.data->>'orderId'",
    )
    .execute(pool)
    .await?;
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = eventplane_telemetry::init(false);
    let admin = PgPool::connect(&args.database_url).await?;
    let name = format!("ep_rebuild_measure_{}", std::process::id());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    let mut url = url::Url::parse(&args.database_url)?;
    url.set_path(&name);
    let result = measure(&args, url.as_str()).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    result
}

async fn measure(args: &Args, url: &str) -> anyhow::Result<()> {
    let pool = eventplane_store::db::connect(url, 8, "measure").await?;
    eventplane_store::db::migrate(&pool).await?;
    let started = Instant::now();
    load_log(&pool, args.events).await?;
    println!(
        "log: {} events loaded in {:.1} s",
        args.events,
        started.elapsed().as_secs_f64()
    );

    let v1 = orders(1);
    eventplane_store::versions::ensure(&pool, &v1).await?;
    let base = baseline(&pool, &v1.spec).await?;

    // Readers of the stable name for the whole rebuild, swap included.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut latency =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut errors = 0u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let t = Instant::now();
                let id = format!("o{}", n % 100_000 + 1);
                let result: Result<Option<String>, _> =
                    sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
                        .bind(&id)
                        .fetch_optional(&pool)
                        .await;
                if result.is_err() {
                    errors += 1;
                }
                let _ = latency.record(t.elapsed().as_micros().max(1) as u64);
            }
            (latency, errors)
        })
    };

    let v2 = orders(2);
    let mut options = RebuildOptions::from_spec(&v2.spec);
    options.batch_size = args.batch_size;
    let report = run(&pool, &v2, None, Metrics::new(), &options).await?;
    stop.store(true, Ordering::Relaxed);
    let (latency, errors) = reader.await?;

    let baseline_rate = args.events as f64 / base.as_secs_f64();
    println!(
        "baseline INSERT … SELECT + UPDATE … FROM: {:.2} s = {:.0} events/s",
        base.as_secs_f64(),
        baseline_rate
    );
    println!(
        "rebuild load ({}): {} events in {:.2} s = {:.0} events/s (ratio to baseline {:.2}x); indexes {:.2} s",
        if report.set_based {
            "one set-based query"
        } else {
            "batch by batch"
        },
        report.events_loaded,
        report.load_seconds,
        report.events_per_second,
        report.events_per_second / baseline_rate,
        report.index_seconds
    );
    println!(
        "swap: {} attempt(s), view lock held {:.2} ms",
        report.swap_attempts, report.swap_lock_ms
    );
    println!(
        "readers of the stable name during the rebuild: {} reads, {} errors, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latency.len(),
        errors,
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.max() as f64 / 1000.0
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&pool)
        .await?;
    let same: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ((SELECT id, status FROM orders EXCEPT SELECT id, status FROM baseline) \
         UNION ALL (SELECT id, status FROM baseline EXCEPT SELECT id, status FROM orders)) d",
    )
    .fetch_one(&pool)
    .await?;
    println!("check: {rows} rows in the new version, {same} differing from the baseline");
    Ok(())
}
