//! The yardstick: the same load driven by an outside load generator at
//! Eventplane and at a reference that does the bare minimum of the same
//! work, in the same run, with the CPU every party used. Ratios between the
//! two hold on a noisy machine where absolute figures drift.
//!
//! | Eventplane (wrk)            | reference                                 |
//! |-----------------------------|-------------------------------------------|
//! | appends, one per new stream | pgbench: one INSERT per transaction into a table shaped like `events` |
//! | cache-hit row reads         | bare axum answering the same row's bytes  |
//! | cache-miss row reads (L3)   | bare axum + sqlx running the same SELECT  |

pub mod bare;
pub mod cpu;
pub mod pgbench;
pub mod plot;
pub mod read_paths;
pub mod wrk;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::bench::load::Phase;
use crate::bench::openloop;
use cpu::CpuUse;
use pgbench::PgbenchRun;
use wrk::WrkRun;

pub const APPEND_RATIO_TARGET: f64 = 1.5;
/// The rate the cache-hit latency target is stated at.
const HIT_OPEN_RATE: f64 = crate::bench::report::HIT_RATE_TARGET;
pub const HIT_RATIO_TARGET: f64 = 0.85;
pub const MISS_RATIO_TARGET: f64 = 0.8;

/// Connections of the bare SELECT server's pool: as many as the query
/// service reads with.
const READ_POOL: u32 = 16;

pub struct Yardstick {
    pub appends: WrkRun,
    pub pgbench: PgbenchRun,
    /// Latency on a fixed schedule: appends, then cache hits.
    pub open: Vec<OpenComparison>,
    pub hits: WrkRun,
    pub bare_hits: WrkRun,
    pub misses: WrkRun,
    pub bare_misses: WrkRun,
    /// The read path on each backend given (one Redis, a cluster, a replica).
    pub read_paths: Vec<read_paths::ReadPath>,
    pub plots: Vec<PathBuf>,
}

/// What the read phases need from the run so far.
pub struct Reads<'a> {
    pub base: &'a str,
    pub database_url: &'a str,
    pub projection: &'a str,
    pub table: &'a str,
    pub key_column: &'a str,
    /// Keys already read once (the cache holds them).
    pub hot: &'a [String],
    /// The bytes of one hot row, as the query service answers it.
    pub hot_row: bytes::Bytes,
}

pub fn available() -> Result<(), String> {
    let missing: Vec<&str> = [("wrk", wrk::available()), ("pgbench", pgbench::available())]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} not installed (Debian packages wrk and postgresql-contrib)",
            missing.join(" and ")
        ))
    }
}

pub struct Appends {
    pub appends: WrkRun,
    pub pgbench: PgbenchRun,
    pub open: OpenComparison,
    /// The run id in the stream and order ids wrk wrote.
    pub run_id: String,
}

/// Orders appended through the store in large batches (the same append
/// function, without HTTP), so the miss phases have keys enough that none
/// is read twice.
pub async fn seed_cold_orders(pool: &PgPool, run_id: &str, n: usize) -> anyhow::Result<()> {
    use eventplane_store::events::model::NamedVersion;
    use eventplane_store::events::{AppendRequest, ExpectedVersion, NewEvent};
    let requests: Vec<AppendRequest> = (0..n)
        .map(|i| AppendRequest {
            stream_id: format!("order-{run_id}-s-{i}"),
            expected_version: ExpectedVersion::Named(NamedVersion::NoStream),
            events: vec![NewEvent::new(
                "OrderPlaced",
                &json!({
                    "orderId": format!("{run_id}-s-{i}"),
                    "customerId": format!("c-{}", i % 1000),
                    "total": format!("{}.{:02}", 10 + i % 90, i % 100),
                }),
            )],
            idempotency_key: None,
            traceparent: None,
        })
        .collect();
    for batch in requests.chunks(2000) {
        let refs: Vec<&AppendRequest> = batch.iter().collect();
        eventplane_store::events::append(pool, &refs).await?;
    }
    Ok(())
}

