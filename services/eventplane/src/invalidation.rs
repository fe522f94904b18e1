//! Cache invalidation between the projector and the query processes, through
//! Redis. After each committed batch the projector, in one script:
//! deletes the L2 row keys it changed, bumps the projection's generation
//! (list cache keys include it, so lists are invalidated without scanning
//! keys) and publishes `{projection, version, generation, keys}` so every
//! query process drops those L1 entries.
//!
//! Every key names the projection version it caches: a query process that
//! still serves the old version after a swap never reads the new
//! version's rows from the cache (nor the other way round).
//!
//! An invalidation that cannot be delivered is retried with the next batch;
//! if too many pile up, or at projector start (a previous run may have died
//! with some undelivered), the projection's epoch is bumped instead, which
//! orphans every L2 key of the projection at once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::metrics::Metrics;

pub const CHANNEL: &str = "eventplane:invalidate";

/// Undelivered row keys kept per projection before falling back to an epoch
/// bump.
const MAX_PENDING_KEYS: usize = 10_000;

pub fn generation_key(projection: &str) -> String {
    format!("ep:{{{projection}}}:gen")
}

pub fn epoch_key(projection: &str) -> String {
    format!("ep:{{{projection}}}:epoch")
}

/// The prefix of every L2 key of one version of a projection. The
/// projection name sits in a hash tag so that a projection's keys share a
/// Redis Cluster slot.
fn version_prefix(projection: &str, version: u32) -> String {
    format!("ep:{{{projection}}}:v{version}:")
}

/// L2 key of one row.
pub fn row_key(projection: &str, version: u32, epoch: u64, key: &str) -> String {
    format!("{}{epoch}:row:{key}", version_prefix(projection, version))
}

pub fn list_key(
    projection: &str,
    version: u32,
    epoch: u64,
    generation: u64,
    query: &str,
    params_digest: &str,
) -> String {
    format!(
        "{}{epoch}:list:{generation}:{query}:{params_digest}",
        version_prefix(projection, version)
    )
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub projection: String,
    /// The version whose rows changed.
    #[serde(default)]
    pub version: u32,
    pub epoch: u64,
    pub generation: u64,
    pub keys: Vec<String>,
}

pub async fn redis_manager(url: &str) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1);
    ConnectionManager::new_with_config(client, config).await
}

#[derive(Default)]
struct Pending {
    /// The version the keys belong to.
    version: u32,
    keys: BTreeSet<String>,
    overflowed: bool,
}

/// Deletes the changed rows' L2 keys under the projection's current epoch
/// (bumping it first when asked), bumps the generation and publishes the
/// message, all in one atomic script: a concurrent epoch bump (a swap by a
/// rebuild) can never leave keys of the new epoch undeleted.
/// KEYS: epoch key, generation key. ARGV: bump flag, row-key prefix (up to
/// the epoch), message prefix (JSON up to the epoch), keys as a JSON array,
/// then the keys themselves.
const DELIVER: &str = r#"
local epoch = redis.call('GET', KEYS[1]) or '0'
if ARGV[1] == '1' then epoch = tostring(redis.call('INCR', KEYS[1])) end
for i = 5, #ARGV do redis.call('DEL', ARGV[2] .. epoch .. ':row:' .. ARGV[i]) end
local generation = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', 'eventplane:invalidate',
  ARGV[3] .. epoch .. ',"generation":' .. generation .. ',"keys":' .. ARGV[4] .. '}')
return generation
"#;

/// The projector's side: one per projection.
pub struct Invalidator {
    projection: String,
    redis: ConnectionManager,
    pending: Mutex<Pending>,
    metrics: Arc<Metrics>,
}

impl Invalidator {
    pub fn new(projection: &str, redis: ConnectionManager, metrics: Arc<Metrics>) -> Self {
        Self {
            projection: projection.to_string(),
            redis,
            // A new projector cannot know what a previous one failed to
            // deliver: start by orphaning the projection's L2 keys.
            pending: Mutex::new(Pending {
                version: 0,
                keys: BTreeSet::new(),
                overflowed: true,
            }),
            metrics,
        }
    }

    /// Delivers the invalidation of `keys` of `version` (and anything
    /// still pending). Never fails: what cannot be delivered now is kept
    /// for later.
    pub async fn invalidate(&self, version: u32, keys: impl IntoIterator<Item = String>) {
        let mut pending = self.pending.lock().await;
        if pending.version != version {
            // Keys still pending for another version cannot be named any
            // more: orphan everything instead.
            if !pending.keys.is_empty() {
                pending.overflowed = true;
                pending.keys.clear();
            }
            pending.version = version;
        }
        pending.keys.extend(keys);
        if pending.keys.len() > MAX_PENDING_KEYS {
            pending.overflowed = true;
            pending.keys.clear();
        }
        self.flush(&mut pending).await;
    }

    /// Orphans every cached entry of the projection (after a swap made
    /// another version active).
    pub async fn invalidate_all(&self) {
        let mut pending = self.pending.lock().await;
        pending.overflowed = true;
        pending.keys.clear();
        self.flush(&mut pending).await;
    }

    async fn flush(&self, pending: &mut Pending) {
        match self.deliver(pending).await {
            Ok(()) => {
                pending.keys.clear();
                pending.overflowed = false;
            }
            Err(err) => {
                self.metrics.redis_errors.inc();
                tracing::warn!(projection = %self.projection, error = %err, "cache invalidation not delivered; will retry");
            }
        }
    }

    async fn deliver(&self, pending: &Pending) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        let keys: Vec<&String> = pending.keys.iter().collect();
        let name = serde_json::to_string(&self.projection).expect("strings serialize");
        let script = redis::Script::new(DELIVER);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(epoch_key(&self.projection))
            .key(generation_key(&self.projection))
            .arg(if pending.overflowed { "1" } else { "0" })
            .arg(version_prefix(&self.projection, pending.version))
            .arg(format!(
                "{{\"projection\":{name},\"version\":{},\"epoch\":",
                pending.version
            ))
            .arg(serde_json::to_string(&keys).expect("strings serialize"));
        for key in keys {
            invocation.arg(key);
        }
        let _generation: u64 = invocation.invoke_async(&mut redis).await?;
        Ok(())
    }
}
