//! Prometheus metrics shared by every role, served at `/metrics`. Names and
//! labels follow the seed: `command_latency{command_type}`,
//! `query_latency{query_type}`, `cache_hit_rate{cache_layer}`; plus projection
//! lag, batch sizes and pool usage. Label values come from fixed sets or from
//! validated names (projections, event types), never from error text.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use eventplane_telemetry::metrics::Registrar;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub command_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    pub query_type: &'static str,
}

/// The values of `command_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandType {
    Append,
    AppendAsync,
    ReadStream,
}

impl CommandType {
    pub const fn as_str(self) -> &'static str {
        match self {
            CommandType::Append => "append",
            CommandType::AppendAsync => "append_async",
            CommandType::ReadStream => "read_stream",
        }
    }
}

/// The values of `query_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryType {
    Row,
    List,
}

impl QueryType {
    pub const fn as_str(self) -> &'static str {
        match self {
            QueryType::Row => "row",
            QueryType::List => "list",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache_layer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    pub projection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: &'static str,
    pub state: &'static str,
}

/// Hit and miss counts of one cache layer; the hit-rate gauge is derived
/// from them at scrape time so it is never stale.
#[derive(Default)]
pub struct LayerCounts {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl LayerCounts {
    pub fn record(&self, hit: bool) {
        let counter = if hit { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rate(&self) -> f64 {
        let hits = self.hits.load(Ordering::Relaxed) as f64;
        let total = hits + self.misses.load(Ordering::Relaxed) as f64;
        if total == 0.0 { 0.0 } else { hits / total }
    }
}

pub const CACHE_LAYERS: [&str; 3] = ["l1", "l2", "l3"];

pub struct Metrics {
    registry: Registry,
    /// Every series name this registry exports.
    pub series: Vec<String>,
    pub command_latency: Family<CommandLabels, Histogram>,
    pub commands_total: Family<CommandLabels, Counter>,
    pub command_batch_size: Histogram,
    pub query_latency: Family<QueryLabels, Histogram>,
    /// `query_latency`'s series by [`QueryType`], and `command_latency`'s
    /// and `commands_total`'s by [`CommandType`], each looked up in its
    /// family's map once and kept: every request observes one, and the
    /// map's lock would otherwise be taken by all of them, on every core.
    query_series: [OnceLock<Histogram>; 2],
    command_series: [OnceLock<(Histogram, Counter)>; 3],
    pub slow_queries: Family<QueryLabels, Counter>,
    pub cache_hit_rate: Family<CacheLabels, Gauge<f64, AtomicU64>>,
    /// l1, l2, l3 in that order.
    pub cache_counts: [LayerCounts; 3],
    pub redis_errors: Counter,
    pub projection_lag_seconds: Family<ProjectionLabels, Gauge<f64, AtomicU64>>,
    pub projection_lag_events: Family<ProjectionLabels, Gauge>,
    pub projection_batch_size: Family<ProjectionLabels, Histogram>,
    pub projection_applied: Family<ProjectionLabels, Counter>,
    pub projection_dead_letters: Family<ProjectionLabels, Counter>,
    pub horizon_age_seconds: Gauge<f64, AtomicU64>,
    /// 1 while this process holds the projection's lease and applies it.
    pub projection_lease_held: Family<ProjectionLabels, Gauge>,
    /// 1 while the projection (`onError: halt`) stopped on an event this
    /// process could not apply.
    pub projection_halted: Family<ProjectionLabels, Gauge>,
    /// The catalog generation this process serves.
    pub catalog_generation: Gauge,
    pub pool_connections: Family<PoolLabels, Gauge>,
    pub jobs_processed: Counter,
    pub replica_lag_seconds: Gauge<f64, AtomicU64>,
    pub replica_up: Gauge,
    pub replica_fallback_reads: Counter,
    pub replica_read_retries: Counter,
    /// Events committed but not yet acknowledged by the broker.
    pub relay_lag_events: Gauge,
    /// Age of the oldest event not yet acknowledged by the broker.
    pub relay_lag_seconds: Gauge<f64, AtomicU64>,
    pub relay_published: Counter,
    /// 1 while this process holds the relay's lease and publishes.
    pub relay_lease_held: Gauge,
    pub relay_publish_failures: Counter,
    /// Kafka partitions of each Kafka-fed projection this process holds.
    pub kafka_partitions_assigned: Family<ProjectionLabels, Gauge>,
    /// Messages skipped because the relay had published them before.
    pub kafka_duplicates: Family<ProjectionLabels, Counter>,
    /// Messages skipped because Kafka had delivered them before.
    pub kafka_redelivered: Family<ProjectionLabels, Counter>,
    /// Messages that name no event (neither value nor headers decode).
    pub kafka_undecodable: Family<ProjectionLabels, Counter>,
    /// Catch-up subscriptions streaming from this process now.
    pub subscribers: Gauge,
    /// Events handed to subscribers' connections.
    pub subscription_events_sent: Counter,
    /// Subscribers cut off for not reading (`slow_consumer`).
    pub subscribers_cut_off: Counter,
    /// Pools whose usage is read at scrape time.
    pools: std::sync::Mutex<Vec<(&'static str, sqlx::PgPool)>>,
}

fn latency_buckets() -> Histogram {
    // 100 µs .. ~3.3 s: the targets sit between 1 ms and 100 ms.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

fn size_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 14))
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registrar::new(None);
        let m = Metrics {
            command_latency: Family::new_with_constructor(latency_buckets),
            commands_total: Family::default(),
            command_batch_size: size_buckets(),
            query_latency: Family::new_with_constructor(latency_buckets),
            query_series: Default::default(),
            command_series: Default::default(),
            slow_queries: Family::default(),
            cache_hit_rate: Family::default(),
            cache_counts: Default::default(),
            redis_errors: Counter::default(),
            projection_lag_seconds: Family::default(),
            projection_lag_events: Family::default(),
            projection_batch_size: Family::new_with_constructor(size_buckets),
            projection_applied: Family::default(),
            projection_dead_letters: Family::default(),
            horizon_age_seconds: Gauge::default(),
            projection_lease_held: Family::default(),
            projection_halted: Family::default(),
            catalog_generation: Gauge::default(),
            pool_connections: Family::default(),
            jobs_processed: Counter::default(),
            replica_lag_seconds: Gauge::default(),
            replica_up: Gauge::default(),
            replica_fallback_reads: Counter::default(),
            replica_read_retries: Counter::default(),
            relay_lag_events: Gauge::default(),
            relay_lag_seconds: Gauge::default(),
            relay_published: Counter::default(),
            relay_lease_held: Gauge::default(),
            relay_publish_failures: Counter::default(),
            kafka_partitions_assigned: Family::default(),
            kafka_duplicates: Family::default(),
            kafka_redelivered: Family::default(),
            kafka_undecodable: Family::default(),
            subscribers: Gauge::default(),
            subscription_events_sent: Counter::default(),
            subscribers_cut_off: Counter::default(),
            pools: Default::default(),
            registry: Registry::default(),
            series: Vec::new(),
        };
        registry.register(
            "replica_lag_seconds",
            "How far the read replica's applied state trails what it received",
            m.replica_lag_seconds.clone(),
        );
        registry.register(
            "replica_up",
            "1 while the read database answers its probe",
            m.replica_up.clone(),
        );
        registry.register(
            "replica_fallback_reads",
            "Reads sent to the primary because the replica was down or behind",
            m.replica_fallback_reads.clone(),
        );
        registry.register(
            "replica_read_retries",
            "Reads run again after a replica cancelled them to replay WAL",
            m.replica_read_retries.clone(),
        );
        registry.register(
            "command_latency",
            "Command handling latency in seconds",
            m.command_latency.clone(),
        );
        registry.register(
            "commands",
            "Commands handled, by type",
            m.commands_total.clone(),
        );
        registry.register(
            "command_batch_size",
            "Appends committed per group-commit transaction",
            m.command_batch_size.clone(),
        );
        registry.register(
            "query_latency",
            "Query latency in seconds",
            m.query_latency.clone(),
        );
        registry.register(
            "slow_queries",
            "Reads at or above the slow-query threshold (logged with their plan)",
            m.slow_queries.clone(),
        );
        registry.register(
            "cache_hit_rate",
            "Share of lookups answered by each cache layer",
            m.cache_hit_rate.clone(),
        );
        registry.register(
            "redis_errors",
            "Redis operations that failed (the read path fell back)",
            m.redis_errors.clone(),
        );
        registry.register(
            "projection_lag_seconds",
            "Age of the newest event not yet applied",
            m.projection_lag_seconds.clone(),
        );
        registry.register(
            "projection_lag_events",
            "Events committed but not yet applied",
            m.projection_lag_events.clone(),
        );
        registry.register(
            "projection_batch_size",
            "Events per projector batch",
            m.projection_batch_size.clone(),
        );
        registry.register(
            "projection_events_applied",
            "Events applied to projections",
            m.projection_applied.clone(),
        );
        registry.register(
            "projection_dead_letters",
            "Events sent to the dead-letter table",
            m.projection_dead_letters.clone(),
        );
        registry.register(
            "event_horizon_age_seconds",
            "Age of the oldest running transaction holding back the tail horizon",
            m.horizon_age_seconds.clone(),
        );
        registry.register(
            "projection_lease_held",
            "1 while this process holds the projection's lease and applies it",
            m.projection_lease_held.clone(),
        );
        registry.register(
            "projection_halted",
            "1 while the projection is halted on an event it cannot apply",
            m.projection_halted.clone(),
        );
        registry.register(
            "catalog_generation",
            "Projection catalog generation this process has loaded",
            m.catalog_generation.clone(),
        );
        registry.register(
            "db_pool_connections",
            "Database pool connections by state",
            m.pool_connections.clone(),
        );
        registry.register(
            "command_jobs_processed",
            "Async command jobs finished",
            m.jobs_processed.clone(),
        );
        registry.register(
            "relay_lag_events",
            "Events committed but not yet acknowledged by the broker",
            m.relay_lag_events.clone(),
        );
        registry.register(
            "relay_lag_seconds",
            "Age of the oldest event not yet acknowledged by the broker",
            m.relay_lag_seconds.clone(),
        );
        registry.register(
            "relay_published",
            "Events the broker acknowledged (a retried batch counts again)",
            m.relay_published.clone(),
        );
        registry.register(
            "relay_lease_held",
            "1 while this process holds the relay's lease and publishes",
            m.relay_lease_held.clone(),
        );
        registry.register(
            "relay_publish_failures",
            "Batches the broker did not acknowledge (retried with backoff)",
            m.relay_publish_failures.clone(),
        );
        registry.register(
            "kafka_partitions_assigned",
            "Partitions of a Kafka-fed projection's topic this process consumes",
            m.kafka_partitions_assigned.clone(),
        );
        registry.register(
            "kafka_duplicates",
            "Messages dropped because the relay had published the event before",
            m.kafka_duplicates.clone(),
        );
        registry.register(
            "kafka_redelivered",
            "Messages dropped because Kafka had delivered them before",
            m.kafka_redelivered.clone(),
        );
        registry.register(
            "kafka_undecodable",
            "Messages skipped because neither their value nor their headers name an event",
            m.kafka_undecodable.clone(),
        );
        registry.register(
            "subscribers",
            "Catch-up subscriptions streaming from this process",
            m.subscribers.clone(),
        );
        registry.register(
            "subscription_events_sent",
            "Events handed to subscribers' connections",
            m.subscription_events_sent.clone(),
        );
        registry.register(
            "subscribers_cut_off",
            "Subscribers cut off because they stopped reading (slow_consumer)",
            m.subscribers_cut_off.clone(),
        );
        let (registry, series) = registry.finish();
        Arc::new(Metrics {
            registry,
            series,
            ..m
        })
    }

