//! Samples `pg_stat_activity` and `pg_locks` while a measurement runs, to
//! tell what a stalled writer waited for: every few milliseconds it reads
//! each watched backend's statement, wait event, the lock it wants and what
//! its blockers run. The writer's longest statements are then printed with
//! the waits seen during them and what maintenance was doing meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::{Connection, PgConnection};

/// Sampling period: short next to the 50 ms a writer may wait, long enough
/// that the sampler's own queries stay a small load on two cores.
const PERIOD: Duration = Duration::from_millis(3);
/// Statements printed, longest first.
const SHOWN: usize = 5;

const SAMPLE: &str = "
SELECT w.pid,
       w.application_name,
       extract(epoch FROM clock_timestamp() - w.query_start)::float8 AS running_s,
       extract(epoch FROM w.query_start)::float8 AS started_s,
       coalesce(w.wait_event_type || ':' || w.wait_event, 'CPU') AS waiting,
       coalesce((SELECT string_agg(l.mode || ' on ' || coalesce(l.relation::regclass::text, l.locktype), ', ')
                   FROM pg_locks l WHERE l.pid = w.pid AND NOT l.granted), '') AS wants,
       coalesce((SELECT string_agg(b.pid::text, ',') FROM unnest(pg_blocking_pids(w.pid)) AS b(pid)), '') AS blockers,
       left(regexp_replace(w.query, '\\s+', ' ', 'g'), 90) AS query
  FROM pg_stat_activity w
 WHERE w.datname = current_database() AND w.pid <> pg_backend_pid()
   AND w.application_name = ANY ($1) AND w.state = 'active'";

#[derive(sqlx::FromRow)]
struct Row {
    pid: i32,
    application_name: String,
    running_s: f64,
    started_s: f64,
    waiting: String,
    wants: String,
    blockers: String,
    query: String,
}

/// One writer statement seen running in at least one sample.
#[derive(Clone, Debug, Default)]
pub struct Statement {
    /// Longest time it was seen running.
    pub running: Duration,
    /// Its wait events, with the lock wanted and the blocking pids.
    pub waits: BTreeSet<String>,
    /// What the maintenance backends ran meanwhile, with their waits.
    pub beside: BTreeSet<String>,
}

pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<Vec<Statement>>>,
}

impl Sampler {
    /// Starts sampling: `writer` names the writer's backends, `others` the
    /// maintenance backends whose work is reported beside the writer's.
    pub async fn start(url: &str, writer: &str, others: &[&str]) -> anyhow::Result<Sampler> {
        let mut conn = PgConnection::connect(url).await?;
        let mut apps: Vec<String> = others.iter().map(|s| s.to_string()).collect();
        apps.push(writer.to_string());
        let writer = writer.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            // Writer statements by (pid, start time).
            let mut statements: BTreeMap<(i32, u64), Statement> = BTreeMap::new();
            while !flag.load(Ordering::Relaxed) {
                let rows: Vec<Row> = sqlx::query_as(SAMPLE)
                    .bind(&apps)
                    .fetch_all(&mut conn)
                    .await?;
                let beside: Vec<String> = rows
                    .iter()
                    .filter(|r| r.application_name != writer)
                    .map(|r| format!("pid {} {} \"{}\"", r.pid, r.waiting, r.query))
                    .collect();
                for r in rows.iter().filter(|r| r.application_name == writer) {
                    let key = (r.pid, (r.started_s * 1e6) as u64);
                    let s = statements.entry(key).or_default();
                    s.running = s.running.max(Duration::from_secs_f64(r.running_s.max(0.0)));
                    let mut wait = r.waiting.clone();
                    if !r.wants.is_empty() {
                        wait = format!("{wait} wants {} blocked by pid {}", r.wants, r.blockers);
                    }
                    s.waits.insert(wait);
                    s.beside.extend(beside.iter().cloned());
                }
                tokio::time::sleep(PERIOD).await;
            }
            let mut all: Vec<Statement> = statements.into_values().collect();
            all.sort_by_key(|s| std::cmp::Reverse(s.running));
            Ok(all)
        });
        Ok(Sampler { stop, task })
    }

    pub async fn finish(self) -> anyhow::Result<Vec<Statement>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// Prints the writer's longest sampled statements.
pub fn print(label: &str, statements: &[Statement]) {
    println!(
        "{label}: {} writer statements seen (sampled every {} ms); longest:",
        statements.len(),
        PERIOD.as_millis()
    );
    for s in statements.iter().take(SHOWN) {
        println!(
            "    {:>6.1} ms  writer waits: {}",
            s.running.as_secs_f64() * 1000.0,
            s.waits.iter().cloned().collect::<Vec<_>>().join("; ")
        );
        for b in &s.beside {
            println!("              beside: {b}");
        }
    }
}
