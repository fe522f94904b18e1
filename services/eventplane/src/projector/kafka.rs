//! Consumer-group projectors (`projector --source kafka`): every process
//! started with a Kafka source runs one consumer per Kafka-fed projection
//! of the catalog, in the group `<prefix>.<projection>`, so replicas share
//! the topic's partitions (one replica per partition at most does work).
//!
//! Postgres holds where each partition stands (`kafka_offsets`, written
//! with the rows), not Kafka: a message delivered again after a rebalance
//! or a crash is recognised there and skipped, and a batch still running
//! when its partitions move either commits first or rolls back, because
//! the new owner's batch waits on the partition rows it holds. Offsets are
//! committed to Kafka after each batch only so that a restarted consumer
//! does not read far behind.
//!
//! Setting a Kafka-fed projection up and rebuilding it stay with the
//! projection's lease holder, as for every projection (`supervisor`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventplane_store::Projection;
use eventplane_store::catalog::{Entry, Snapshot};
use eventplane_store::kafka_batch::{self, Gap, KafkaOutcome, Message, PartitionBatch};
use rdkafka::Message as _;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::catalog::Follower;
use crate::invalidation::{Invalidator, Scope};
use crate::metrics::{Metrics, ProjectionLabels};
use crate::relay::wire;

/// Pause after a batch that failed (the database is down, a deadlock with
/// another replica's batch): the same messages are applied again.
const RETRY: Duration = Duration::from_millis(500);
/// Longest a fetch waits at the broker for messages (librdkafka's default
/// is 500 ms).
const FETCH_WAIT_MS: &str = "20";
/// The longest time between a member's heartbeats to the group.
const HEARTBEAT_MAX: Duration = Duration::from_secs(1);
/// How long a batch waits for more messages once it has one.
const GATHER: Duration = Duration::from_millis(5);
/// How long a seek or a watermark query may wait for an answer.
const BROKER_TIMEOUT: Duration = Duration::from_secs(1);
/// After this long without a message, the consumer checks that none of
/// its partitions holds messages past the stored offset (`unstall`).
const STALL: Duration = Duration::from_secs(2);

/// Where a projector reads Kafka-fed projections from.
#[derive(Clone, Debug)]
pub struct KafkaSource {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Consumer groups are named `<prefix>.<projection>`.
    pub group_prefix: String,
    /// How long the group waits for a silent member before moving its
    /// partitions (`session.timeout.ms`).
    pub session_timeout: Duration,
}

/// Follows the catalog and keeps one consumer running per Kafka-fed
/// projection.
pub struct KafkaProjectors {
    pub pool: PgPool,
    pub follower: Follower,
    pub redis: Option<(crate::redis_conn::Redis, Scope)>,
    pub metrics: Arc<Metrics>,
    pub source: KafkaSource,
    pub batch_size: usize,
}

/// A consumer that is stopped when dropped.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

impl KafkaProjectors {
    pub async fn run(self) {
        let mut running: HashMap<String, Running> = HashMap::new();
        let mut catalog = self.follower.subscribe();
        loop {
            let snapshot = self.follower.current();
            self.converge(&snapshot, &mut running);
            if catalog.changed().await.is_err() {
                return;
            }
        }
    }

    fn converge(&self, snapshot: &Snapshot, running: &mut HashMap<String, Running>) {
        running.retain(|name, _| {
            let keep = snapshot
                .get(name)
                .is_some_and(|e| e.desired.kafka_topic().is_some());
            if !keep {
                tracing::info!(projection = %name, "stopping the Kafka consumer");
            }
            keep
        });
        for entry in &snapshot.entries {
            let Some(topic) = entry.desired.kafka_topic() else {
                continue;
            };
            if running.contains_key(&entry.name) {
                continue;
            }
            match self.consumer(entry, topic) {
                Ok(consumer) => {
                    tracing::info!(projection = %entry.name, topic, group = %consumer.group, "consuming");
                    let (stop, stopped) = watch::channel(false);
                    let task = tokio::spawn(consumer.run(stopped));
                    running.insert(entry.name.clone(), Running { stop, task });
                }
                Err(err) => {
                    tracing::error!(projection = %entry.name, error = %err, "Kafka consumer not created")
                }
            }
        }
    }

