//! What every reconcile gets: the Kubernetes client, the Event recorder,
//! database pools (one per connection URL, reused across reconciles),
//! metrics and the clock (replaceable in tests).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::metrics::Metrics;

pub const MANAGER: &str = "eventplane-operator";

/// How long connecting to a policy's database may take before the policy is
/// reported as stalled on an unreachable database.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub now: fn() -> DateTime<Utc>,
    pools: Mutex<HashMap<String, PgPool>>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Arc<Context> {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            now: Utc::now,
            pools: Mutex::new(HashMap::new()),
        })
    }

    /// A pool for `url`, connected on first use.
    pub async fn pool(&self, url: &str) -> Result<PgPool, sqlx::Error> {
        let mut pools = self.pools.lock().await;
        if let Some(pool) = pools.get(url) {
            return Ok(pool.clone());
        }
        let options: sqlx::postgres::PgConnectOptions = url.parse()?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options.application_name("eventplane-operator"))
            .await?;
        pools.insert(url.to_string(), pool.clone());
        Ok(pool)
    }
}
