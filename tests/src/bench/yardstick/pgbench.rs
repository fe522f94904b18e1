//! The reference for appends: `pgbench` inserting one row per transaction
//! into a table with the shape, partitioning and indexes of `events`, at
//! the same client count.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use sqlx::PgPool;

use super::cpu::{CpuUse, Sampler};
use crate::bench::load;

/// `events` itself under another name: its columns, defaults (the
/// position comes from the events' own sequence), primary key, indexes and
/// monthly range partitioning, copied by `LIKE` so the two cannot drift.
const TABLE_DDL: [&str; 2] = [
    "CREATE TABLE bench_events (LIKE events INCLUDING ALL) PARTITION BY RANGE (recorded_at)",
    "CREATE TABLE bench_events_now PARTITION OF bench_events
        FOR VALUES FROM (now() - interval '1 month') TO (now() + interval '1 month')",
];

/// The same event the wrk append script sends, on a stream of its own.
const SCRIPT: &str = "\\set n random(1, 1000000000)
INSERT INTO bench_events (stream_id, stream_version, event_type, data) VALUES ('order-p-' || :client_id || '-' || nextval('events_position_seq'), 1, 'OrderPlaced', jsonb_build_object('orderId', 'p-' || :n, 'customerId', 'c-' || (:n % 1000), 'total', (10 + :n % 90) || '.' || lpad((:n % 100)::text, 2, '0')));
";

#[derive(Debug, Serialize)]
pub struct PgbenchRun {
    pub transactions: u64,
    pub tps: f64,
    /// (percentile, microseconds) from pgbench's per-transaction log.
    pub latency_us: Vec<(f64, u64)>,
    pub cpu: CpuUse,
}

impl PgbenchRun {
    pub fn percentile_ms(&self, p: f64) -> f64 {
        self.latency_us
            .iter()
            .find(|(q, _)| *q >= p)
            .map_or(f64::NAN, |(_, us)| *us as f64 / 1000.0)
    }
}

pub fn available() -> bool {
    std::process::Command::new("pgbench")
        .arg("--version")
        .output()
        .is_ok()
}

pub async fn prepare(pool: &PgPool) -> anyhow::Result<()> {
    for ddl in TABLE_DDL {
        sqlx::query(ddl).execute(pool).await?;
    }
    Ok(())
}

/// Runs the inserts for `duration` at `clients` connections: as fast as
/// they go, or, with `rate`, on pgbench's schedule of that many a second
/// (its open loop), each latency then counted from the transaction's
/// scheduled start.
pub async fn run(
    dir: &Path,
    database_url: &str,
    clients: usize,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<PgbenchRun> {
    let script = dir.join("pgbench-insert.sql");
    std::fs::write(&script, SCRIPT)?;
    let logs = dir.join("pgbench-log");
    let sampler = Sampler::start("pgbench");
    let output = tokio::process::Command::new("pgbench")
        .current_dir(dir)
        .args(["-n", "-j", "2", "-l", "--log-prefix"])
        .arg(&logs)
        .arg(format!("-c{clients}"))
        .arg(format!("-T{}", duration.as_secs().max(1)))
        .args(rate.map(|r| format!("-R{r:.0}")))
        .arg("-f")
        .arg(&script)
        .arg(database_url)
        .kill_on_drop(true)
        .output()
        .await
        .context("running pgbench (Debian package postgresql-contrib)")?;
    let cpu = sampler.finish();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let tps = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no tps in pgbench output: {stdout}"))?;
    let mut latency = load::histogram();
    let mut transactions = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("pgbench-log"));
        if !is_log {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            if let Some(us) = logged_latency_us(line) {
                latency.saturating_record(u64::max(us, 1));
                transactions += 1;
            }
        }
        std::fs::remove_file(&path)?;
    }
    Ok(PgbenchRun {
        transactions,
        tps,
        latency_us: percentiles(&latency),
        cpu,
    })
}

/// A transaction's latency from one line of pgbench's log: `client_id
/// transaction_no time script_no time_epoch time_us [schedule_lag]`, where
/// `time` runs from the transaction's start and, with `--rate`,
/// `schedule_lag` is how long after its scheduled start it started.
fn logged_latency_us(line: &str) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let time: u64 = fields.get(2)?.parse().ok()?;
    let lag: u64 = fields.get(6).and_then(|v| v.parse().ok()).unwrap_or(0);
    Some(time + lag)
}

/// The percentiles the wrk scripts report, from an HDR histogram, so both
/// sides plot on the same points.
pub fn percentiles(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    super::wrk::percentile_grid()
        .into_iter()
        .map(|p| (p, h.value_at_quantile(p / 100.0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::logged_latency_us;

    #[test]
    fn a_scheduled_transaction_counts_from_its_scheduled_start() {
        assert_eq!(logged_latency_us("3 17 850 0 1796613765 915221"), Some(850));
        assert_eq!(
            logged_latency_us("3 17 850 0 1796613765 915221 1200"),
            Some(2050)
        );
        assert_eq!(logged_latency_us("garbage"), None);
    }
}
