//! The benchmark's figures, held against the DESIGN.md targets, as a table
//! for people and as one JSON object for tools.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::Noise;
use super::load::{self, Phase, finite};

pub const COMMAND_RATE_TARGET: f64 = 10_000.0;
pub const COMMAND_P99_TARGET_MS: f64 = 10.0;
pub const THROUGHPUT_RATIO_TARGET: f64 = 1.5;
pub const HIT_RATE_TARGET: f64 = 20_000.0;
pub const HIT_P99_TARGET_MS: f64 = 2.0;
pub const MISS_P99_TARGET_MS: f64 = 10.0;
pub const LAG_P99_TARGET_MS: f64 = 100.0;
pub const LAG_RATE_TARGET: f64 = 10_000.0;

/// An open-loop run kept up with its schedule if it completed at least this
/// share of the asked rate (the tail of the last requests stretches the
/// elapsed time a little even when the server keeps up).
const KEPT_UP: f64 = 0.95;

pub struct Report {
    /// Observed before the first and after the last phase.
    pub noise: [Noise; 2],
    pub duration: Duration,
    pub clients: usize,
    pub cpus: usize,
    pub fsync: String,
    pub synchronous_commit: String,
    pub commands_closed: Phase,
    pub commands_open: Phase,
    pub baseline: Phase,
    pub catch_up: Duration,
    pub hits_closed: Phase,
    pub hits_open: Phase,
    pub misses_closed: Phase,
    pub misses_open: Phase,
    pub list_closed: Phase,
    pub list_open: Phase,
    pub lag_appends: Phase,
    /// Events per second the lag run asked for.
    pub lag_rate: f64,
    pub lag_events_per_append: usize,
    pub lag: Histogram<u64>,
    pub lag_missing: u64,
    pub projection_status: Value,
    /// wrk against Eventplane beside pgbench and bare servers, or why not.
    pub yardstick: Result<super::yardstick::Yardstick, String>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Verdict {
    Met,
    NotMet,
    /// The figure is within bounds, but the run did not reach the load the
    /// target is stated at, so it shows nothing either way.
    NotShown,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "NOT MET",
            Verdict::NotShown => "not shown",
        }
    }
}

pub struct Target {
    pub what: &'static str,
    pub target: String,
    pub measured: String,
    pub verdict: Verdict,
}

/// Whether an open-loop run was asked for at least `rate` and kept up.
fn ran_at(phase: &Phase, rate: f64) -> bool {
    phase
        .target_rate
        .is_some_and(|asked| asked >= rate && phase.rate() >= KEPT_UP * asked)
}

/// A latency bound stated at a load: met only when the bound holds at that
/// load without errors; not met when the bound fails or the server cannot
/// reach the load at all; otherwise not shown.
fn latency_at_rate(latency: &Phase, p99: f64, bound: f64, max_rate: f64, rate: f64) -> Verdict {
    if latency.errors > 0 || !p99.is_finite() || p99 > bound || max_rate < rate {
        Verdict::NotMet
    } else if ran_at(latency, rate) {
        Verdict::Met
    } else {
        Verdict::NotShown
    }
}

impl Report {
    /// Statements of other databases on the server, or more runnable work
    /// than CPUs before we started (the load average after the run is
    /// mostly our own, so only the one before counts).
    pub fn noisy(&self) -> bool {
        self.noise.iter().any(|n| n.foreign_active_sessions > 0)
            || self.noise[0]
                .load_average
                .is_some_and(|l| l > self.cpus as f64)
    }

    pub fn ratio(&self) -> f64 {
        let base = self.baseline.rate();
        if base > 0.0 {
            self.commands_closed.rate() / base
        } else {
            f64::NAN
        }
    }

    /// Events per second the lag run appended.
    fn lag_event_rate(&self) -> f64 {
        self.lag_appends.rate() * self.lag_events_per_append as f64
    }

    fn lag_p50(&self) -> f64 {
        load::ms(&self.lag, 0.5)
    }
    fn lag_p99(&self) -> f64 {
        load::ms(&self.lag, 0.99)
    }

