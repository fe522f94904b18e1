//! CPU each party used during a phase, read from `/proc`, so a reader sees
//! whether a figure is bound by CPU or by waiting.
//!
//! A sampler thread reads `utime + stime` of every process of interest
//! every few milliseconds. Processes that end during the phase (pgbench's
//! backends, wrk itself) are counted up to their last sample, so the figure
//! can be a little low for them, never high.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Who a process is, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Party {
    /// The load generator (wrk or pgbench).
    Client,
    /// This process: the in-process Eventplane stack, or the bare reference
    /// server while a reference runs.
    Server,
    Postgres,
    Redis,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Cores used per party over a phase (1.0 = one core busy throughout).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuUse {
    pub client: f64,
    pub server: f64,
    pub postgres: f64,
    pub redis: f64,
}

impl CpuUse {
    /// The cores used over several phases, each weighted by its length.
    pub fn time_weighted(phases: &[(&CpuUse, f64)]) -> CpuUse {
        let time: f64 = phases.iter().map(|(_, t)| t).sum::<f64>().max(1e-9);
        let mean = |of: fn(&CpuUse) -> f64| -> f64 {
            phases.iter().map(|(c, t)| of(c) * t).sum::<f64>() / time
        };
        CpuUse {
            client: mean(|c| c.client),
            server: mean(|c| c.server),
            postgres: mean(|c| c.postgres),
            redis: mean(|c| c.redis),
        }
    }

    pub fn render(&self) -> String {
        format!(
            "client {:.2}, server {:.2}, postgres {:.2}, redis {:.2} cores",
            self.client, self.server, self.postgres, self.redis
        )
    }
}

/// Per pid: its party and the first and last CPU ticks seen.
type Seen = Arc<Mutex<HashMap<u32, (Party, u64, u64)>>>;

pub struct Sampler {
    stop: Arc<AtomicBool>,
    started: Instant,
    seen: Seen,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling; `client` is the load generator's name as `/proc`
    /// shows it (`comm`).
    pub fn start(client: &str) -> Sampler {
        let client = client.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Seen = Arc::default();
        let me = std::process::id();
        // Processes alive now count from their current ticks; ones born
        // later count from zero.
        let baseline = snapshot(me, &client);
        {
            let mut seen = seen.lock().expect("cpu samples");
            for (pid, party, ticks) in baseline {
                seen.insert(pid, (party, ticks, ticks));
            }
        }
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(SAMPLE_EVERY);
                    let now = snapshot(me, &client);
                    let mut seen = seen.lock().expect("cpu samples");
                    for (pid, party, ticks) in now {
                        seen.entry(pid)
                            .and_modify(|e| e.2 = ticks.max(e.2))
                            .or_insert((party, 0, ticks));
                    }
                }
            })
        };
        Sampler {
            stop,
            started: Instant::now(),
            seen,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> CpuUse {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let me = std::process::id();
        let mut seen = self.seen.lock().expect("cpu samples");
        // This process is alive: take its exact final figure.
        if let Some(ticks) = ticks_of(me)
            && let Some(e) = seen.get_mut(&me)
        {
            e.2 = ticks;
        }
        let per_tick = 1.0 / clock_ticks_per_second() / elapsed.max(1e-9);
        let mut cpu = CpuUse::default();
        for (party, first, last) in seen.values() {
            let cores = last.saturating_sub(*first) as f64 * per_tick;
            match party {
                Party::Client => cpu.client += cores,
                Party::Server => cpu.server += cores,
                Party::Postgres => cpu.postgres += cores,
                Party::Redis => cpu.redis += cores,
            }
        }
        cpu
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The processes of interest and their CPU ticks right now.
fn snapshot(me: u32, client: &str) -> Vec<(u32, Party, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (comm, ticks) = parse_stat(&stat)?;
        let party = if pid == me {
            Party::Server
        } else if comm == client {
            Party::Client
        } else if comm == "postgres" {
            Party::Postgres
        } else if comm.starts_with("redis-server") {
            Party::Redis
        } else {
            return None;
        };
        Some((pid, party, ticks))
    })
    .collect()
}

fn ticks_of(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, ticks)| ticks)
}

/// `comm` and `utime + stime` from a `/proc/<pid>/stat` line. `comm` sits
/// in parentheses and may itself hold spaces or parentheses, so the fields
/// are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = &stat[open + 1..close];
    let mut fields = stat[close + 1..].split_whitespace();
    // After `)`: state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((comm, utime + stime))
}

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux this runs on; `getconf`
/// confirms it where available.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::parse_stat;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (postgres: a) b) S 1 2 3 4 5 6 7 8 9 10 120 35 0 0 20 0 1 0";
        assert_eq!(parse_stat(line), Some(("postgres: a) b", 155)));
    }

    #[test]
    fn this_process_has_a_readable_stat() {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("linux /proc");
        assert!(parse_stat(&stat).is_some());
    }
}
