//! Measures what partition maintenance costs a writer, for the executor and,
//! when the extension is installed, for pg_partman on an identical table in
//! the same run:
//! - premake on an empty table: 12 months ahead and 24 back;
//! - a loaded table (many monthly partitions with rows, holes punched, the
//!   oldest months past retention): one maintenance run while a writer
//!   inserts in a loop, against a run of the same length without it.
//!
//! `--sample-locks` also samples `pg_locks` / `pg_stat_activity` during each
//! maintenance run and prints the longest waits of the writer with the
//! statements it waited behind (the sampling itself costs the writer a little).
//!
//! cargo run --release -p eventplane-store --example partition_measure -- --months 24 --rows-per-month 100000

mod locks;
mod partman;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Months, Utc};
use clap::Parser;
use eventplane_api::{DatabaseRef, Interval, PartitionPolicySpec, Retention, RetentionAction};
use eventplane_plan::{Bound, interval_start, next_start};
use eventplane_store::partitions::{ApplyOptions, apply};
use hdrhistogram::Histogram;
use sqlx::PgPool;

/// The executor's connections, as `pg_stat_activity` names them.
const APPLY_APP: &str = "eventplane-measure";
/// The writer's connections.
const WRITER_APP: &str = "eventplane-measure-writer";
/// The loaded table maintained by the executor (the event store's own).
const OURS: &str = "events";
/// Its identical twin maintained by pg_partman.
const THEIRS: &str = "pm_events";
/// Months premade ahead and made back on the empty table.
const EMPTY_AHEAD: u32 = 12;
const EMPTY_BACK: u32 = 24;
/// Months premade ahead on the loaded table.
const LOADED_AHEAD: u32 = 3;
/// Writer time before and after a maintenance run, so the run is inside
/// the measured window.
const MARGIN: Duration = Duration::from_millis(200);

#[derive(Parser, Debug)]
struct Args {
    /// Monthly partitions loaded before the measurement, ending with the
    /// current month.
    #[arg(long, default_value_t = 24)]
    months: u32,
    /// Rows loaded into each month.
    #[arg(long, default_value_t = 1_000_000)]
    rows_per_month: u64,
    /// Loaded months dropped again to leave holes for maintenance to fill.
    #[arg(long, default_value_t = 3)]
    holes: u32,
    /// Months kept by the policy's retention.
    #[arg(long, default_value_t = 18)]
    keep: u32,
    /// What the executor does with months past retention: drop, detach or
    /// archive (into schema events_archive); pg_partman always drops here.
    #[arg(long, default_value = "drop", value_parser = ["drop", "detach", "archive"])]
    retention_action: String,
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
    /// Sample lock waits during each maintenance run.
    #[arg(long)]
    sample_locks: bool,
    /// Skip pg_partman even when it is installed.
    #[arg(long)]
    no_partman: bool,
}

/// Inserts slower than this are listed with when they started.
const SLOW: Duration = Duration::from_millis(25);

struct WriterStats {
    inserts: u64,
    /// (start after the writer began, latency) of inserts slower than `SLOW`.
    slow: Vec<(Duration, Duration)>,
    errors: Vec<String>,
    latency_us: Histogram<u64>,
}

/// A maintenance run with a writer beside it.
struct Run<T> {
    output: T,
    elapsed: Duration,
    writer: WriterStats,
    waits: Option<Vec<locks::Statement>>,
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
    let writers = eventplane_store::db::connect(url, 2, "measure-writer").await?;
    eventplane_store::db::migrate(&pool).await?;
    let partman = !args.no_partman && partman::available(&pool).await?;
    if partman {
        partman::install(&pool).await?;
    } else {
        println!("pg_partman: not measured (not installed, or --no-partman)");
    }
    let now = Utc::now();
    let months = args.months.max(1);

    // Premake on an empty table.
    let back = now
        .checked_sub_months(Months::new(EMPTY_BACK))
        .context("months in range")?;
    twin(&pool, "premake_ours").await?;
    let started = Instant::now();
    let spec = policy("premake_ours", EMPTY_BACK + EMPTY_AHEAD, None);
    let report = apply(&pool, &spec, back, &ApplyOptions::default()).await?;
    let ours_premake = started.elapsed();
    println!(
        "premake {EMPTY_AHEAD} ahead and {EMPTY_BACK} back on an empty table: eventplane {} partitions in {:.1} ms",
        report.partitions_after.len(),
        ms(ours_premake)
    );
    if partman {
        twin(&pool, "premake_pm").await?;
        let started = Instant::now();
        partman::create_parent(&pool, "premake_pm", back, EMPTY_AHEAD as i32).await?;
        let elapsed = started.elapsed();
        println!(
            "premake {EMPTY_AHEAD} ahead and {EMPTY_BACK} back on an empty table: pg_partman create_parent {} partitions in {:.1} ms",
            partition_count(&pool, "premake_pm").await?,
            ms(elapsed)
        );
    }

