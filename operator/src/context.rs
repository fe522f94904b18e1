//! What every reconcile gets: the Kubernetes client, the Event recorder,
//! database pools (one per connection URL, reused across reconciles),
//! metrics and the clock (replaceable in tests).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use eventplane_api::DatabaseRef;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::conditions::reason;
use crate::error::Blocked;
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

/// Why a database URL could not be read from its Secret.
#[derive(Clone, Debug, PartialEq)]
pub enum SecretProblem {
    NotFound { secret: String },
    KeyMissing { secret: String, key: String },
}

impl SecretProblem {
    /// The condition reason and the message for users; `owner` names the
    /// resource whose namespace the Secret was looked for in.
    pub fn describe(&self, owner: &str) -> (&'static str, String) {
        match self {
            SecretProblem::NotFound { secret } => (
                reason::SECRET_NOT_FOUND,
                format!("Secret {secret:?} was not found in the {owner}'s namespace"),
            ),
            SecretProblem::KeyMissing { secret, key } => (
                reason::SECRET_KEY_MISSING,
                format!("Secret {secret:?} has no key {key:?}"),
            ),
        }
    }
}

impl Context {
    /// The Postgres URL in the Secret `database` names, in `namespace`.
    pub async fn database_url(
        &self,
        namespace: &str,
        database: &DatabaseRef,
    ) -> Result<String, Blocked<SecretProblem>> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let Some(secret) = secrets.get_opt(&database.secret_name).await? else {
            return Err(Blocked::By(SecretProblem::NotFound {
                secret: database.secret_name.clone(),
            }));
        };
        let url = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&database.key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok());
        url.map(|u| u.trim().to_string()).ok_or_else(|| {
            Blocked::By(SecretProblem::KeyMissing {
                secret: database.secret_name.clone(),
                key: database.key.clone(),
            })
        })
    }
}

/// Errors that mean the database could not be reached (as opposed to a
/// statement it refused).
pub fn is_connection_error(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    )
}
