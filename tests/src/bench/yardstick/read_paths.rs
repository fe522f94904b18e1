//! The read path on each backend, in one run: cache hits and misses with L2
//! on one Redis or on a Redis Cluster, and L3 on the primary or on a
//! streaming replica. Each configuration is a query-only process of its
//! own over the same database; its misses read keys no other phase read.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use eventplane::server::{Roles, Stack, StackConfig};
use serde_json::{Value, json};

use super::wrk::{self, WrkRun};

/// What the comparison may use beyond the default Redis and the primary.
pub struct Backends {
    pub redis_url: String,
    pub cluster_url: Option<String>,
    /// The benchmark database on the replica.
    pub replica_url: Option<String>,
}

pub struct ReadPath {
    pub name: String,
    pub hits: WrkRun,
    pub misses: WrkRun,
}

/// Configurations to compare: (name, Redis URL, read database URL).
fn configurations(backends: &Backends) -> Vec<(String, String, Option<String>)> {
    let mut all = vec![(
        "L2 one Redis, L3 primary".to_string(),
        backends.redis_url.clone(),
        None,
    )];
    if let Some(cluster) = &backends.cluster_url {
        all.push((
            "L2 Redis Cluster, L3 primary".to_string(),
            cluster.clone(),
            None,
        ));
    }
    if let Some(replica) = &backends.replica_url {
        all.push((
            "L2 one Redis, L3 replica".to_string(),
            backends.redis_url.clone(),
            Some(replica.clone()),
        ));
    }
    all
}

/// How many disjoint sets of cold keys `run` needs.
pub fn cold_sets(backends: &Backends) -> usize {
    configurations(backends).len()
}

pub struct Setup<'a> {
    pub dir: &'a Path,
    pub database_url: &'a str,
    pub projection: &'a str,
    pub hot: &'a [String],
    /// One set of never-read keys per configuration.
    pub cold: Vec<&'a [String]>,
    pub clients: usize,
    pub duration: Duration,
}

pub async fn run(backends: &Backends, setup: Setup<'_>) -> anyhow::Result<Vec<ReadPath>> {
    let rows = |keys: &[String]| -> String {
        keys.iter()
            .map(|k| format!("/v1/projections/{}/rows/{k}\n", setup.projection))
            .collect()
    };
    let hot_file = setup.dir.join("read-paths-hot");
    std::fs::write(&hot_file, rows(setup.hot))?;
    let mut out = Vec::new();
    for ((name, redis, read), cold) in configurations(backends).into_iter().zip(&setup.cold) {
        let mut config = StackConfig::local(setup.database_url, Some(&redis), Vec::new());
        config.read_database_url = read;
        config.roles = Roles {
            command: false,
            projector: false,
            query: true,
        };
        let stack = Stack::start(config)
            .await
            .with_context(|| format!("starting the query process for {name}"))?;
        warm(&stack, setup.projection, setup.hot).await?;
        let env = |p: &Path| [("EVENTPLANE_WRK_PATHS", p.display().to_string())];
        let hits = wrk::run(
            setup.dir,
            wrk::PATHS,
            &stack.url(""),
            setup.clients,
            setup.duration,
            &env(&hot_file),
        )
        .await
        .with_context(|| format!("{name}: hits"))?;
        let cold_file = setup.dir.join("read-paths-cold");
        std::fs::write(&cold_file, rows(cold))?;
        let misses = wrk::run(
            setup.dir,
            wrk::PATHS,
            &stack.url(""),
            setup.clients,
            (setup.duration / 2).max(Duration::from_secs(1)),
            &env(&cold_file),
        )
        .await
        .with_context(|| format!("{name}: misses"))?;
        out.push(ReadPath { name, hits, misses });
    }
    Ok(out)
}

/// Reads every hot key until this process answers them from its cache
/// (its subscription is live and the keys are filled).
async fn warm(stack: &Stack, projection: &str, hot: &[String]) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut cached = 0;
        for key in hot {
            let response = http
                .get(stack.url(&format!("/v1/projections/{projection}/rows/{key}")))
                .send()
                .await?;
            let layer = response.headers().get("eventplane-cache").cloned();
            response.bytes().await?;
            if layer.is_some_and(|l| l == "l1" || l == "l2") {
                cached += 1;
            }
        }
        if cached == hot.len() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{} of {} hot keys cached after 30 s", cached, hot.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn render(paths: &[ReadPath]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nread path by backend (wrk; each a query-only process of its own)"
    );
    let _ = writeln!(
        out,
        "{:<32} {:>10} {:>8} {:>8} {:>10} {:>8} {:>8} {:>8}",
        "backends", "hits/s", "p50 ms", "p99 ms", "misses/s", "p50 ms", "p99 ms", "L3 share"
    );
    for p in paths {
        let _ = writeln!(
            out,
            "{:<32} {:>10.0} {:>8.2} {:>8.2} {:>10.0} {:>8.2} {:>8.2} {:>7.0}%",
            p.name,
            p.hits.rate_of("200"),
            p.hits.percentile_ms(50.0),
            p.hits.percentile_ms(99.0),
            p.misses.rate_of("200"),
            p.misses.percentile_ms(50.0),
            p.misses.percentile_ms(99.0),
            100.0 * p.misses.layer_share(&["l3"]),
        );
    }
    out
}

pub fn to_json(paths: &[ReadPath]) -> Value {
    Value::Array(
        paths
            .iter()
            .map(|p| json!({"backends": p.name, "hits": p.hits, "misses": p.misses}))
            .collect(),
    )
}