    fn consumer(&self, entry: &Entry, topic: &str) -> anyhow::Result<ProjectionConsumer> {
        let group = format!("{}.{}", self.source.group_prefix, entry.name);
        let labels = ProjectionLabels {
            projection: entry.name.clone(),
        };
        let context = Context {
            metrics: self.metrics.clone(),
            labels: labels.clone(),
            rebalances: AtomicU64::new(0),
        };
        let consumer: StreamConsumer<Context> = ClientConfig::new()
            .set("bootstrap.servers", &self.source.brokers)
            .set("group.id", &group)
            .set("client.id", self.follower.member())
            // Where a partition stands is in Postgres; Kafka's offsets
            // only save re-reading.
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // How long the broker may hold a fetch while no message comes:
            // a broker that does not answer as soon as one arrives (tansu)
            // adds up to this to every event's lag.
            .set("fetch.wait.max.ms", FETCH_WAIT_MS)
            // A topic the relay creates after the consumer subscribed is
            // found within this.
            .set("topic.metadata.refresh.interval.ms", "5000")
            .set(
                "session.timeout.ms",
                self.source.session_timeout.as_millis().to_string(),
            )
            // librdkafka sends no heartbeat while it waits to rejoin, and a
            // broker may hold a rejoin for seconds (tansu holds one 3 s):
            // with its default of 3 s between heartbeats, a live member's
            // session lapses during a rebalance and the group rebalances
            // again, without end.
            .set(
                "heartbeat.interval.ms",
                heartbeat_ms(self.source.session_timeout),
            )
            .create_with_context(context)?;
        consumer.subscribe(&[topic])?;
        let invalidator = self
            .redis
            .clone()
            .map(|(r, scope)| Invalidator::new(scope, &entry.name, r, self.metrics.clone()));
        Ok(ProjectionConsumer {
            pool: self.pool.clone(),
            name: entry.name.clone(),
            topic: topic.to_string(),
            group,
            consumer: Arc::new(consumer),
            invalidator,
            metrics: self.metrics.clone(),
            labels,
            batch_size: self.batch_size.max(1),
        })
    }
}

/// Time between heartbeats: a third of the session (Kafka's advice), and
/// at most a second, so a rejoin the broker holds fits in the session.
fn heartbeat_ms(session: Duration) -> String {
    (session / 3).min(HEARTBEAT_MAX).as_millis().to_string()
}

/// A partition read again after a gap: from its stored offset, or, when
/// that did not help, from its start.
struct Sought {
    stored: i64,
    from_start: bool,
    /// Batches read from the start that still began past `stored`.
    strikes: u32,
}

/// Where an idle partition stood when it was last read again from its
/// last message, and after how many rebalances (once it moved away and
/// back, it is read again even from the same place).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Probe {
    rebalances: u64,
    next: i64,
}

/// Batches that must begin past the stored offset, after reading from the
/// partition's start, before its offsets count as gone.
const GONE_AFTER: u32 = 3;

/// Reports partition assignments.
struct Context {
    metrics: Arc<Metrics>,
    labels: ProjectionLabels,
    /// Counts assignments and revocations, so the consumer's task can tell
    /// that its partitions moved since it last looked.
    rebalances: AtomicU64,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.metrics
            .kafka_partitions_assigned
            .get_or_create(&self.labels)
            .set(assigned as i64);
        match rebalance {
            Rebalance::Assign(_) | Rebalance::Revoke(_) => {
                self.rebalances.fetch_add(1, Ordering::Relaxed);
                tracing::info!(projection = %self.labels.projection, partitions = assigned, "partitions rebalanced")
            }
            Rebalance::Error(err) => {
                tracing::warn!(projection = %self.labels.projection, error = %err, "rebalance failed")
            }
        }
    }
}

struct ProjectionConsumer {
    pool: PgPool,
    name: String,
    topic: String,
    group: String,
    /// Shared with the blocking thread that asks the broker for watermarks.
    consumer: Arc<StreamConsumer<Context>>,
    invalidator: Option<Invalidator>,
    metrics: Arc<Metrics>,
    labels: ProjectionLabels,
    batch_size: usize,
}

