//! The query side of the cache: L1 in-process (moka: size-bounded, TTL,
//! one load per key however many requests miss at once) and L2 Redis, kept
//! coherent by the projector's invalidation messages.
//!
//! L1 is only trusted while the invalidation subscription is live: when it
//! drops, L1 is emptied and bypassed until the subscription is back, so a
//! missed message can never leave a stale entry behind. L2 fills are
//! conditional on the projection's generation not having moved since the
//! read began (a Lua check-and-set), which closes the race between a slow
//! database read and an invalidation.
//!
//! Projections come and go with the catalog. A projection's cache is used
//! only once it has learnt the projection's epoch and generation from
//! Redis (`synced`); until then its reads go to Postgres.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use redis::AsyncCommands;
use tokio::sync::mpsc;

use crate::invalidation::{Message, Scope};
use crate::metrics::Metrics;
use crate::redis_conn::{Redis, RedisTarget};

/// After a Redis error, L2 is skipped for this long instead of making every
/// request wait on a dead connection.
const REDIS_BACKOFF: Duration = Duration::from_secs(1);

/// A cached answer: the JSON body, or `None` for "no such row". The body is
/// `Bytes` so an L1 hit hands the response the same buffer, uncopied.
pub type Cached = Arc<Option<Bytes>>;

/// Per-projection cache state.
pub struct ProjectionCache {
    pub name: String,
    /// The settings it was made with.
    pub spec: eventplane_api::CacheSpec,
    pub l1: moka::future::Cache<String, Cached>,
    pub l2_ttl: Duration,
    pub enabled: bool,
    generation: AtomicU64,
    epoch: AtomicU64,
    synced: AtomicBool,
}

impl ProjectionCache {
    pub fn new(name: &str, spec: &eventplane_api::CacheSpec, capacity_bytes: u64) -> Self {
        let l1 = moka::future::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|k: &String, v: &Cached| {
                (k.len() + v.as_ref().as_ref().map_or(0, Bytes::len) + 64).min(u32::MAX as usize)
                    as u32
            })
            .time_to_live(Duration::from_millis(spec.l1_ttl_ms.max(1)))
            .build();
        Self {
            name: name.to_string(),
            spec: spec.clone(),
            l1,
            l2_ttl: Duration::from_secs(spec.l2_ttl_seconds.max(1)),
            enabled: spec.enabled,
            generation: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            synced: AtomicBool::new(false),
        }
    }

    /// Whether the epoch and generation are known, so L1 and L2 keys are
    /// the current ones.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Takes the epoch and generation Redis holds and empties L1.
    fn sync(&self, epoch: u64, generation: u64) {
        if self.epoch.swap(epoch, Ordering::AcqRel) == epoch {
            self.generation.fetch_max(generation, Ordering::AcqRel);
        } else {
            // Another epoch's generations count on their own (from 1 after
            // a fresh one): take them as they are, even if lower.
            self.generation.store(generation, Ordering::Release);
        }
        self.l1.invalidate_all();
        self.synced.store(true, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    async fn apply(&self, message: &Message) {
        if message.flush {
            self.l1.invalidate_all();
            return;
        }
        if message.epoch != self.epoch() {
            // A new epoch starts a new key space, whose generations count
            // from wherever Redis has them now (from 1 after Redis lost its
            // data): take them as they come, even if lower.
            self.epoch.store(message.epoch, Ordering::Release);
            self.generation.store(message.generation, Ordering::Release);
            self.l1.invalidate_all();
            return;
        }
        // The generation moves first, so a load that began before this
        // message notices and does not keep its (possibly stale) result.
        self.generation
            .fetch_max(message.generation, Ordering::AcqRel);
        for key in &message.keys {
            self.l1.invalidate(&row_l1_key(message.version, key)).await;
        }
    }
}

/// `r:{version}:{key}`, put together without the formatting machinery:
/// every cache hit makes one.
pub fn row_l1_key(version: u32, key: &str) -> String {
    let mut digits = itoa::Buffer::new();
    let version = digits.format(version);
    let mut l1_key = String::with_capacity("r::".len() + version.len() + key.len());
    l1_key.push_str("r:");
    l1_key.push_str(version);
    l1_key.push(':');
    l1_key.push_str(key);
    l1_key
}

/// Which layer answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    L1,
    L2,
    L3,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::L1 => "l1",
            Layer::L2 => "l2",
            Layer::L3 => "l3",
        }
    }
}