    // The loaded months, oldest first, ending with the current one.
    let first = now
        .checked_sub_months(Months::new(months - 1))
        .context("months in range")?;
    let spec = policy(OURS, months - 1, None);
    apply(&pool, &spec, first, &ApplyOptions::default()).await?;
    let mut tables = vec![OURS];
    if partman {
        twin(&pool, THEIRS).await?;
        partman::create_parent(&pool, THEIRS, first, 1).await?;
        // Only the loaded months, like the executor's table.
        drop_partitions(&pool, THEIRS, |from| from > now).await?;
        tables.push(THEIRS);
    }
    let start = interval_start(&spec, first);
    let mut bounds = Vec::new();
    let mut from = start;
    for _ in 0..months {
        let to = next_start(&spec, from);
        bounds.push((from, to));
        from = to;
    }

    let loading = Instant::now();
    for table in &tables {
        load(&pool, table, &bounds, args.rows_per_month).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {table}")))
            .execute(&pool)
            .await?;
    }
    println!(
        "loaded {} table(s) with {} months x {} rows in {:.1} s",
        tables.len(),
        months,
        args.rows_per_month,
        loading.elapsed().as_secs_f64()
    );

    // Holes in the kept range, away from the current month.
    let holes: Vec<DateTime<Utc>> = (0..args.holes as usize)
        .filter_map(|i| bounds.len().checked_sub(3 + 2 * i))
        .map(|index| bounds[index].0)
        .collect();
    for table in &tables {
        drop_partitions(&pool, table, |from| holes.contains(&from)).await?;
    }
    println!(
        "holes made: {}",
        holes
            .iter()
            .map(|t| t.format("%Y-%m").to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Flush the load now, not during a measured run.
    sqlx::query("CHECKPOINT").execute(&pool).await?;

    let spec = policy(
        OURS,
        LOADED_AHEAD,
        Some(match args.retention_action.as_str() {
            "detach" => Retention::new(args.keep, RetentionAction::Detach),
            "archive" => Retention::archive(args.keep, "events_archive"),
            _ => Retention::new(args.keep, RetentionAction::Drop),
        }),
    );
    let ours = during(args, url, &writers, OURS, || async {
        Ok(apply(&pool, &spec, now, &ApplyOptions::default()).await?)
    })
    .await?;
    println!(
        "eventplane apply on the loaded table: {:.1} ms, {} steps",
        ms(ours.elapsed),
        ours.output.executed.len()
    );
    for (step, millis) in ours.output.executed.iter().zip(&ours.output.step_millis) {
        println!("  {millis:>5} ms  {step}");
    }
    print_writer("  writer during eventplane apply ", &ours.writer);
    if let Some(waits) = &ours.waits {
        locks::print("  lock waits during eventplane apply", waits);
    }

    let theirs = if partman {
        partman::configure(&pool, THEIRS, LOADED_AHEAD as i32, args.keep).await?;
        sqlx::query("CHECKPOINT").execute(&pool).await?;
        let run = during(args, url, &writers, THEIRS, || async {
            let started = Instant::now();
            partman::create_partitions(&pool, THEIRS, &holes).await?;
            let holes_filled = started.elapsed();
            partman::run_maintenance(&pool, THEIRS).await?;
            Ok((holes_filled, started.elapsed() - holes_filled))
        })
        .await?;
        println!(
            "pg_partman on the loaded table: {:.1} ms (create_partition_time for the holes {:.1} ms, run_maintenance {:.1} ms), {} partitions after",
            ms(run.elapsed),
            ms(run.output.0),
            ms(run.output.1),
            partition_count(&pool, THEIRS).await?
        );
        print_writer("  writer during pg_partman        ", &run.writer);
        if let Some(waits) = &run.waits {
            locks::print("  lock waits during pg_partman", waits);
        }
        Some(run)
    } else {
        None
    };

    // Same writer, same duration, without maintenance.
    let baseline = during(args, url, &writers, OURS, || async {
        tokio::time::sleep(ours.elapsed).await;
        Ok(())
    })
    .await?;
    print_writer("  writer baseline                 ", &baseline.writer);

    println!(
        "longest writer wait: eventplane {:.1} ms, pg_partman {}, baseline {:.1} ms",
        us_to_ms(ours.writer.latency_us.max()),
        theirs.as_ref().map_or("-".to_string(), |r| format!(
            "{:.1} ms",
            us_to_ms(r.writer.latency_us.max())
        )),
        us_to_ms(baseline.writer.latency_us.max())
    );
    for error in ours
        .writer
        .errors
        .iter()
        .chain(theirs.iter().flat_map(|r| &r.writer.errors))
        .chain(&baseline.writer.errors)
        .take(5)
    {
        println!("  error: {error}");
    }
    pool.close().await;
    writers.close().await;
    Ok(())
}

/// Runs `work` while a writer inserts into `table`, with `MARGIN` of
/// writing before and after.
async fn during<T, F, Fut>(
    args: &Args,
    url: &str,
    writers: &PgPool,
    table: &'static str,
    work: F,
) -> anyhow::Result<Run<T>>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let sampler = if args.sample_locks {
        Some(locks::Sampler::start(url, WRITER_APP, &[APPLY_APP]).await?)
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_loop(writers.clone(), table, stop.clone()));
    tokio::time::sleep(MARGIN).await;
    let started = Instant::now();
    let output = work().await?;
    let elapsed = started.elapsed();
    tokio::time::sleep(MARGIN).await;
    stop.store(true, Ordering::Relaxed);
    let writer = writer.await??;
    let waits = match sampler {
        Some(sampler) => Some(sampler.finish().await?),
        None => None,
    };
    Ok(Run {
        output,
        elapsed,
        writer,
        waits,
    })
}

fn policy(table: &str, premake: u32, retention: Option<Retention>) -> PartitionPolicySpec {
    PartitionPolicySpec {
        database: DatabaseRef {
            secret_name: "unused".into(),
            key: "url".into(),
        },
        table: table.into(),
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

/// An empty partitioned table shaped like `events`.
async fn twin(pool: &PgPool, table: &str) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (LIKE events INCLUDING ALL) PARTITION BY RANGE (recorded_at)"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

async fn partition_count(pool: &PgPool, table: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM pg_inherits WHERE inhparent = $1::regclass")
            .bind(table)
            .fetch_one(pool)
            .await?,
    )
}

/// Drops the range partitions of `table` whose lower bound matches.
async fn drop_partitions(
    pool: &PgPool,
    table: &str,
    matches: impl Fn(DateTime<Utc>) -> bool,
) -> anyhow::Result<()> {
    let spec = policy(table, 0, None);
    let mut conn = pool.acquire().await?;
    let observed = eventplane_store::partitions::observe(&mut conn, &spec).await?;
    drop(conn);
    for p in observed.partitions {
        if let Bound::Range { from, .. } = p.bound
            && matches(from)
        {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP TABLE {}",
                eventplane_api::quote_ident(&p.name)
            )))
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

/// Loads every month with `INSERT … SELECT generate_series`, two months at
/// a time (one per core).
async fn load(
    pool: &PgPool,
    table: &str,
    bounds: &[(DateTime<Utc>, DateTime<Utc>)],
    rows: u64,
) -> anyhow::Result<()> {
    let rows = i64::try_from(rows)?;
    let sql = format!(
        "INSERT INTO {table} (stream_id, stream_version, event_type, data, recorded_at)
         SELECT 'stream-' || (g % 50000), g / 50000 + 1, 'Loaded',
                jsonb_build_object('n', g, 'note', 'measurement row'),
                $1::timestamptz + ($2::timestamptz - $1::timestamptz) * (g::float8 / ($3 + 1))
           FROM generate_series(1, $3) g"
    );
    for pair in bounds.chunks(2) {
        let loads = pair.iter().map(|(from, to)| {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
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

async fn write_loop(
    pool: PgPool,
    table: &'static str,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<WriterStats> {
    let mut stats = WriterStats {
        inserts: 0,
        slow: Vec::new(),
        errors: Vec::new(),
        latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
    };
    let sql = format!(
        "INSERT INTO {table} (stream_id, stream_version, event_type, data)
         VALUES ('writer', $1, 'Measured', '{{\"n\": 1}}')"
    );
    // One connection for the whole loop, and one untimed insert first:
    // opening a connection (which a pool does when one it just released is
    // not back yet) and the backend's first plan of the statement are not
    // maintenance's doing.
    let began = Instant::now();
    let mut conn = pool.acquire().await?;
    let mut version = 1i64;
    sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
        .bind(version)
        .execute(&mut *conn)
        .await?;
    while !stop.load(Ordering::Relaxed) {
        version += 1;
        let started = Instant::now();
        let result = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(version)
            .execute(&mut *conn)
            .await;
        let took = started.elapsed();
        if took > SLOW {
            stats.slow.push((started - began, took));
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        stats.latency_us.saturating_record(micros.max(1));
        match result {
            Ok(_) => stats.inserts += 1,
            Err(e) => stats.errors.push(e.to_string()),
        }
    }
    Ok(stats)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn print_writer(label: &str, stats: &WriterStats) {
    let h = &stats.latency_us;
    println!(
        "{label}: {} inserts, {} errors, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        stats.inserts,
        stats.errors.len(),
        us_to_ms(h.value_at_quantile(0.5)),
        us_to_ms(h.value_at_quantile(0.99)),
        us_to_ms(h.max())
    );
    // Maintenance starts `MARGIN` after the writer.
    for (at, took) in &stats.slow {
        println!(
            "{label}  slow insert at {:+.1} ms from the start of maintenance: {:.1} ms",
            ms(*at) - ms(MARGIN),
            ms(*took)
        );
    }
}
