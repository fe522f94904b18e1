//! Load drivers: a closed loop (each client sends its next request when the
//! previous one answers, which finds the maximum throughput) and an open
//! loop (requests follow a fixed schedule, which measures latency without
//! coordinated omission).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::yardstick::cpu::CpuUse;
use serde_json::{Value, json};

/// What one request reports on success: a label counted per phase (for
/// example which cache layer answered), or "" for none.
pub type Tag = &'static str;

/// The figures of one measured phase.
pub struct Phase {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    pub tags: BTreeMap<Tag, u64>,
    /// Rate the open-loop schedule asked for; `None` for a closed loop.
    pub target_rate: Option<f64>,
    /// Cores each party used, when the load generator ran as a process of
    /// its own.
    pub cpu: Option<CpuUse>,
    /// How late that generator sent its requests, P99 in ms (part of the
    /// latency it measured).
    pub pacing_p99_ms: Option<f64>,
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs to 10 min at 3 significant digits: wide enough that a stalled
    // request is recorded rather than clamped.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, latency: Duration) {
    h.saturating_record(latency.as_micros().max(1) as u64);
}

pub fn ms(h: &Histogram<u64>, quantile: f64) -> f64 {
    if h.is_empty() {
        f64::NAN
    } else {
        h.value_at_quantile(quantile) as f64 / 1000.0
    }
}

impl Phase {
    pub(crate) fn empty(target_rate: Option<f64>) -> Phase {
        Phase {
            ok: 0,
            errors: 0,
            first_error: None,
            elapsed: Duration::ZERO,
            latency: histogram(),
            tags: BTreeMap::new(),
            target_rate,
            cpu: None,
            pacing_p99_ms: None,
        }
    }

    fn merge(&mut self, other: Phase) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latency
            .add(&other.latency)
            .expect("histograms with equal bounds");
        for (tag, n) in other.tags {
            *self.tags.entry(tag).or_default() += n;
        }
    }

    fn outcome(&mut self, result: anyhow::Result<Tag>, latency: Duration) {
        match result {
            Ok(tag) => {
                self.ok += 1;
                record(&mut self.latency, latency);
                if !tag.is_empty() {
                    *self.tags.entry(tag).or_default() += 1;
                }
            }
            Err(err) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{err:#}"));
                }
            }
        }
    }

    /// Successful requests per second over the whole phase.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    pub fn p50(&self) -> f64 {
        ms(&self.latency, 0.5)
    }
    pub fn p99(&self) -> f64 {
        ms(&self.latency, 0.99)
    }
    pub fn p999(&self) -> f64 {
        ms(&self.latency, 0.999)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "mode": if self.target_rate.is_some() { "open_loop" } else { "closed_loop" },
            "target_rate": self.target_rate,
            "requests": self.ok,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": self.elapsed.as_secs_f64(),
            "rate": self.rate(),
            "p50_ms": finite(self.p50()),
            "p99_ms": finite(self.p99()),
            "p999_ms": finite(self.p999()),
            "max_ms": if self.latency.is_empty() { None } else { Some(self.latency.max() as f64 / 1000.0) },
            "tags": self.tags,
            "cpu_cores": self.cpu,
            "pacing_p99_ms": self.pacing_p99_ms,
        })
    }
}

/// JSON has no NaN: an empty histogram is reported as null.
pub fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// `clients` tasks each send one request after another for `duration`.
/// Latency is from send to answer, so this finds the throughput ceiling
/// but understates latency under overload; see [`open_loop`].
pub async fn closed_loop<F, Fut>(clients: usize, duration: Duration, op: F) -> Phase
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<Tag>> + Send + 'static,
{
    let started = Instant::now();
    let end = started + duration;
    let mut workers = Vec::with_capacity(clients);
    for _ in 0..clients {
        let op = op.clone();
        workers.push(tokio::spawn(async move {
            let mut phase = Phase::empty(None);
            while Instant::now() < end {
                let t = Instant::now();
                let result = op().await;
                phase.outcome(result, t.elapsed());
            }
            phase
        }));
    }
    collect(workers, started, None).await
}

/// Requests are due at `rate` per second for `duration`, the i-th at
/// `start + i / rate`, and are taken by `clients` tasks. Latency runs from
/// the due time, not the send time, so a server that falls behind is
/// charged for the queue it causes (no coordinated omission). The tokio
/// timer wakes on millisecond ticks, so a sample can include up to about
/// 1 ms of timer delay: the figures err high, never low.
pub async fn open_loop<F, Fut>(clients: usize, duration: Duration, rate: f64, op: F) -> Phase
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<Tag>> + Send + 'static,
{
    let rate = rate.max(1.0);
    let total = (rate * duration.as_secs_f64()).ceil() as u64;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (op, next) = (op.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut phase = Phase::empty(Some(rate));
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return phase;
                }
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let result = op().await;
                phase.outcome(result, due.elapsed());
            }
        }));
    }
    collect(workers, started, Some(rate)).await
}

async fn collect(
    workers: Vec<tokio::task::JoinHandle<Phase>>,
    started: Instant,
    target_rate: Option<f64>,
) -> Phase {
    let mut total = Phase::empty(target_rate);
    for worker in workers {
        match worker.await {
            Ok(phase) => total.merge(phase),
            Err(err) => {
                total.errors += 1;
                total
                    .first_error
                    .get_or_insert_with(|| format!("load task failed: {err}"));
            }
        }
    }
    total.elapsed = started.elapsed();
    total
}
