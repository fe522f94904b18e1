//! Cache invalidation between the projector and the query processes, through
//! Redis. After each committed batch the projector, in one script:
//! deletes the L2 row keys it changed, bumps the projection's generation
//! (list cache keys include it, so lists are invalidated without scanning
//! keys) and publishes `{projection, version, generation, keys}` so every
//! query process drops those L1 entries.
//!
//! Every key names the database (its instance id) and the projection
//! version it caches: two stacks sharing a Redis never see each other's
//! entries, and a query process that still serves the old version after a
//! swap never reads the new version's rows from the cache (nor the other
//! way round).
//!
//! An invalidation that cannot be delivered is retried with the next batch;
//! if too many pile up, or at projector start (a previous run may have died
//! with some undelivered), the projection gets a fresh random epoch instead,
//! which orphans every L2 key of the projection at once. An epoch is never
//! reused, so one that Redis lost (a restart, a failover, a flush) cannot
//! come back and revive the keys of its time.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::redis_conn::Redis;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::metrics::Metrics;

/// Undelivered row keys kept per projection before falling back to an epoch
/// bump.
const MAX_PENDING_KEYS: usize = 10_000;

/// Where one database's cache lives in a Redis that several databases may
/// share: every key and the invalidation channel carry the database's
/// instance id. Keys hold the projection in a hash tag with it, so one
/// projection's keys (and the scripts that touch several) stay in one
/// Redis Cluster slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope(String);

impl Scope {
    /// The scope of the database whose instance id is `instance`
    /// (`eventplane_store::db::instance_id`).
    pub fn new(instance: &str) -> Self {
        Scope(instance.to_string())
    }

    /// The channel the projector publishes invalidations on.
    pub fn channel(&self) -> String {
        format!("eventplane:invalidate:{}", self.0)
    }

    fn tag(&self, projection: &str) -> String {
        format!("ep:{{{}:{projection}}}", self.0)
    }

    pub fn generation_key(&self, projection: &str) -> String {
        format!("{}:gen", self.tag(projection))
    }

    pub fn epoch_key(&self, projection: &str) -> String {
        format!("{}:epoch", self.tag(projection))
    }

    /// The prefix of every L2 key of one version of a projection.
    fn version_prefix(&self, projection: &str, version: u32) -> String {
        format!("{}:v{version}:", self.tag(projection))
    }

    /// L2 key of one row.
    pub fn row_key(&self, projection: &str, version: u32, epoch: u64, key: &str) -> String {
        format!(
            "{}{epoch}:row:{key}",
            self.version_prefix(projection, version)
        )
    }

    pub fn list_key(
        &self,
        projection: &str,
        version: u32,
        epoch: u64,
        generation: u64,
        query: &str,
        params_digest: &str,
    ) -> String {
        format!(
            "{}{epoch}:list:{generation}:{query}:{params_digest}",
            self.version_prefix(projection, version)
        )
    }
}

/// A fresh epoch: random, so an epoch never comes back after Redis lost
/// its data (a counter would start again at 1 and meet numbers query
/// processes still hold). 63 bits keep it a plain JSON number.
fn fresh_epoch() -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64) >> 1
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
    /// Sent when an invalidation could not be delivered (part of a cluster
    /// is down): query processes drop every L1 entry of the projection,
    /// since they cannot know which rows changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flush: bool,
}

#[derive(Default)]
struct Pending {
    /// The version the keys belong to.
    version: u32,
    keys: BTreeSet<String>,
    overflowed: bool,
}

/// Deletes the changed rows' L2 keys under the projection's current epoch,
/// bumps the generation and publishes the message, all in one atomic
/// script: a concurrent epoch change (a swap by a rebuild) can never leave
/// keys of the new epoch undeleted. When asked, or when Redis has no epoch
/// (it restarted empty, failed over or was flushed), the projection gets a
/// fresh epoch first, which orphans every key it had.
/// KEYS: epoch key, generation key. ARGV: bump flag, row-key prefix (up to
/// the epoch), message prefix (JSON up to the epoch), keys as a JSON array,
/// a fresh epoch, the channel, then the keys themselves.
const DELIVER: &str = r#"
local epoch = redis.call('GET', KEYS[1])
if (not epoch) or ARGV[1] == '1' then
  epoch = ARGV[5]
  redis.call('SET', KEYS[1], epoch)
end
for i = 7, #ARGV do redis.call('DEL', ARGV[2] .. epoch .. ':row:' .. ARGV[i]) end
local generation = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[6],
  ARGV[3] .. epoch .. ',"generation":' .. generation .. ',"keys":' .. ARGV[4] .. '}')
return generation
"#;

/// The projector's side: one per projection.
pub struct Invalidator {
    scope: Scope,
    projection: String,
    redis: Redis,
    pending: Mutex<Pending>,
    metrics: Arc<Metrics>,
}

impl Invalidator {
    pub fn new(scope: Scope, projection: &str, redis: Redis, metrics: Arc<Metrics>) -> Self {
        Self {
            scope,
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

    /// Orphans every L2 entry of the projection now, or says why it could
    /// not.
    pub async fn orphan_all(&self) -> redis::RedisResult<()> {
        let mut pending = self.pending.lock().await;
        pending.overflowed = true;
        pending.keys.clear();
        self.deliver(&pending).await?;
        pending.overflowed = false;
        Ok(())
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
                self.flush_l1().await;
            }
        }
    }

    /// Tells query processes to drop the projection's L1 entries. On a
    /// cluster the invalidation script fails when its slot's node is down,
    /// while the subscription (on another node) stays live and L1 stays in
    /// use: without this, L1 would keep rows the failed invalidation named.
    /// A plain PUBLISH names no key, so any node that is up takes it. With a
    /// single Redis down it fails too, and so has the subscription, which
    /// empties and bypasses L1 by itself.
    async fn flush_l1(&self) {
        let message = Message {
            projection: self.projection.clone(),
            version: 0,
            epoch: 0,
            generation: 0,
            keys: Vec::new(),
            flush: true,
        };
        let payload = serde_json::to_string(&message).expect("messages serialize");
        let sent = self
            .redis
            .publish_everywhere(&self.scope.channel(), &payload)
            .await;
        if let Err(err) = sent {
            tracing::debug!(projection = %self.projection, error = %err, "L1 flush not published either");
        }
    }

    async fn deliver(&self, pending: &Pending) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        let keys: Vec<&String> = pending.keys.iter().collect();
        let name = serde_json::to_string(&self.projection).expect("strings serialize");
        // Hashed once, as the query side's fill script is.
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(DELIVER));
        let mut invocation = SCRIPT.prepare_invoke();
        invocation
            .key(self.scope.epoch_key(&self.projection))
            .key(self.scope.generation_key(&self.projection))
            .arg(if pending.overflowed { "1" } else { "0" })
            .arg(self.scope.version_prefix(&self.projection, pending.version))
            .arg(format!(
                "{{\"projection\":{name},\"version\":{},\"epoch\":",
                pending.version
            ))
            .arg(serde_json::to_string(&keys).expect("strings serialize"))
            .arg(fresh_epoch().to_string())
            .arg(self.scope.channel());
        for key in keys {
            invocation.arg(key);
        }
        let _generation: u64 = invocation.invoke_async(&mut redis).await?;
        Ok(())
    }
}
