//! The outbox relay (`eventplane relay`): publishes every committed event to
//! a Kafka topic, in log order, reading with the projector's gap-safe tail
//! (below the `xid8` horizon, so an event that commits late is never
//! skipped). One replica publishes at a time, the holder of the relay's
//! lease; the others wait and take over when it expires.
//!
//! Delivery is at-least-once: the checkpoint advances only after the broker
//! acknowledged every message of a batch, so a crash or a failed batch
//! publishes some events again. Consumers drop duplicates by their place
//! in the log (transaction id and position).
//!
//! The wire format is [`wire`]'s.

pub mod lease;
pub mod wire;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use eventplane_store::batch::{self, TailEvent, events_beyond};
use eventplane_store::checkpoints::Checkpoint;
use eventplane_store::relay as store;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use lease::LeaseKeeper;

/// First wait after a failed batch; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Long enough not to hammer a broker that is down, short enough that the
/// relay catches up within seconds of its return.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Pause after a short batch: lets appends gather into one batch.
const GATHER: Duration = Duration::from_millis(5);
/// Lag is counted up to this many events: a count over a large backlog
/// would cost more than the number is worth.
const LAG_COUNT_CAP: i64 = 1_000_000;

pub use wire::{HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_POSITION, HEADER_TX_ID};

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Kafka bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    pub topic: String,
    /// The relay's row in `relays` (checkpoint and lease); replicas of one
    /// relay share it.
    pub name: String,
    /// This process, as the lease names it.
    pub holder: String,
    pub batch_size: i64,
    pub lease_ttl: Duration,
    pub poll_interval: Duration,
    /// Longest the broker may take to acknowledge a message
    /// (`message.timeout.ms`) before the batch counts as failed.
    pub delivery_timeout: Duration,
    /// Create the topic with this many partitions when it is missing (0:
    /// leave topics to the broker's administrators).
    pub create_partitions: i32,
}

/// What `/relay/status` shows.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayStatus {
    pub relay: String,
    pub topic: String,
    pub holder: String,
    pub lease_held: bool,
    pub checkpoint_tx_id: i64,
    pub checkpoint_position: i64,
    pub lag_events: i64,
    pub lag_seconds: f64,
    /// Events acknowledged by the broker since this process started.
    pub published: u64,
    /// Whether the last batch reached the broker.
    pub broker_ok: bool,
    pub last_error: Option<String>,
}

pub type SharedStatus = Arc<Mutex<RelayStatus>>;

/// A running relay; dropping it leaves the tasks running.
pub struct Relay {
    pub status: SharedStatus,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts the lease keeper, the notification listener and the
    /// publishing loop.
    pub async fn start(
        pool: PgPool,
        config: RelayConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Relay> {
        store::create(&pool, &config.name).await?;
        let producer: FutureProducer = producer_config(&config).create()?;
        let status = Arc::new(Mutex::new(RelayStatus {
            relay: config.name.clone(),
            topic: config.topic.clone(),
            holder: config.holder.clone(),
            ..Default::default()
        }));
        let (stop, stop_rx) = watch::channel(false);
        let (held_tx, held) = watch::channel(false);
        let wake = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(
            LeaseKeeper {
                pool: pool.clone(),
                relay: config.name.clone(),
                holder: config.holder.clone(),
                ttl: config.lease_ttl,
                metrics: metrics.clone(),
            }
            .run(held_tx, stop_rx.clone()),
        ));
        let notify = wake.clone();
        tasks.push(tokio::spawn(eventplane_store::db::forward_notifications(
            pool.clone(),
            "eventplane_events",
            move || notify.notify_one(),
        )));
        let publisher = Publisher {
            pool,
            config,
            producer,
            metrics,
            status: status.clone(),
            topic_ready: false,
        };
        tasks.push(tokio::spawn(publisher.run(held, wake, stop_rx)));
        Ok(Relay {
            status,
            stop,
            tasks,
        })
    }

    pub fn status(&self) -> RelayStatus {
        self.status.lock().expect("not poisoned").clone()
    }