/// wrk appends against Eventplane, then pgbench inserts, for `duration`
/// each at `clients` connections; then both again on a schedule of
/// `open_rate` a second.
pub async fn appends(
    dir: &Path,
    base: &str,
    pool: &PgPool,
    database_url: &str,
    clients: usize,
    duration: Duration,
    open_rate: f64,
) -> anyhow::Result<Appends> {
    let run_id = format!("w{:x}", chrono::Utc::now().timestamp_millis());
    let appends = wrk::run(
        dir,
        wrk::APPEND,
        base,
        clients,
        duration,
        &[("EVENTPLANE_WRK_RUN", run_id.clone())],
    )
    .await
    .context("wrk appends")?;
    pgbench::prepare(pool).await?;
    let pgbench = pgbench::run(dir, database_url, clients, duration, None)
        .await
        .context("pgbench inserts")?;
    let (eventplane_open, _) = openloop::run(&openloop::Spec {
        addr: addr_of(base),
        method: "POST".into(),
        paths: vec![format!("/v1/streams/order-{run_id}-o{{n}}/events")],
        body: Some(format!(
            r#"{{"expectedVersion":"no_stream","events":[{{"type":"OrderPlaced","data":{{"orderId":"{run_id}-o{{n}}","customerId":"c-1","total":"12.50"}}}}]}}"#
        )),
        rate: open_rate,
        duration_ms: duration.as_millis() as u64,
        connections: clients,
        expect: 201,
    })
    .await
    .context("open-loop appends")?;
    let pgbench_open = pgbench::run(dir, database_url, clients, duration, Some(open_rate))
        .await
        .context("pgbench inserts on a schedule")?;
    Ok(Appends {
        appends,
        pgbench,
        open: OpenComparison {
            what: "appends, 1 event on a new stream",
            rate: open_rate,
            eventplane: LatencyAt::of_phase(&eventplane_open),
            reference_name: "pgbench --rate, INSERT per transaction",
            reference: LatencyAt::of_pgbench(&pgbench_open, duration),
        },
        run_id,
    })
}

/// `host:port` of a `http://host:port` base URL.
fn addr_of(base: &str) -> String {
    base.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// Latency at a fixed rate, on an open-loop schedule.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LatencyAt {
    pub achieved: f64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// How late the load generator sent its requests at P99, when known.
    pub sent_late_p99_ms: Option<f64>,
}

impl LatencyAt {
    fn of_phase(phase: &Phase) -> Self {
        LatencyAt {
            achieved: phase.rate(),
            errors: phase.errors,
            p50_ms: phase.p50(),
            p99_ms: phase.p99(),
            p999_ms: phase.p999(),
            sent_late_p99_ms: phase.pacing_p99_ms,
        }
    }

    fn of_pgbench(run: &PgbenchRun, duration: Duration) -> Self {
        LatencyAt {
            achieved: run.transactions as f64 / duration.as_secs_f64().max(1e-9),
            errors: 0,
            p50_ms: run.percentile_ms(50.0),
            p99_ms: run.percentile_ms(99.0),
            p999_ms: run.percentile_ms(99.9),
            sent_late_p99_ms: None,
        }
    }
}

/// Eventplane and its reference on the same schedule, one after the other.
pub struct OpenComparison {
    pub what: &'static str,
    pub rate: f64,
    pub eventplane: LatencyAt,
    pub reference_name: &'static str,
    pub reference: LatencyAt,
}

