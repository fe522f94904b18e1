//! Cache invalidation between the projector and the query processes, through
//! Redis. After each committed batch the projector, in one MULTI:
//! deletes the L2 row keys it changed, bumps the projection's generation
//! (list cache keys include it, so lists are invalidated without scanning
//! keys) and publishes `{projection, generation, keys}` so every query
//! process drops those L1 entries.
//!
//! An invalidation that cannot be delivered is retried with the next batch;
//! if too many pile up, or at projector start (a previous run may have died
//! with some undelivered), the projection's epoch is bumped instead, which
//! orphans every L2 key of the projection at once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
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

/// L2 key of one row. The projection name sits in a hash tag so that a
/// projection's keys share a Redis Cluster slot.
pub fn row_key(projection: &str, epoch: u64, key: &str) -> String {
    format!("ep:{{{projection}}}:{epoch}:row:{key}")
}

pub fn list_key(
    projection: &str,
    epoch: u64,
    generation: u64,
    query: &str,
    params_digest: &str,
) -> String {
    format!("ep:{{{projection}}}:{epoch}:list:{generation}:{query}:{params_digest}")
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub projection: String,
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
    keys: BTreeSet<String>,
    overflowed: bool,
}

/// The projector's side: one per projection.
pub struct Invalidator {
    projection: String,
    redis: ConnectionManager,
    epoch: Mutex<Option<u64>>,
    pending: Mutex<Pending>,
    metrics: Arc<Metrics>,
}

impl Invalidator {
    pub fn new(projection: &str, redis: ConnectionManager, metrics: Arc<Metrics>) -> Self {
        Self {
            projection: projection.to_string(),
            redis,
            epoch: Mutex::new(None),
            // A new projector cannot know what a previous one failed to
            // deliver: start by orphaning the projection's L2 keys.
            pending: Mutex::new(Pending {
                keys: BTreeSet::new(),
                overflowed: true,
            }),
            metrics,
        }
    }

    /// Delivers the invalidation of `keys` (and anything still pending).
    /// Never fails: what cannot be delivered now is kept for later.
    pub async fn invalidate(&self, keys: impl IntoIterator<Item = String>) {
        let mut pending = self.pending.lock().await;
        pending.keys.extend(keys);
        if pending.keys.len() > MAX_PENDING_KEYS {
            pending.overflowed = true;
            pending.keys.clear();
        }
        match self.deliver(&pending).await {
            Ok(()) => *pending = Pending::default(),
            Err(err) => {
                self.metrics.redis_errors.inc();
                tracing::warn!(projection = %self.projection, error = %err, "cache invalidation not delivered; will retry");
            }
        }
    }

    async fn deliver(&self, pending: &Pending) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        let mut epoch = self.epoch.lock().await;
        if pending.overflowed || epoch.is_none() {
            let next: u64 = if pending.overflowed {
                redis.incr(epoch_key(&self.projection), 1).await?
            } else {
                redis
                    .get::<_, Option<u64>>(epoch_key(&self.projection))
                    .await?
                    .unwrap_or(0)
            };
            *epoch = Some(next);
        }
        let epoch = epoch.expect("epoch was just set");
        let keys: Vec<String> = pending.keys.iter().cloned().collect();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for key in &keys {
            pipe.del(row_key(&self.projection, epoch, key)).ignore();
        }
        pipe.incr(generation_key(&self.projection), 1);
        let (generation,): (u64,) = pipe.query_async(&mut redis).await?;
        let message = Message {
            projection: self.projection.clone(),
            epoch,
            generation,
            keys,
        };
        let payload = serde_json::to_string(&message).expect("messages serialize");
        redis.publish::<_, _, ()>(CHANNEL, payload).await?;
        Ok(())
    }
}