pub struct CacheBus {
    /// Whose cache this is, in a Redis several databases may share.
    pub scope: Scope,
    projections: RwLock<HashMap<String, Arc<ProjectionCache>>>,
    /// Queued L2 fills (with Redis).
    fills: Option<mpsc::Sender<Fill>>,
    redis: Option<Redis>,
    live: AtomicBool,
    /// A subscription was live once and was lost since.
    lost: AtomicBool,
    /// Until when L2 is skipped after a Redis error, in milliseconds since
    /// `started` (checked by every L2 access, so no lock).
    redis_down_until_ms: AtomicU64,
    started: Instant,
    pub metrics: Arc<Metrics>,
}

/// Fills L2 keys of one projection, each only if the projection's epoch
/// and generation are still those its read began with (no invalidation
/// raced it, and Redis did not lose and restart the projection's state
/// meanwhile). One call carries a whole batch: the script's own cost in
/// Redis is paid once, not per key.
/// KEYS: generation key, epoch key, then the keys to fill. ARGV: TTL in ms,
/// then for each key to fill: generation, epoch, value.
const FILL_IF_CURRENT: &str = r#"
local generation = redis.call('GET', KEYS[1]) or '0'
local epoch = redis.call('GET', KEYS[2]) or '0'
local filled = 0
for i = 3, #KEYS do
  local at = 2 + (i - 3) * 3
  if ARGV[at] == generation and ARGV[at + 1] == epoch then
    redis.call('SET', KEYS[i], ARGV[at + 2], 'PX', ARGV[1])
    filled = filled + 1
  end
end
return filled
"#;

/// The fill script, hashed once: the hash is what EVALSHA sends.
static FILL_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(FILL_IF_CURRENT));

/// Fills queued for Redis at most; beyond, a fill is dropped.
const FILL_QUEUE: usize = 4096;
/// Most fills one script call carries.
const FILL_BATCH: usize = 256;

/// An L2 fill waiting for its script call.
struct Fill {
    cache: Arc<ProjectionCache>,
    key: String,
    epoch: u64,
    generation: u64,
    value: Vec<u8>,
}

impl CacheBus {
    /// Makes the bus; with Redis it also starts the task that writes L2
    /// fills.
    pub fn new(scope: Scope, redis: Option<Redis>, metrics: Arc<Metrics>) -> Arc<Self> {
        let (fills, queue) = match redis {
            Some(_) => {
                let (fills, queue) = mpsc::channel(FILL_QUEUE);
                (Some(fills), Some(queue))
            }
            None => (None, None),
        };
        let bus = Arc::new(Self {
            scope,
            projections: RwLock::new(HashMap::new()),
            fills,
            redis,
            live: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            redis_down_until_ms: AtomicU64::new(0),
            started: Instant::now(),
            metrics,
        });
        if let Some(queue) = queue {
            tokio::spawn(write_fills(Arc::downgrade(&bus), queue));
        }
        bus
    }

    /// L1 may be used only while invalidations are being received.
    pub fn l1_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Whether `cache`'s layers may answer: caching is on for it and, with
    /// Redis, it knows the current epoch and generation and the
    /// invalidations keep reaching it (without them an epoch may have moved
    /// unseen, and L2 keys of the old one are no longer invalidated).
    pub fn usable(&self, cache: &ProjectionCache) -> bool {
        cache.enabled && (self.redis.is_none() || (cache.synced() && self.l1_live()))
    }

    /// The cache of projection `name`, made (and synced in the background)
    /// if there is none yet or its settings changed.
    pub fn cache(
        self: &Arc<Self>,
        name: &str,
        spec: &eventplane_api::CacheSpec,
        capacity_bytes: u64,
    ) -> Arc<ProjectionCache> {
        if let Some(cache) = self.lookup(name).filter(|c| c.spec == *spec) {
            return cache;
        }
        let cache = Arc::new(ProjectionCache::new(name, spec, capacity_bytes));
        self.projections
            .write()
            .expect("not poisoned")
            .insert(name.to_string(), cache.clone());
        if self.redis.is_none() {
            cache.synced.store(true, Ordering::Release);
        } else if self.l1_live() {
            tokio::spawn(self.clone().sync_one(cache.clone()));
        }
        cache
    }

    /// An invalidator of projection `name`'s cache entries, if there is a
    /// Redis (for writes outside the projector, such as a dead-letter
    /// replay).
    pub fn invalidator(&self, name: &str) -> Option<crate::invalidation::Invalidator> {
        self.redis.clone().map(|redis| {
            crate::invalidation::Invalidator::new(
                self.scope.clone(),
                name,
                redis,
                self.metrics.clone(),
            )
        })
    }