/// Cache hits and misses against Eventplane and the bare references.
pub async fn reads(
    dir: &Path,
    appends: Appends,
    reads: Reads<'_>,
    clients: usize,
    duration: Duration,
    plots: &Path,
    backends: &read_paths::Backends,
) -> anyhow::Result<Yardstick> {
    let rows = |keys: &[String]| -> String {
        keys.iter()
            .map(|k| format!("/v1/projections/{}/rows/{k}\n", reads.projection))
            .collect()
    };
    let hot_paths = dir.join("hot-paths");
    std::fs::write(&hot_paths, rows(reads.hot))?;

    let bare = bare::fixed(reads.hot_row.clone()).await?;
    let half = (duration / 2).max(Duration::from_secs(1));
    let (hits, bare_hits) = interleaved(
        dir,
        clients,
        half,
        [(reads.base, &hot_paths), (&bare.base, &hot_paths)],
        [(&bare.base, &hot_paths), (reads.base, &hot_paths)],
    )
    .await
    .context("wrk cache hits")?;
    let hot_list: Vec<String> = reads
        .hot
        .iter()
        .map(|k| format!("/v1/projections/{}/rows/{k}", reads.projection))
        .collect();
    let hits_on = |addr: String| openloop::Spec {
        addr,
        method: "GET".into(),
        paths: hot_list.clone(),
        body: None,
        rate: HIT_OPEN_RATE,
        duration_ms: duration.as_millis() as u64,
        connections: clients,
        expect: 200,
    };
    let (bare_open, _) = openloop::run(&hits_on(addr_of(&bare.base)))
        .await
        .context("open-loop bare hits")?;
    drop(bare);
    let (hits_open, _) = openloop::run(&hits_on(addr_of(reads.base)))
        .await
        .context("open-loop cache hits")?;

    // Orders wrk appended and nobody has read yet: each is read once, so
    // every answer comes from Postgres (the layer counts show it). The
    // reference reads through a pool set up as the query service's read
    // pool is.
    let pool = eventplane_store::db::connect_with(
        reads.database_url,
        "bench-reference",
        &eventplane_store::db::PoolConfig {
            check_idle_after: Some(eventplane::query::replica::READ_CHECK_IDLE_AFTER),
            ..eventplane_store::db::PoolConfig::new(READ_POOL)
        },
    )
    .await?;
    // Settle the fresh rows first: whichever side read them first would
    // otherwise pay for setting their hint bits, or meet autovacuum.
    sqlx::query("VACUUM (ANALYZE)").execute(&pool).await?;
    let cold: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {key}::text FROM {table} WHERE {key}::text LIKE $1 ORDER BY {key}",
        key = eventplane_api::quote_ident(reads.key_column),
        table = eventplane_api::quote_ident(reads.table),
    )))
    .bind(format!("{}-%", appends.run_id))
    .fetch_all(&pool)
    .await?;
    // Disjoint sets, one per miss run below and one per backend compared,
    // dealt in turn: each set holds the same mix of keys (appended by wrk,
    // on a schedule, in bulk) spread alike over the table, so no run reads
    // rows laid out more kindly than another's.
    let mut sets: Vec<Vec<String>> = vec![Vec::new(); MISS_RUNS + read_paths::cold_sets(backends)];
    let n = sets.len();
    for (i, key) in cold.into_iter().enumerate() {
        sets[i % n].push(key);
    }
    let cold_paths: Vec<PathBuf> = (0..MISS_RUNS)
        .map(|i| {
            let path = dir.join(format!("cold-{i}"));
            std::fs::write(&path, rows(&sets[i]))?;
            Ok(path)
        })
        .collect::<anyhow::Result<_>>()?;
    let bare = bare::select(pool.clone(), reads.table, reads.key_column).await?;
    // Each run reads keys of its own; a quarter of the time each, rounded
    // up to whole seconds (wrk's unit).
    let quarter = Duration::from_secs(duration.as_secs().div_ceil(4).max(1));
    let (misses, bare_misses) = interleaved(
        dir,
        clients,
        quarter,
        [(reads.base, &cold_paths[0]), (&bare.base, &cold_paths[1])],
        [(&bare.base, &cold_paths[2]), (reads.base, &cold_paths[3])],
    )
    .await
    .context("wrk cache misses")?;
    drop(bare);
    pool.close().await;
    let read_paths = if read_paths::cold_sets(backends) > 1 {
        read_paths::run(
            backends,
            read_paths::Setup {
                dir,
                database_url: reads.database_url,
                projection: reads.projection,
                hot: reads.hot,
                cold: sets[MISS_RUNS..].iter().map(Vec::as_slice).collect(),
                clients,
                duration,
            },
        )
        .await?
    } else {
        Vec::new()
    };

    let mut yardstick = Yardstick {
        appends: appends.appends,
        pgbench: appends.pgbench,
        open: vec![
            appends.open,
            OpenComparison {
                what: "cache-hit row reads",
                rate: HIT_OPEN_RATE,
                eventplane: LatencyAt::of_phase(&hits_open),
                reference_name: "bare axum, same bytes",
                reference: LatencyAt::of_phase(&bare_open),
            },
        ],
        hits,
        bare_hits,
        misses,
        bare_misses,
        read_paths,
        plots: Vec::new(),
    };
    yardstick.plots = yardstick.plot(plots)?;
    Ok(yardstick)
}

/// Runs of each side in the miss comparison: A B B A.
const MISS_RUNS: usize = 4;