    pub fn targets(&self) -> Vec<Target> {
        let c = &self.commands_open;
        let command = latency_at_rate(
            c,
            c.p99(),
            COMMAND_P99_TARGET_MS,
            self.commands_closed.rate(),
            COMMAND_RATE_TARGET,
        );
        let ratio = self.ratio();
        let h = &self.hits_open;
        let mut hit = latency_at_rate(
            h,
            h.p99(),
            HIT_P99_TARGET_MS,
            self.hits_closed.rate(),
            HIT_RATE_TARGET,
        );
        let hit_share = cache_share(h);
        if hit_share < 0.99 {
            // Reads Postgres answered are not cache hits, whatever their speed.
            hit = Verdict::NotMet;
        }
        let m = &self.misses_open;
        let miss = if m.errors == 0 && m.p99() <= MISS_P99_TARGET_MS {
            Verdict::Met
        } else {
            Verdict::NotMet
        };
        let lag_p99 = self.lag_p99();
        let lag = if self.lag_missing > 0
            || self.lag_appends.errors > 0
            || !lag_p99.is_finite()
            || lag_p99 > LAG_P99_TARGET_MS
        {
            Verdict::NotMet
        } else if ran_at(
            &self.lag_appends,
            LAG_RATE_TARGET / self.lag_events_per_append as f64,
        ) {
            Verdict::Met
        } else {
            Verdict::NotShown
        };
        vec![
            Target {
                what: "command append P99 (open loop)",
                target: format!("<= {COMMAND_P99_TARGET_MS} ms at >= {COMMAND_RATE_TARGET:.0}/s"),
                measured: format!(
                    "{:.2} ms at {:.0}/s (max {:.0}/s)",
                    c.p99(),
                    c.rate(),
                    self.commands_closed.rate()
                ),
                verdict: command,
            },
            Target {
                what: "command throughput / baseline",
                target: format!(">= {THROUGHPUT_RATIO_TARGET}x"),
                measured: format!(
                    "{ratio:.2}x ({:.0} vs {:.0}/s)",
                    self.commands_closed.rate(),
                    self.baseline.rate()
                ),
                verdict: if ratio >= THROUGHPUT_RATIO_TARGET {
                    Verdict::Met
                } else {
                    Verdict::NotMet
                },
            },
            Target {
                what: "cache-hit read P99 (open loop)",
                target: format!("<= {HIT_P99_TARGET_MS} ms at >= {HIT_RATE_TARGET:.0}/s"),
                measured: format!(
                    "{:.2} ms at {:.0}/s (max {:.0}/s, {:.1}% from cache)",
                    h.p99(),
                    h.rate(),
                    self.hits_closed.rate(),
                    100.0 * hit_share
                ),
                verdict: hit,
            },
            Target {
                what: "cache-miss read P99 (open loop)",
                target: format!("<= {MISS_P99_TARGET_MS} ms"),
                measured: format!("{:.2} ms at {:.0}/s", m.p99(), m.rate()),
                verdict: miss,
            },
            Target {
                what: "projection lag P99",
                target: format!("<= {LAG_P99_TARGET_MS} ms at {LAG_RATE_TARGET:.0} events/s"),
                measured: format!("{lag_p99:.2} ms at {:.0} events/s", self.lag_event_rate()),
                verdict: lag,
            },
        ]
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nEventplane benchmark: {} CPUs (shared by client, server, Postgres and Redis), Postgres fsync={} synchronous_commit={}, {} clients, {} s per phase",
            self.cpus,
            self.fsync,
            self.synchronous_commit,
            self.clients,
            self.duration.as_secs()
        );
        for (when, noise) in ["before", "after"].iter().zip(&self.noise) {
            let load = noise
                .load_average
                .map_or("unknown".to_string(), |l| format!("{l:.2}"));
            let _ = writeln!(
                out,
                "{when}: load average {load}, {} statements running in other databases of this server",
                noise.foreign_active_sessions
            );
        }
        if self.noisy() {
            let _ = writeln!(
                out,
                "WARNING: other load shared the machine or the database; these figures are not representative"
            );
        }
        let _ = writeln!(
            out,
            "\n{:<34} {:<14} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9}",
            "phase", "mode", "requests", "errors", "req/s", "p50 ms", "p99 ms", "p99.9 ms"
        );
        let rows: [(&str, &Phase); 10] = [
            ("append (max throughput)", &self.commands_closed),
            ("append (latency)", &self.commands_open),
            ("baseline: INSERT per transaction", &self.baseline),
            ("row read, cache hit", &self.hits_closed),
            ("row read, cache hit (latency)", &self.hits_open),
            ("row read with token (Postgres)", &self.misses_closed),
            ("row read with token (latency)", &self.misses_open),
            ("list by_customer", &self.list_closed),
            ("list by_customer (latency)", &self.list_open),
            ("append during lag run", &self.lag_appends),
        ];
        for (name, phase) in rows {
            let mode = match phase.target_rate {
                Some(rate) => format!("open @{rate:.0}/s"),
                None => "closed".to_string(),
            };
            let _ = writeln!(
                out,
                "{name:<34} {mode:<14} {:>9} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>9.2}",
                phase.ok,
                phase.errors,
                phase.rate(),
                phase.p50(),
                phase.p99(),
                phase.p999()
            );
        }
        let generator: Vec<String> = rows
            .iter()
            .filter_map(|(name, phase)| {
                Some(format!(
                    "  {name}: requests sent late by {:.2} ms at P99; cpu: {}",
                    phase.pacing_p99_ms?,
                    phase.cpu.as_ref()?.render()
                ))
            })
            .collect();
        if !generator.is_empty() {
            let _ = writeln!(
                out,
                "open loops ran in a load-generator process of their own (one thread; latency runs from each request's due time):\n{}",
                generator.join("\n")
            );
        }
        let _ = writeln!(
            out,
            "\nprojection lag (201 -> row visible): {} samples at {:.0} events/s asked ({} per append), {:.0} achieved, p50 {:.2} ms, p99 {:.2} ms, {} never seen",
            self.lag.len(),
            self.lag_rate,
            self.lag_events_per_append,
            self.lag_event_rate(),
            self.lag_p50(),
            self.lag_p99(),
            self.lag_missing
        );
        let _ = writeln!(
            out,
            "projector caught up {:.2} s after the command load",
            self.catch_up.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "cache layers that answered the cache-hit reads: {:?}",
            self.hits_open.tags
        );
        let _ = writeln!(
            out,
            "cache layers that answered the list queries: {:?}",
            self.list_open.tags
        );
        match &self.yardstick {
            Ok(y) => out.push_str(&y.render()),
            Err(why) => {
                let _ = writeln!(out, "\nyardstick skipped: {why}");
            }
        }
        for (name, phase) in self.phases() {
            if let Some(err) = &phase.first_error {
                let _ = writeln!(out, "first error in {name}: {err}");
            }
        }
        let _ = writeln!(
            out,
            "\n{:<34} {:<28} {:<50} verdict",
            "DESIGN.md target", "target", "measured"
        );
        for t in self.targets() {
            let _ = writeln!(
                out,
                "{:<34} {:<28} {:<50} {}",
                t.what,
                t.target,
                t.measured,
                t.verdict.as_str()
            );
        }
        out
    }

    fn phases(&self) -> [(&'static str, &Phase); 10] {
        [
            ("commands_closed", &self.commands_closed),
            ("commands_open", &self.commands_open),
            ("baseline", &self.baseline),
            ("cache_hits_closed", &self.hits_closed),
            ("cache_hits_open", &self.hits_open),
            ("token_reads_closed", &self.misses_closed),
            ("token_reads_open", &self.misses_open),
            ("list_closed", &self.list_closed),
            ("list_open", &self.list_open),
            ("lag_appends", &self.lag_appends),
        ]
    }

    pub fn to_json(&self) -> Value {
        let phases: serde_json::Map<String, Value> = self
            .phases()
            .into_iter()
            .map(|(k, p)| (k.to_string(), p.to_json()))
            .collect();
        let targets: Vec<Value> = self
            .targets()
            .into_iter()
            .map(|t| json!({"what": t.what, "target": t.target, "measured": t.measured, "verdict": t.verdict.as_str()}))
            .collect();
        json!({
            "environment": {
                "cpus": self.cpus,
                "clients": self.clients,
                "phase_seconds": self.duration.as_secs(),
                "fsync": self.fsync,
                "synchronous_commit": self.synchronous_commit,
                "noise": self.noise.iter().map(|n| json!({
                    "foreign_active_sessions": n.foreign_active_sessions,
                    "load_average": n.load_average,
                })).collect::<Vec<_>>(),
                "noisy": self.noisy(),
            },
            "phases": phases,
            "command_throughput": self.commands_closed.rate(),
            "baseline_throughput": self.baseline.rate(),
            "command_to_baseline_ratio": finite(self.ratio()),
            "projector_catch_up_seconds": self.catch_up.as_secs_f64(),
            "projection_lag": {
                "events_per_second_asked": self.lag_rate,
                "events_per_second_achieved": self.lag_event_rate(),
                "events_per_append": self.lag_events_per_append,
                "samples": self.lag.len(),
                "missing": self.lag_missing,
                "p50_ms": finite(self.lag_p50()),
                "p99_ms": finite(self.lag_p99()),
                "max_ms": if self.lag.is_empty() { None } else { Some(self.lag.max() as f64 / 1000.0) },
            },
            "projection_status": self.projection_status,
            "targets": targets,
            "yardstick": match &self.yardstick {
                Ok(y) => y.to_json(),
                Err(why) => json!({ "skipped": why }),
            },
        })
    }
}

/// Share of answered reads that came from L1 or L2.
fn cache_share(phase: &Phase) -> f64 {
    let cached: u64 = ["l1", "l2"].iter().filter_map(|t| phase.tags.get(t)).sum();
    let all: u64 = phase.tags.values().sum();
    if all == 0 {
        0.0
    } else {
        cached as f64 / all as f64
    }
}
