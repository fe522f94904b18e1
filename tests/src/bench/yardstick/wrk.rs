//! Drives HTTP load with `wrk`, a load generator that is not the system
//! under test and is light enough not to take the CPU it measures. Its Lua
//! scripts count every answer by status and by cache layer.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::cpu::{CpuUse, Sampler};

const COUNTS: &str = include_str!("counts.lua");
pub const APPEND: &str = include_str!("append.lua");
pub const PATHS: &str = include_str!("paths.lua");

/// wrk threads: one per core of these machines; connections are spread
/// over them.
pub const THREADS: usize = 2;

/// The percentiles every latency curve is reported at, by the wrk scripts
/// and from pgbench's histogram alike, so both sides of a row plot on the
/// same points. Fine enough that runs of one load can be merged from them,
/// finest in the tail.
pub fn percentile_grid() -> Vec<f64> {
    // In hundredths of a percent, so each point is exact in its text form.
    let hundredths = (0..=9000)
        .step_by(200)
        .chain((9100..=9900).step_by(100))
        .chain((9910..=9990).step_by(10))
        .chain(9991..=10000);
    hundredths.map(|h| f64::from(h) / 100.0).collect()
}

/// What one `wrk` run reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WrkRun {
    pub requests: u64,
    pub duration_us: u64,
    pub errors: BTreeMap<String, u64>,
    /// Answers per HTTP status.
    pub statuses: BTreeMap<String, u64>,
    /// Answers per `eventplane-cache` header value.
    pub layers: BTreeMap<String, u64>,
    /// (percentile, microseconds), from wrk's own histogram.
    pub latency_us: Vec<(f64, u64)>,
    /// Filled in by the bench, not by the script.
    #[serde(skip_deserializing)]
    pub cpu: CpuUse,
}

impl WrkRun {
    /// Answers with `status` per second.
    pub fn rate_of(&self, status: &str) -> f64 {
        let n = self.statuses.get(status).copied().unwrap_or(0);
        n as f64 / (self.duration_us.max(1) as f64 / 1e6)
    }

    /// Answers that were not `status`, and connection-level errors.
    pub fn others(&self, status: &str) -> u64 {
        let wrong: u64 = self
            .statuses
            .iter()
            .filter(|(s, _)| s.as_str() != status)
            .map(|(_, n)| n)
            .sum();
        wrong + self.errors.values().sum::<u64>()
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        self.latency_us
            .iter()
            .find(|(q, _)| *q >= p)
            .map_or(f64::NAN, |(_, us)| *us as f64 / 1000.0)
    }

    /// Several runs of the same load, read as one: counts and time add up,
    /// CPU is averaged over the time, and the latency distribution is the
    /// mixture of the runs' (each weighted by its requests), read off their
    /// percentile grids.
    pub fn merge(runs: &[WrkRun]) -> WrkRun {
        fn add(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
            for (k, n) in from {
                *into.entry(k.clone()).or_default() += n;
            }
        }
        let mut merged = WrkRun {
            requests: 0,
            duration_us: 0,
            errors: BTreeMap::new(),
            statuses: BTreeMap::new(),
            layers: BTreeMap::new(),
            latency_us: Vec::new(),
            cpu: CpuUse::time_weighted(
                runs.iter()
                    .map(|r| (&r.cpu, r.duration_us as f64))
                    .collect::<Vec<_>>()
                    .as_slice(),
            ),
        };
        for run in runs {
            merged.requests += run.requests;
            merged.duration_us += run.duration_us;
            add(&mut merged.errors, &run.errors);
            add(&mut merged.statuses, &run.statuses);
            add(&mut merged.layers, &run.layers);
        }
        merged.latency_us = mixture(runs);
        merged
    }

    /// Share of answers a cache layer named `layer` gave.
    pub fn layer_share(&self, layers: &[&str]) -> f64 {
        let all: u64 = self.layers.values().sum();
        let some: u64 = layers.iter().filter_map(|l| self.layers.get(*l)).sum();
        if all == 0 {
            0.0
        } else {
            some as f64 / all as f64
        }
    }
}

pub fn available() -> bool {
    std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok()
}