/// Eventplane (A) and its reference (B) under the same load in the order
/// A B B A, `each` long per run, and each side's two runs read as one:
/// whatever drifts over the sitting (a checkpoint, the machine's other
/// tenants, a cache warming) weighs on both sides alike instead of on
/// whichever ran first. `first` holds A's and then B's (URL, paths) for the
/// first pair; `second` B's and then A's for the second.
async fn interleaved(
    dir: &Path,
    clients: usize,
    each: Duration,
    first: [(&str, &Path); 2],
    second: [(&str, &Path); 2],
) -> anyhow::Result<(WrkRun, WrkRun)> {
    let mut runs = Vec::with_capacity(4);
    for (url, paths) in first.into_iter().chain(second) {
        let env = [("EVENTPLANE_WRK_PATHS", paths.display().to_string())];
        runs.push(wrk::run(dir, wrk::PATHS, url, clients, each, &env).await?);
    }
    let [a1, b1, b2, a2]: [WrkRun; 4] = runs.try_into().expect("four runs");
    Ok((WrkRun::merge(&[a1, a2]), WrkRun::merge(&[b1, b2])))
}

/// One row of the comparison.
pub struct Comparison<'a> {
    pub what: &'static str,
    pub status: &'static str,
    pub eventplane: &'a WrkRun,
    pub reference_name: &'static str,
    pub reference_rate: f64,
    pub reference_p99: f64,
    pub reference_cpu: &'a CpuUse,
    pub reference_latency: &'a [(f64, u64)],
    pub target: f64,
    /// For misses: the share of answers that must have come from Postgres
    /// for the row to measure misses at all.
    pub min_l3_share: Option<f64>,
}

impl Comparison<'_> {
    pub fn verdict(&self) -> String {
        let l3 = self.eventplane.layer_share(&["l3"]);
        match self.min_l3_share {
            Some(min) if l3 < min => format!("not shown ({:.0}% from L3)", 100.0 * l3),
            _ if self.ratio() >= self.target => "met".into(),
            _ => "NOT MET".into(),
        }
    }

    pub fn ratio(&self) -> f64 {
        if self.reference_rate > 0.0 {
            self.eventplane.rate_of(self.status) / self.reference_rate
        } else {
            f64::NAN
        }
    }
}

impl Yardstick {
    pub fn comparisons(&self) -> [Comparison<'_>; 3] {
        [
            Comparison {
                what: "appends/s, 1 event on a new stream",
                status: "201",
                eventplane: &self.appends,
                reference_name: "pgbench INSERT per transaction",
                reference_rate: self.pgbench.tps,
                reference_p99: self.pgbench.percentile_ms(99.0),
                reference_cpu: &self.pgbench.cpu,
                reference_latency: &self.pgbench.latency_us,
                target: APPEND_RATIO_TARGET,
                min_l3_share: None,
            },
            Comparison {
                what: "cache-hit row reads/s",
                status: "200",
                eventplane: &self.hits,
                reference_name: "bare axum, same bytes",
                reference_rate: self.bare_hits.rate_of("200"),
                reference_p99: self.bare_hits.percentile_ms(99.0),
                reference_cpu: &self.bare_hits.cpu,
                reference_latency: &self.bare_hits.latency_us,
                target: HIT_RATIO_TARGET,
                min_l3_share: None,
            },
            Comparison {
                what: "cache-miss row reads/s (each key once)",
                status: "200",
                eventplane: &self.misses,
                reference_name: "bare axum + sqlx, same SELECT",
                reference_rate: self.bare_misses.rate_of("200"),
                reference_p99: self.bare_misses.percentile_ms(99.0),
                reference_cpu: &self.bare_misses.cpu,
                reference_latency: &self.bare_misses.latency_us,
                target: MISS_RATIO_TARGET,
                min_l3_share: Some(0.95),
            },
        ]
    }