    /// Keeps the caches of the projections `keep` says yes to.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.projections
            .write()
            .expect("not poisoned")
            .retain(|name, _| keep(name));
    }

    fn lookup(&self, name: &str) -> Option<Arc<ProjectionCache>> {
        self.projections
            .read()
            .expect("not poisoned")
            .get(name)
            .cloned()
    }

    fn all(&self) -> Vec<Arc<ProjectionCache>> {
        self.projections
            .read()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect()
    }

    async fn sync_one(self: Arc<Self>, cache: Arc<ProjectionCache>) {
        let Some(mut redis) = self.redis() else {
            return;
        };
        let read: redis::RedisResult<(Option<u64>, Option<u64>)> = redis::pipe()
            .get(self.scope.epoch_key(&cache.name))
            .get(self.scope.generation_key(&cache.name))
            .query_async(&mut redis)
            .await;
        match read {
            Ok((epoch, generation)) => cache.sync(epoch.unwrap_or(0), generation.unwrap_or(0)),
            Err(err) => self.redis_failed(&err),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn redis(&self) -> Option<Redis> {
        let redis = self.redis.clone()?;
        (self.now_ms() >= self.redis_down_until_ms.load(Ordering::Acquire)).then_some(redis)
    }

    fn redis_failed(&self, err: &redis::RedisError) {
        self.metrics.redis_errors.inc();
        let now = self.now_ms();
        let was = self
            .redis_down_until_ms
            .swap(now + REDIS_BACKOFF.as_millis() as u64, Ordering::AcqRel);
        if was <= now {
            tracing::warn!(error = %err, "redis unavailable; answering from Postgres");
        }
    }

    pub async fn l2_get(&self, key: &str) -> Option<Cached> {
        let mut redis = self.redis()?;
        match redis.get::<_, Option<Vec<u8>>>(key).await {
            Ok(Some(raw)) => Some(Arc::new(decode_l2(raw))),
            Ok(None) => None,
            Err(err) => {
                self.redis_failed(&err);
                None
            }
        }
    }

    /// Stores `value` under `key` unless the projection's generation moved
    /// past `generation` (an invalidation raced the read). The fill is
    /// queued and written with others in one script call, off the response
    /// path; when the queue is full it is dropped (the next miss fills).
    pub fn l2_fill(
        &self,
        cache: &Arc<ProjectionCache>,
        key: String,
        epoch: u64,
        generation: u64,
        value: &Cached,
    ) {
        if let Some(fills) = &self.fills {
            let _ = fills.try_send(Fill {
                cache: cache.clone(),
                key,
                epoch,
                generation,
                value: encode_l2(value),
            });
        }
    }

    /// Writes one batch of queued fills: a script call per projection (its
    /// keys share one hash slot, so a cluster takes it on one node).
    async fn write_fills(&self, batch: &mut [Fill]) {
        batch.sort_by(|a, b| a.cache.name.cmp(&b.cache.name));
        for fills in batch.chunk_by(|a, b| a.cache.name == b.cache.name) {
            let Some(mut redis) = self.redis() else {
                return;
            };
            let call = self.fill_call(fills);
            let mut written = call.query_async::<u64>(&mut redis).await;
            if matches!(&written, Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
            {
                // Redis restarted (or flushed its scripts) since the script
                // was last loaded.
                written = match FILL_SCRIPT.prepare_invoke().load_async(&mut redis).await {
                    Ok(_) => call.query_async::<u64>(&mut redis).await,
                    Err(err) => Err(err),
                };
            }
            if let Err(err) = written {
                self.redis_failed(&err);
            }
        }
    }

    /// The script call that writes `fills`, all of one projection.
    fn fill_call(&self, fills: &[Fill]) -> redis::Cmd {
        let cache = &fills[0].cache;
        let mut call = redis::cmd("EVALSHA");
        call.arg(FILL_SCRIPT.get_hash())
            .arg(2 + fills.len())
            .arg(self.scope.generation_key(&cache.name))
            .arg(self.scope.epoch_key(&cache.name));
        for fill in fills {
            call.arg(&fill.key);
        }
        call.arg(cache.l2_ttl.as_millis() as u64);
        for fill in fills {
            call.arg(fill.generation)
                .arg(fill.epoch)
                .arg(&fill.value[..]);
        }
        call
    }

    /// Keeps the invalidation subscription up; runs until the process ends.
    /// On a cluster it moves to the next node each time one fails.
    pub async fn subscribe(self: Arc<Self>, redis_url: String) {
        let urls = match RedisTarget::parse(&redis_url) {
            Ok(target) => target.subscription_urls(),
            Err(why) => {
                tracing::error!(%why, "no cache invalidation subscription");
                return;
            }
        };
        for url in urls.iter().cycle() {
            if let Err(err) = self.clone().subscription(url).await {
                tracing::warn!(error = %err, node = %url, "cache invalidation subscription lost; L1 bypassed until it is back");
            }
            if self.live.swap(false, Ordering::AcqRel) {
                self.lost.store(true, Ordering::Release);
            }
            for cache in self.all() {
                cache.l1.invalidate_all();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn subscription(self: Arc<Self>, redis_url: &str) -> redis::RedisResult<()> {
        let client = redis::Client::open(redis_url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(self.scope.channel()).await?;
        let clustered = matches!(self.redis, Some(Redis::Cluster(..)));
        let mut node = client.get_multiplexed_async_connection().await?;
        if clustered {
            cluster_healthy(&mut node).await?;
        }
        // Learn where each projection stands now; anything before is gone
        // from L1 already. (On a cluster the keys live on other nodes: ask
        // through the cluster connection.)
        let mut conn = match &self.redis {
            Some(redis) => redis.clone(),
            None => return Ok(()),
        };
        if self.lost.load(Ordering::Acquire) {
            // While the subscription was down, invalidations may have failed
            // to delete L2 rows (a cluster node that refused its slots, a
            // partition) and be still pending: orphan every L2 entry before
            // trusting L2 again.
            for cache in self.all() {
                if let Some(invalidator) = self.invalidator(&cache.name) {
                    invalidator.orphan_all().await?;
                }
            }
            self.lost.store(false, Ordering::Release);
        }
        for cache in self.all() {
            let generation: Option<u64> = conn.get(self.scope.generation_key(&cache.name)).await?;
            let epoch: Option<u64> = conn.get(self.scope.epoch_key(&cache.name)).await?;
            cache.sync(epoch.unwrap_or(0), generation.unwrap_or(0));
        }
        self.live.store(true, Ordering::Release);
        tracing::info!("cache invalidation subscription live");
        let mut messages = pubsub.on_message();
        let mut health = tokio::time::interval(CLUSTER_HEALTH_EVERY);
        loop {
            let msg = tokio::select! {
                msg = messages.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
                // A cluster that lost a master refuses its slots, so some
                // invalidations cannot be delivered while the subscription
                // lives on: L1 is given up until the cluster is whole.
                _ = health.tick(), if clustered => {
                    cluster_healthy(&mut node).await?;
                    continue;
                }
            };
            let payload: String = match msg.get_payload() {
                Ok(p) => p,
                Err(err) => {
                    tracing::warn!(error = %err, "unreadable invalidation message");
                    continue;
                }
            };
            match serde_json::from_str::<Message>(&payload) {
                Ok(message) => {
                    if let Some(cache) = self.lookup(&message.projection) {
                        cache.apply(&message).await;
                    }
                }
                Err(err) => tracing::warn!(error = %err, "malformed invalidation message"),
            }
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "subscription stream ended",
        )))
    }
}

/// Writes queued L2 fills in batches until the bus is gone (its queue's
/// sender goes with it). Holds the bus only while writing a batch.
async fn write_fills(bus: std::sync::Weak<CacheBus>, mut queue: mpsc::Receiver<Fill>) {
    let mut batch = Vec::with_capacity(FILL_BATCH);
    while queue.recv_many(&mut batch, FILL_BATCH).await > 0 {
        let Some(bus) = bus.upgrade() else {
            return;
        };
        bus.write_fills(&mut batch).await;
        batch.clear();
    }
}

/// How often a query process on a Redis Cluster checks that the cluster is
/// whole (its node's `CLUSTER INFO`).
const CLUSTER_HEALTH_EVERY: Duration = Duration::from_millis(250);

async fn cluster_healthy(node: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
    let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(node).await?;
    if info.lines().any(|l| l.trim() == "cluster_state:ok") {
        Ok(())
    } else {
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "the Redis Cluster is not healthy",
        )))
    }
}

/// L2 values carry a one-byte tag so "no such row" can be cached too.
fn encode_l2(value: &Cached) -> Vec<u8> {
    match value.as_ref() {
        Some(body) => {
            let mut raw = Vec::with_capacity(body.len() + 1);
            raw.push(b'1');
            raw.extend_from_slice(body);
            raw
        }
        None => b"0".to_vec(),
    }
}

fn decode_l2(raw: Vec<u8>) -> Option<Bytes> {
    (raw.first() == Some(&b'1')).then(|| Bytes::from(raw).slice(1..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_values_round_trip_including_absent_rows() {
        let present: Cached = Arc::new(Some(Bytes::from_static(b"{\"id\":\"a\"}")));
        assert_eq!(decode_l2(encode_l2(&present)), *present);
        let absent: Cached = Arc::new(None);
        assert_eq!(decode_l2(encode_l2(&absent)), None);
    }
}