/// Runs `script` against `url` with `connections` for `duration`; `env`
/// reaches the script through `os.getenv`.
pub async fn run(
    dir: &Path,
    script: &str,
    url: &str,
    connections: usize,
    duration: Duration,
    env: &[(&str, String)],
) -> anyhow::Result<WrkRun> {
    let path = dir.join(format!("wrk-{}.lua", std::process::id()));
    std::fs::write(&path, format!("{script}\n{COUNTS}"))?;
    let sampler = Sampler::start("wrk");
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{THREADS}"))
        .arg(format!("-c{}", connections.max(THREADS)))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--timeout")
        .arg("30s")
        .arg("-s")
        .arg(&path)
        .arg(url)
        .env("EVENTPLANE_WRK_THREADS", THREADS.to_string())
        .env(
            "EVENTPLANE_WRK_PERCENTILES",
            percentile_grid()
                .iter()
                .map(f64::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk (Debian package `wrk`)")?;
    let cpu = sampler.finish();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut run = parse(&stdout)?;
    run.cpu = cpu;
    Ok(run)
}

/// The percentiles of the mixture of `runs`' latency distributions, at the
/// percentiles the runs report. A run's share of requests at or below `x`
/// is taken as the highest percentile it reports at or below `x`, so the
/// mixture is never read as faster than its parts.
fn mixture(runs: &[WrkRun]) -> Vec<(f64, u64)> {
    let total = runs.iter().map(|r| r.requests).sum::<u64>().max(1) as f64;
    let below = |x: u64| -> f64 {
        runs.iter()
            .map(|run| {
                let share = run
                    .latency_us
                    .iter()
                    .filter(|(p, v)| *v <= x && *p < 100.0)
                    .map(|(p, _)| *p)
                    .fold(0.0_f64, f64::max);
                let max = run.latency_us.last().map_or(0, |(_, v)| *v);
                let share = if x >= max { 100.0 } else { share };
                share * run.requests as f64
            })
            .sum::<f64>()
            / total
    };
    let mut values: Vec<u64> = runs
        .iter()
        .flat_map(|r| r.latency_us.iter().map(|(_, v)| *v))
        .collect();
    values.sort_unstable();
    values.dedup();
    let Some(grid) = runs.first() else {
        return Vec::new();
    };
    grid.latency_us
        .iter()
        .map(|(p, _)| {
            let at = values
                .iter()
                .copied()
                .find(|x| below(*x) >= *p)
                .or(values.last().copied())
                .unwrap_or(0);
            (*p, at)
        })
        .collect()
}

fn parse(stdout: &str) -> anyhow::Result<WrkRun> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("EVENTPLANE_WRK "))
        .with_context(|| format!("wrk printed no counts: {stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("wrk counts: {line}"))
}

#[cfg(test)]
mod tests {
    use super::{WrkRun, parse, percentile_grid};

    /// `requests` answers in `secs`, all 200, all taking `us`.
    fn uniform(requests: u64, secs: u64, us: u64) -> WrkRun {
        let report = format!(
            "EVENTPLANE_WRK {{\"requests\":{requests},\"duration_us\":{},\"errors\":{{\"connect\":0,\"read\":0,\"write\":0,\"timeout\":0}},\"statuses\":{{\"200\":{requests}}},\"layers\":{{\"l3\":{requests}}},\"latency_us\":[[0,{us}],[50,{us}],[90,{us}],[99,{us}],[100,{us}]]}}",
            secs * 1_000_000
        );
        parse(&report).unwrap()
    }

    #[test]
    fn the_percentile_grid_rises_to_the_maximum_and_is_finest_in_the_tail() {
        let grid = percentile_grid();
        assert_eq!(grid.first(), Some(&0.0));
        assert_eq!(grid.last(), Some(&100.0));
        assert!(grid.windows(2).all(|w| w[0] < w[1]), "{grid:?}");
        for p in [50.0, 90.0, 99.0, 99.9, 99.99] {
            assert!(grid.contains(&p), "P{p} is on the grid");
        }
        // The scripts get the points as text: each must be written exactly.
        for p in &grid {
            let text = p.to_string();
            let decimals = text.split_once('.').map_or(0, |(_, d)| d.len());
            assert!(decimals <= 2, "P{text}");
        }
    }

    #[test]
    fn merged_runs_add_their_counts_and_mix_their_latencies_by_weight() {
        let fast = uniform(300, 2, 1_000);
        let slow = uniform(100, 2, 5_000);
        let merged = WrkRun::merge(&[fast, slow]);
        assert_eq!(merged.requests, 400);
        assert_eq!(merged.rate_of("200"), 100.0);
        assert_eq!(merged.layer_share(&["l3"]), 1.0);
        // Three quarters of the answers took 1 ms, the rest 5 ms.
        assert_eq!(merged.percentile_ms(50.0), 1.0);
        assert_eq!(merged.percentile_ms(90.0), 5.0);
        assert_eq!(merged.percentile_ms(99.0), 5.0);
        let max = merged.latency_us.last().unwrap();
        assert_eq!(*max, (100.0, 5_000));
    }

    #[test]
    fn runs_of_one_distribution_merge_into_that_distribution() {
        let a = uniform(100, 1, 2_000);
        let b = uniform(100, 1, 2_000);
        let merged = WrkRun::merge(&[a, b]);
        for (p, us) in &merged.latency_us {
            assert_eq!(*us, 2_000, "P{p}");
        }
    }

    #[test]
    fn the_scripts_report_line_is_read() {
        let out = "Running 1s test\nEVENTPLANE_WRK {\"requests\":10,\"duration_us\":2000000,\"errors\":{\"connect\":0,\"read\":1,\"write\":0,\"timeout\":0},\"statuses\":{\"201\":8,\"409\":1},\"layers\":{},\"latency_us\":[[50.0000,900],[99.0000,4000]]}\n";
        let run = parse(out).unwrap();
        assert_eq!(run.rate_of("201"), 4.0);
        assert_eq!(run.others("201"), 2);
        assert_eq!(run.percentile_ms(99.0), 4.0);
    }
}