impl ProjectionConsumer {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let Some(mut projection) = self.active(&mut stop).await else {
            return;
        };
        let mut sought: HashMap<i32, Sought> = HashMap::new();
        let mut unsought: HashMap<i32, Offset> = HashMap::new();
        let mut probed: HashMap<i32, Probe> = HashMap::new();
        while !*stop.borrow() {
            self.seek_again(&mut unsought);
            // A seek still owed is tried again after `RETRY` even when no
            // message comes: at the end of a partition none would.
            let idle = if unsought.is_empty() { STALL } else { RETRY };
            let Some(mut batches) = self.gather(&mut stop, idle).await else {
                return;
            };
            if batches.is_empty() {
                if unsought.is_empty() {
                    self.unstall(&mut sought, &mut unsought, &mut probed).await;
                }
                continue;
            }
            for batch in &mut batches {
                self.resume(&mut sought, batch);
            }
            // The same messages until they are applied: Postgres decides
            // what of them is new, so a retry never applies one twice.
            loop {
                match kafka_batch::apply(&self.pool, &mut projection, &self.topic, batches.clone())
                    .await
                {
                    Ok(outcome) => {
                        for gap in &outcome.gaps {
                            self.seek(&mut sought, &mut unsought, gap);
                        }
                        self.after(&projection, outcome).await;
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(projection = %self.name, error = %err, "Kafka batch failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY) => {}
                            _ = stop.changed() => return,
                        }
                    }
                }
            }
        }
    }

    /// The active version, once there is one (the lease holder sets the
    /// projection up).
    async fn active(&self, stop: &mut watch::Receiver<bool>) -> Option<Arc<Projection>> {
        loop {
            let found = match self.pool.acquire().await {
                Ok(mut conn) => eventplane_store::versions::active(&mut conn, &self.name).await,
                Err(err) => Err(err),
            };
            match found {
                Ok(Some(row)) => match row.spec() {
                    Ok(spec) => return Some(Arc::new(Projection::live(self.name.clone(), spec))),
                    Err(err) => {
                        tracing::error!(projection = %self.name, error = %err, "stored spec unreadable")
                    }
                },
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(projection = %self.name, error = %err, "active version not read")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.changed() => return None,
            }
        }
    }

    /// Waits for a message (at most `idle`: then there is no batch), then
    /// takes what else arrives within `GATHER`, up to the batch size;
    /// grouped by partition, in offset order.
    async fn gather(
        &self,
        stop: &mut watch::Receiver<bool>,
        idle: Duration,
    ) -> Option<Vec<PartitionBatch>> {
        let mut by_partition: BTreeMap<i32, Vec<(i64, Message)>> = BTreeMap::new();
        let mut taken = 0;
        let mut deadline: Option<Instant> = None;
        let idle_until = Instant::now() + idle;
        while taken < self.batch_size {
            let received = match deadline {
                None => tokio::select! {
                    received = self.consumer.recv() => received,
                    _ = stop.changed() => return None,
                    _ = tokio::time::sleep_until(idle_until) => break,
                },
                Some(at) => match tokio::time::timeout_at(at, self.consumer.recv()).await {
                    Ok(received) => received,
                    Err(_) => break,
                },
            };
            let message = match received {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!(projection = %self.name, error = %err, "Kafka consumer error");
                    if deadline.is_some() {
                        break;
                    }
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let (partition, offset) = (message.partition(), message.offset());
            let decoded = wire::decode(&message).unwrap_or_else(|reason| {
                // Nothing names the event, so nothing can be recorded of
                // it; the log in Postgres still holds every event.
                self.metrics.kafka_undecodable.get_or_create(&self.labels).inc();
                tracing::error!(projection = %self.name, partition, offset, %reason, "skipping a message that names no event");
                Message::Unreadable
            });
            by_partition
                .entry(partition)
                .or_default()
                .push((offset, decoded));
            taken += 1;
            deadline.get_or_insert_with(|| Instant::now() + GATHER);
        }
        Some(
            by_partition
                .into_iter()
                .map(|(partition, messages)| PartitionBatch {
                    partition,
                    messages,
                    resume_at: None,
                })
                .collect(),
        )
    }

    /// Reads a partition again from before where it stands. First from
    /// the stored offset; if the broker then again starts later (some
    /// brokers answer a fetch from inside a record batch with the next
    /// batch), from the partition's start, skipping what was applied.
    fn seek(
        &self,
        sought: &mut HashMap<i32, Sought>,
        unsought: &mut HashMap<i32, Offset>,
        gap: &Gap,
    ) {
        let again = sought
            .get(&gap.partition)
            .is_some_and(|s| s.stored == gap.stored);
        let (offset, from_start) = if again {
            (Offset::Beginning, true)
        } else {
            (Offset::Offset(gap.stored), false)
        };
        tracing::info!(projection = %self.name, partition = gap.partition, stored = gap.stored, found = gap.found, from_start, "reading the partition again");
        match sought.get_mut(&gap.partition) {
            Some(s) if again => s.from_start = true,
            _ => {
                sought.insert(
                    gap.partition,
                    Sought {
                        stored: gap.stored,
                        from_start: false,
                        strikes: 0,
                    },
                );
            }
        }
        unsought.insert(gap.partition, offset);
        self.seek_again(unsought);
    }

    /// Seeks owed on partitions still assigned here. A seek can fail while
    /// the group rebalances; one not made leaves the partition reading past
    /// its gap, and at the end of the partition no later message would
    /// show the gap again, so it is tried until it is made. A partition
    /// assigned elsewhere meanwhile is dropped: its new owner starts from
    /// the stored offset anyway.
    fn seek_again(&self, unsought: &mut HashMap<i32, Offset>) {
        if unsought.is_empty() {
            return;
        }
        let assigned = self.consumer.assignment().ok();
        unsought.retain(|&partition, offset| {
            let ours = assigned
                .as_ref()
                .is_some_and(|a| a.find_partition(&self.topic, partition).is_some());
            if !ours {
                return false;
            }
            match self
                .consumer
                .seek(&self.topic, partition, *offset, BROKER_TIMEOUT)
            {
                Ok(()) => false,
                Err(err) => {
                    tracing::warn!(projection = %self.name, partition, error = %err, "seek failed; trying again");
                    true
                }
            }
        });
    }

    /// Partitions held here whose broker holds messages past the stored
    /// offset although none came for `STALL`: read again like a gap. Some
    /// brokers (tansu) answer a fetch from inside a record batch with the
    /// next batch, and when that batch is the partition's last there is
    /// none: the partition's new owner after a rebalance, fetching from the
    /// committed offset, would wait for a message that never comes and
    /// never see the gap.
    ///
    /// A partition the broker calls read to its end is read once more from
    /// its last message, once per place it stands while assigned here
    /// (`probed`): tansu reports as the end one past the start of the last
    /// record batch, so a stored offset inside that batch looks like the
    /// end while the rest of the batch is unread. On a broker that reports
    /// the end, this reads one message, which is below the stored offset
    /// and skipped. The seeks owed are made at the top of the next round.
    async fn unstall(
        &self,
        sought: &mut HashMap<i32, Sought>,
        unsought: &mut HashMap<i32, Offset>,
        probed: &mut HashMap<i32, Probe>,
    ) {
        let rebalances = self.consumer.context().rebalances.load(Ordering::Relaxed);
        let assigned: Vec<i32> = match self.consumer.assignment() {
            Ok(list) => list
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect(),
            Err(_) => return,
        };
        if assigned.is_empty() {
            return;
        }
        let Ok(stored) = eventplane_store::kafka_offsets::list(&self.pool, &self.name).await else {
            return;
        };
        // A watermark query waits for the broker: off the runtime's
        // threads, so a broker that does not answer stalls no other task.
        let (consumer, topic, name) =
            (self.consumer.clone(), self.topic.clone(), self.name.clone());
        let highs = tokio::task::spawn_blocking(move || {
            assigned
                .into_iter()
                .filter_map(|partition| {
                    match consumer.fetch_watermarks(&topic, partition, BROKER_TIMEOUT) {
                        Ok((_, high)) => Some((partition, high)),
                        Err(err) => {
                            tracing::debug!(projection = %name, partition, error = %err, "watermarks not read");
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (partition, high) in highs {
            let next = stored
                .iter()
                .find(|p| p.partition == partition)
                .map_or(0, |p| p.next_offset);
            if high > next {
                let gap = Gap {
                    partition,
                    stored: next,
                    found: high,
                };
                self.seek(sought, unsought, &gap);
            } else if high > 0 {
                let probe = Probe { rebalances, next };
                if probed.insert(partition, probe) != Some(probe) {
                    tracing::debug!(projection = %self.name, partition, next, high, "reading an idle partition's last record batch again");
                    unsought.insert(partition, Offset::Offset(high - 1));
                }
            }
        }
    }

    /// After a partition was read again from its start: a batch that still
    /// starts past the stored offset means the offsets between are gone
    /// (retention, compaction), and it is applied from where it starts.
    fn resume(&self, sought: &mut HashMap<i32, Sought>, batch: &mut PartitionBatch) {
        let Some(first) = batch.messages.first().map(|(offset, _)| *offset) else {
            return;
        };
        match sought.get(&batch.partition) {
            // Messages fetched before the seek may still arrive: only a
            // start past the stored offset seen several times counts.
            Some(s) if s.from_start && first > s.stored && s.strikes + 1 < GONE_AFTER => {
                if let Some(s) = sought.get_mut(&batch.partition) {
                    s.strikes += 1;
                }
            }
            Some(s) if s.from_start && first > s.stored => {
                tracing::error!(projection = %self.name, partition = batch.partition, stored = s.stored, first, "the partition no longer holds the messages after the stored offset; resuming at its first message (rebuild the projection to restore what they held)");
                batch.resume_at = Some(first);
                sought.remove(&batch.partition);
            }
            Some(s) if first <= s.stored => {
                sought.remove(&batch.partition);
            }
            _ => {}
        }
    }

    /// Commits the offsets to Kafka, invalidates the rows written and
    /// reports.
    async fn after(&self, projection: &Projection, outcome: KafkaOutcome) {
        if !outcome.next_offsets.is_empty() {
            let mut offsets = TopicPartitionList::new();
            for (partition, offset) in &outcome.next_offsets {
                let _ =
                    offsets.add_partition_offset(&self.topic, *partition, Offset::Offset(*offset));
            }
            if let Err(err) = self.consumer.commit(&offsets, CommitMode::Async) {
                tracing::debug!(projection = %self.name, error = %err, "offsets not committed to Kafka");
            }
        }
        let metrics = &self.metrics;
        if outcome.events > 0 {
            metrics
                .projection_batch_size
                .get_or_create(&self.labels)
                .observe(outcome.events as f64);
            metrics
                .projection_applied
                .get_or_create(&self.labels)
                .inc_by(outcome.events as u64);
            metrics
                .projection_lag_seconds
                .get_or_create(&self.labels)
                .set(outcome.max_lag_seconds);
        }
        if outcome.dead_letters > 0 {
            metrics
                .projection_dead_letters
                .get_or_create(&self.labels)
                .inc_by(outcome.dead_letters as u64);
        }
        if outcome.duplicates > 0 {
            metrics
                .kafka_duplicates
                .get_or_create(&self.labels)
                .inc_by(outcome.duplicates as u64);
        }
        if outcome.redelivered > 0 {
            metrics
                .kafka_redelivered
                .get_or_create(&self.labels)
                .inc_by(outcome.redelivered as u64);
        }
        if let Some(invalidator) = &self.invalidator
            && !outcome.keys.is_empty()
        {
            invalidator
                .invalidate(projection.spec.version, outcome.keys)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_come_a_third_of_the_session_apart_and_at_least_every_second() {
        assert_eq!(heartbeat_ms(Duration::from_millis(1500)), "500");
        assert_eq!(heartbeat_ms(Duration::from_secs(3)), "1000");
        assert_eq!(heartbeat_ms(Duration::from_secs(10)), "1000");
    }
}