    pub fn observe_command(&self, command_type: CommandType, seconds: f64) {
        let (latency, total) = self.command_series[command_type as usize].get_or_init(|| {
            let labels = CommandLabels {
                command_type: command_type.as_str(),
            };
            (
                self.command_latency.get_or_create(&labels).clone(),
                self.commands_total.get_or_create(&labels).clone(),
            )
        });
        latency.observe(seconds);
        total.inc();
    }

    pub fn observe_query(&self, query_type: QueryType, seconds: f64) {
        self.query_series[query_type as usize]
            .get_or_init(|| {
                let labels = QueryLabels {
                    query_type: query_type.as_str(),
                };
                self.query_latency.get_or_create(&labels).clone()
            })
            .observe(seconds);
    }

    /// Reports `pool`'s idle and busy connections under `name` at every
    /// scrape.
    pub fn watch_pool(&self, name: &'static str, pool: &sqlx::PgPool) {
        self.pools
            .lock()
            .expect("not poisoned")
            .push((name, pool.clone()));
    }

    pub fn encode(&self) -> String {
        for (name, pool) in self.pools.lock().expect("not poisoned").iter() {
            let idle = pool.num_idle() as i64;
            let size = i64::from(pool.size());
            let gauge = |state| {
                self.pool_connections
                    .get_or_create(&PoolLabels { pool: name, state })
            };
            gauge("idle").set(idle);
            gauge("busy").set(size - idle);
        }
        for (layer, counts) in CACHE_LAYERS.iter().zip(&self.cache_counts) {
            self.cache_hit_rate
                .get_or_create(&CacheLabels { cache_layer: layer })
                .set(counts.rate());
        }
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}