    /// Stops after the batch in flight and gives the lease up.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        // The listener runs until aborted; the others end on the stop.
        let listener = self.tasks.remove(1);
        listener.abort();
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Ends every task at once, as a crash would: the lease stays until it
    /// expires.
    pub fn abort(self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn producer_config(config: &RelayConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        // Retries inside librdkafka neither duplicate nor reorder messages
        // of a partition; acks=all comes with it.
        .set("enable.idempotence", "true")
        .set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().max(1).to_string(),
        )
        .set("linger.ms", "2");
    client
}

/// Serves `/relay/status` beside the admin routes.
pub fn status_router(status: SharedStatus) -> Router {
    Router::new()
        .route("/relay/status", get(status_handler))
        .with_state(status)
}

async fn status_handler(State(status): State<SharedStatus>) -> Json<RelayStatus> {
    Json(status.lock().expect("not poisoned").clone())
}

struct Publisher {
    pool: PgPool,
    config: RelayConfig,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    status: SharedStatus,
    topic_ready: bool,
}

enum Step {
    /// Published and advanced; whether the batch was full.
    Advanced {
        events: usize,
        full: bool,
        at: Checkpoint,
    },
    /// The lease went to another replica before the checkpoint moved.
    LostLease,
}

impl Publisher {
    async fn run(
        mut self,
        mut held: watch::Receiver<bool>,
        wake: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = MIN_BACKOFF;
        // Read again from the row each time the lease is (re)taken: another
        // replica may have moved it meanwhile.
        let mut checkpoint: Option<Checkpoint> = None;
        while !*stop.borrow() {
            if !*held.borrow() {
                checkpoint = None;
                self.update(|s| s.lease_held = false);
                tokio::select! {
                    _ = held.changed() => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let at = match checkpoint {
                Some(at) => at,
                None => match store::get(&self.pool, &self.config.name).await {
                    Ok(Some(row)) => {
                        self.update(|s| s.lease_held = true);
                        *checkpoint.insert(row.at())
                    }
                    Ok(None) | Err(_) => {
                        tracing::warn!(relay = %self.config.name, "could not read the relay checkpoint");
                        pause(&mut stop, None, backoff).await;
                        continue;
                    }
                },
            };
            match self.step(at).await {
                Ok(Step::Advanced { events, full, at }) => {
                    backoff = MIN_BACKOFF;
                    checkpoint = Some(at);
                    self.report_lag(at).await;
                    if full {
                        continue;
                    }
                    if events > 0 {
                        pause(&mut stop, None, GATHER).await;
                        continue;
                    }
                    // Newer events may be committed behind a transaction
                    // that still runs; no notification comes when it ends.
                    if matches!(events_beyond(&self.pool, at.tx_id).await, Ok(true)) {
                        pause(&mut stop, None, GATHER).await;
                        continue;
                    }
                    pause(&mut stop, Some(&wake), self.config.poll_interval).await;
                }
                Ok(Step::LostLease) => {
                    tracing::info!(relay = %self.config.name, "lost the relay lease before the checkpoint moved");
                    checkpoint = None;
                }
                Err(err) => {
                    self.metrics.relay_publish_failures.inc();
                    tracing::warn!(relay = %self.config.name, error = %err, backoff_ms = backoff.as_millis() as u64, "relay batch failed; retrying");
                    let text = err.to_string();
                    self.update(|s| {
                        s.broker_ok = false;
                        s.last_error = Some(text);
                    });
                    self.report_lag(at).await;
                    self.renew_producer();
                    pause(&mut stop, None, backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Reads one batch after `at`, publishes it, waits for every
    /// acknowledgement, then advances the checkpoint.
    async fn step(&mut self, at: Checkpoint) -> anyhow::Result<Step> {
        let (horizon, events) = {
            let mut conn = self.pool.acquire().await?;
            let horizon = batch::horizon(&mut conn).await?;
            let events = store::read(&mut conn, at, horizon, self.config.batch_size).await?;
            (horizon, events)
        };
        if !events.is_empty() {
            self.ensure_topic().await?;
            self.publish(&events).await?;
            self.metrics.relay_published.inc_by(events.len() as u64);
        }
        let full = events.len() as i64 == self.config.batch_size;
        let next = at.after_batch(events.last().map(TailEvent::checkpoint), horizon, !full);
        let advanced = store::advance(
            &self.pool,
            &self.config.name,
            &self.config.holder,
            next,
            events.len() as i64,
            events.last().map(|e| e.recorded_at),
        )
        .await?;
        if !advanced {
            return Ok(Step::LostLease);
        }
        let count = events.len();
        self.update(|s| {
            s.broker_ok = true;
            s.last_error = None;
            s.published += count as u64;
            s.checkpoint_tx_id = next.tx_id;
            s.checkpoint_position = next.position;
        });
        Ok(Step::Advanced {
            events: count,
            full,
            at: next,
        })
    }

    async fn publish(&self, events: &[TailEvent]) -> anyhow::Result<()> {
        let values: Vec<String> = events.iter().map(wire::value).collect();
        let sends = events.iter().zip(&values).map(|(event, value)| {
            let record = FutureRecord::to(&self.config.topic)
                .key(event.stream_id.as_str())
                .payload(value.as_str())
                .headers(wire::headers(event));
            // A full local queue waits for room; the broker's answer is
            // bounded by message.timeout.ms.
            self.producer.send(record, Timeout::Never)
        });
        for result in futures::future::join_all(sends).await {
            if let Err((err, _)) = result {
                return Err(err.into());
            }
        }
        Ok(())
    }

    /// A producer whose messages timed out bumps its epoch with the
    /// broker, and some brokers answer that by fencing it for good
    /// (`ProducerFenced`): after a failed batch the retry goes through a
    /// new producer. Its new producer id restarts the idempotence
    /// sequence, which may publish the batch's events again; consumers
    /// drop them like any republished event.
    fn renew_producer(&mut self) {
        match producer_config(&self.config).create() {
            Ok(producer) => self.producer = producer,
            Err(err) => {
                tracing::warn!(relay = %self.config.name, error = %err, "producer not renewed")
            }
        }
    }

    async fn ensure_topic(&mut self) -> anyhow::Result<()> {
        if self.topic_ready || self.config.create_partitions <= 0 {
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = producer_config(&self.config).create()?;
        let topic = NewTopic::new(
            &self.config.topic,
            self.config.create_partitions,
            TopicReplication::Fixed(1),
        );
        // Without a request timeout the call waits for a broker forever.
        let options = AdminOptions::new()
            .request_timeout(Some(self.config.delivery_timeout))
            .operation_timeout(Some(self.config.delivery_timeout));
        let created = tokio::time::timeout(
            self.config.delivery_timeout * 2,
            admin.create_topics([&topic], &options),
        )
        .await
        .map_err(|_| anyhow::anyhow!("creating topic {}: timed out", self.config.topic))??;
        for result in created {
            match result {
                Ok(_) => tracing::info!(topic = %self.config.topic, "created the relay topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(KafkaError::AdminOp(code))
                        .map_err(|e| anyhow::anyhow!("creating topic {name}: {e}"));
                }
            }
        }
        self.topic_ready = true;
        Ok(())
    }

    async fn report_lag(&self, at: Checkpoint) {
        match store::lag(&self.pool, at, LAG_COUNT_CAP).await {
            Ok((events, seconds)) => {
                self.metrics.relay_lag_events.set(events);
                self.metrics.relay_lag_seconds.set(seconds);
                self.update(|s| {
                    s.lag_events = events;
                    s.lag_seconds = seconds;
                });
            }
            Err(err) => tracing::warn!(error = %err, "could not measure the relay lag"),
        }
    }

    fn update(&self, change: impl FnOnce(&mut RelayStatus)) {
        change(&mut self.status.lock().expect("not poisoned"));
    }
}

/// Waits `duration`, or less if woken (when `wake` is given) or told to
/// stop.
async fn pause(stop: &mut watch::Receiver<bool>, wake: Option<&Notify>, duration: Duration) {
    let woken = async {
        match wake {
            Some(wake) => wake.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = woken => {}
        _ = stop.changed() => {}
    }
}