    fn plot(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the plot directory {}", dir.display()))?;
        let names = ["appends.svg", "cache-hits.svg", "cache-misses.svg"];
        let mut written = Vec::new();
        for (c, name) in self.comparisons().iter().zip(names) {
            let path = dir.join(name);
            plot::write(
                &path,
                c.what,
                &[
                    plot::Curve {
                        label: "eventplane (wrk)".into(),
                        points: &c.eventplane.latency_us,
                    },
                    plot::Curve {
                        label: c.reference_name.into(),
                        points: c.reference_latency,
                    },
                ],
            )?;
            written.push(path);
        }
        Ok(written)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nyardstick (wrk {} threads; reads alternate A B B A with the reference, same clients)",
            wrk::THREADS
        );
        let _ = writeln!(
            out,
            "{:<40} {:>10} {:>9} {:>8} {:>10} {:>9} {:>7} {:>7}  verdict",
            "what", "eventplane", "p99 ms", "other", "reference", "p99 ms", "ratio", "target"
        );
        for c in self.comparisons() {
            let ratio = c.ratio();
            let _ = writeln!(
                out,
                "{:<40} {:>10.0} {:>9.2} {:>8} {:>10.0} {:>9.2} {:>6.2}x {:>6.2}x  {}",
                c.what,
                c.eventplane.rate_of(c.status),
                c.eventplane.percentile_ms(99.0),
                c.eventplane.others(c.status),
                c.reference_rate,
                c.reference_p99,
                ratio,
                c.target,
                c.verdict()
            );
            let _ = writeln!(out, "  reference: {}", c.reference_name);
            let _ = writeln!(out, "  cpu, eventplane: {}", c.eventplane.cpu.render());
            let _ = writeln!(out, "  cpu, reference:  {}", c.reference_cpu.render());
            if !c.eventplane.layers.is_empty() {
                let _ = writeln!(
                    out,
                    "  cache layers that answered: {:?}",
                    c.eventplane.layers
                );
            }
            let _ = writeln!(out, "  statuses: {:?}", c.eventplane.statuses);
        }
        let _ = writeln!(
            out,
            "\nlatency on a schedule (open loop; the reference runs right after, same clients)"
        );
        let _ = writeln!(
            out,
            "{:<34} {:>8} {:>26} {:>26}  reference",
            "what", "rate", "eventplane p50/p99/p99.9", "reference p50/p99/p99.9"
        );
        for o in &self.open {
            let ms = |l: &LatencyAt| format!("{:.2}/{:.2}/{:.2} ms", l.p50_ms, l.p99_ms, l.p999_ms);
            let _ = writeln!(
                out,
                "{:<34} {:>7.0}/s {:>26} {:>26}  {}",
                o.what,
                o.rate,
                ms(&o.eventplane),
                ms(&o.reference),
                o.reference_name
            );
            let late = |l: &LatencyAt| {
                l.sent_late_p99_ms
                    .map_or_else(|| "not known".to_string(), |ms| format!("{ms:.2} ms"))
            };
            let _ = writeln!(
                out,
                "  achieved {:.0}/s ({} errors) and {:.0}/s ({} errors); requests sent late at P99: {}, {}",
                o.eventplane.achieved,
                o.eventplane.errors,
                o.reference.achieved,
                o.reference.errors,
                late(&o.eventplane),
                late(&o.reference)
            );
        }
        if !self.read_paths.is_empty() {
            out.push_str(&read_paths::render(&self.read_paths));
        }
        for p in &self.plots {
            let _ = writeln!(out, "plot: {}", p.display());
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .comparisons()
            .iter()
            .map(|c| {
                json!({
                    "what": c.what,
                    "eventplane": c.eventplane,
                    "eventplane_rate": c.eventplane.rate_of(c.status),
                    "reference": c.reference_name,
                    "reference_rate": c.reference_rate,
                    "reference_p99_ms": crate::bench::load::finite(c.reference_p99),
                    "reference_cpu": c.reference_cpu,
                    "ratio": crate::bench::load::finite(c.ratio()),
                    "target_ratio": c.target,
                    "verdict": c.verdict(),
                })
            })
            .collect();
        let open: Vec<Value> = self
            .open
            .iter()
            .map(|o| {
                json!({
                    "what": o.what,
                    "rate": o.rate,
                    "eventplane": o.eventplane,
                    "reference": o.reference_name,
                    "reference_latency": o.reference,
                })
            })
            .collect();
        json!({ "comparisons": rows, "open_loop": open, "pgbench": self.pgbench, "bare_hits": self.bare_hits, "bare_misses": self.bare_misses, "read_paths": read_paths::to_json(&self.read_paths), "plots": self.plots })
    }
}
