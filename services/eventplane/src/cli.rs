//! Command-line and environment configuration: one `Args` struct per role,
//! every flag also readable from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use eventplane_store::events::GroupCommitConfig;

use crate::auth::AuthConfig;
use crate::command::CommandConfig;
use crate::projector::ProjectorConfig;
use crate::query::QueryConfig;

#[derive(Parser, Debug)]
#[command(
    name = "eventplane",
    version = eventplane_telemetry::VERSION,
    about = "Kubernetes-native CQRS / event-sourcing runtime"
)]
pub struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, env = "EVENTPLANE_LOG_JSON", global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply database migrations and create this and next month's event partitions.
    Migrate(DbArgs),
    /// Run the command service (appends, stream reads, async jobs).
    Command(CommandRole),
    /// Run the projector (events to read-model tables).
    Projector(ProjectorRole),
    /// Run the query service (cached projection reads).
    Query(QueryRole),
    /// Publish committed events to a Kafka topic (the outbox relay).
    Relay(RelayRole),
    /// Run every role in one process against local Postgres and Redis.
    Dev(DevRole),
    /// Build a projection's new version from the event log and swap it in.
    Rebuild(RebuildArgs),
    /// Plan or apply PartitionPolicy manifests against a database.
    Partitions(PartitionsArgs),
    /// Declare, list and remove projections in a database's catalog.
    Projections(ProjectionsArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DbArgs {
    /// Postgres URL of the primary (writes, projector).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Connections in the primary pool.
    #[arg(long, env = "EVENTPLANE_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Longest a request waits for a free database connection, in
    /// milliseconds (503 beyond).
    #[arg(long, env = "EVENTPLANE_DB_ACQUIRE_TIMEOUT_MS", default_value_t = 2000)]
    pub db_acquire_timeout_ms: u64,
}

impl DbArgs {
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.db_acquire_timeout_ms.max(1))
    }
}

#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    /// Redis URL for L2 and invalidations; without it the query service
    /// answers from Postgres only.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct CatalogArgs {
    /// Projection manifests (a file, or a directory of *.yaml) to declare
    /// in the catalog at start, as `eventplane projections apply` would;
    /// the process then serves everything the catalog holds.
    #[arg(long, env = "EVENTPLANE_PROJECTIONS")]
    pub projections: Option<PathBuf>,
    /// Longest, in milliseconds, a missed catalog notification can leave
    /// this process behind (it re-reads the catalog's generation this often).
    #[arg(long, env = "EVENTPLANE_CATALOG_RESYNC_MS", default_value_t = 2000)]
    pub catalog_resync_ms: u64,
}

impl CatalogArgs {
    pub fn resync(&self) -> Duration {
        Duration::from_millis(self.catalog_resync_ms.max(10))
    }
}

#[derive(Args, Debug, Clone)]
pub struct ListenArgs {
    /// Address the HTTP API listens on.
    #[arg(long, env = "EVENTPLANE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address of `/metrics`, `/healthz` and `/readyz` (no token needed).
    #[arg(long, env = "EVENTPLANE_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
}

#[derive(Args, Debug, Clone)]
pub struct AuthArgs {
    /// A JWKS file (`{"keys": [...]}`, in a cluster mounted from a
    /// Secret): every API request then needs a bearer JWT signed by one of
    /// its keys. Without it the API is open.
    #[arg(long, env = "EVENTPLANE_AUTH_JWKS")]
    pub auth_jwks: Option<PathBuf>,
    /// The `iss` a token must carry.
    #[arg(long, env = "EVENTPLANE_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
    /// The `aud` a token must carry.
    #[arg(long, env = "EVENTPLANE_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[arg(long, env = "EVENTPLANE_AUTH_LEEWAY_SECONDS", default_value_t = 30)]
    pub auth_leeway_seconds: u64,
}

impl AuthArgs {
    pub fn config(&self) -> Option<AuthConfig> {
        self.auth_jwks.as_ref().map(|jwks| AuthConfig {
            jwks: jwks.clone(),
            issuer: self.auth_issuer.clone(),
            audience: self.auth_audience.clone(),
            leeway: Duration::from_secs(self.auth_leeway_seconds),
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct CommandArgs {
    /// Largest accepted request body, in bytes (413 beyond).
    #[arg(long, env = "EVENTPLANE_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Group-commit transactions in flight at once.
    #[arg(long, env = "EVENTPLANE_APPEND_WRITERS", default_value_t = 4)]
    pub append_writers: usize,
    /// Most appends per group-commit transaction.
    #[arg(long, env = "EVENTPLANE_APPEND_MAX_BATCH", default_value_t = 256)]
    pub append_max_batch: usize,
    /// Microseconds a committer waits for more appends before committing a
    /// small batch (0: commit at once).
    #[arg(long, env = "EVENTPLANE_APPEND_MAX_WAIT_US", default_value_t = 0)]
    pub append_max_wait_us: u64,
    /// Async command workers.
    #[arg(long, env = "EVENTPLANE_JOB_WORKERS", default_value_t = 2)]
    pub job_workers: usize,
    /// Longest an append may take, in milliseconds: queued, waiting for a
    /// lock and writing; past it the answer is 503 and nothing is written.
    #[arg(long, env = "EVENTPLANE_APPEND_TIMEOUT_MS", default_value_t = 5000)]
    pub append_timeout_ms: u64,
}

impl CommandArgs {
    pub fn config(&self) -> CommandConfig {
        CommandConfig {
            max_body_bytes: self.max_body_bytes,
            group_commit: GroupCommitConfig {
                writers: self.append_writers,
                max_batch: self.append_max_batch,
                max_wait: Duration::from_micros(self.append_max_wait_us),
                deadline: Duration::from_millis(self.append_timeout_ms.max(1)),
                ..GroupCommitConfig::default()
            },
            job_workers: self.job_workers,
            append_timeout: Duration::from_millis(self.append_timeout_ms.max(1)),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ProjectorArgs {
    /// Most events per projector batch.
    #[arg(long, env = "EVENTPLANE_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: i64,
    /// Poll interval in milliseconds when no notification arrives.
    #[arg(long, env = "EVENTPLANE_POLL_INTERVAL_MS", default_value_t = 500)]
    pub poll_interval_ms: u64,
    /// Leave version changes to rebuild Jobs (the operator sets this);
    /// otherwise the projector rebuilds in the background itself.
    #[arg(long, env = "EVENTPLANE_NO_REBUILD")]
    pub no_rebuild: bool,
    /// How long a projection lease lasts unrenewed, in milliseconds: the
    /// longest a projection waits for another projector after its holder
    /// died or lost the database.
    #[arg(long, env = "EVENTPLANE_LEASE_TTL_MS", default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
}

impl ProjectorArgs {
    pub fn config(&self) -> ProjectorConfig {
        ProjectorConfig {
            batch_size: self.batch_size.max(1),
            poll_interval: Duration::from_millis(self.poll_interval_ms.max(1)),
            rebuild_in_process: !self.no_rebuild,
            lease_ttl: Duration::from_millis(self.lease_ttl_ms.max(100)),
            kafka: None,
        }
    }
}

/// `eventplane rebuild`: what a rebuild Job runs.
#[derive(Args, Debug, Clone)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Redis URL, to invalidate the projection's caches after the swap.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// The Projection manifest (YAML or JSON) whose `spec.version` to build.
    #[arg(long, env = "EVENTPLANE_PROJECTION_FILE", conflicts_with = "manifest")]
    pub projection: Option<PathBuf>,
    /// The manifest itself, as text (how the operator hands it to a Job).
    #[arg(long, env = "EVENTPLANE_PROJECTION_MANIFEST")]
    pub manifest: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct QueryArgs {
    /// Postgres URL reads go to (a replica is fine); defaults to --database-url.
    #[arg(long, env = "READ_DATABASE_URL")]
    pub read_database_url: Option<String>,
    /// Connections in the read pool.
    #[arg(long, env = "EVENTPLANE_READ_MAX_CONNECTIONS", default_value_t = 16)]
    pub read_max_connections: u32,
    /// L1 (in-process) cache capacity per projection, in bytes.
    #[arg(long, env = "EVENTPLANE_L1_CAPACITY_BYTES", default_value_t = 64 << 20)]
    pub l1_capacity_bytes: u64,
    /// Longest a read with `?token=` waits for the projection, in milliseconds (504 beyond).
    #[arg(
        long,
        env = "EVENTPLANE_CONSISTENCY_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub consistency_timeout_ms: u64,
    /// Reads at least this slow, in milliseconds, are counted
    /// (`slow_queries_total`) and logged with their plan.
    #[arg(long, env = "EVENTPLANE_SLOW_QUERY_MS", default_value_t = 100)]
    pub slow_query_ms: u64,
    /// Longest one read may run, in milliseconds (503 beyond).
    #[arg(long, env = "EVENTPLANE_READ_TIMEOUT_MS", default_value_t = 5000)]
    pub read_timeout_ms: u64,
    /// With --read-database-url: read from the primary while the read
    /// database is unreachable or further behind than --replica-max-lag-ms
    /// (counted in `replica_fallback_reads_total`). Off by default: the
    /// primary then never takes reads meant for the replica.
    #[arg(long, env = "EVENTPLANE_READ_FALLBACK_TO_PRIMARY")]
    pub read_fallback_to_primary: bool,
    /// Apply lag, in milliseconds, past which a replica counts as behind.
    #[arg(long, env = "EVENTPLANE_REPLICA_MAX_LAG_MS", default_value_t = 10_000)]
    pub replica_max_lag_ms: u64,
    /// Subscriptions: an SSE comment (`: heartbeat`) this often, in
    /// milliseconds, while no event goes out.
    #[arg(
        long,
        env = "EVENTPLANE_SUBSCRIPTION_HEARTBEAT_MS",
        default_value_t = 15_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub subscription_heartbeat_ms: u64,
    /// Subscribers one process streams to at once (503 beyond).
    #[arg(long, env = "EVENTPLANE_MAX_SUBSCRIBERS", default_value_t = 256)]
    pub max_subscribers: usize,
    /// Events buffered per subscriber, at most.
    #[arg(
        long,
        env = "EVENTPLANE_SUBSCRIPTION_BUFFER",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(1..=1_000_000)
    )]
    pub subscription_buffer: u64,
    /// A subscriber whose buffer has had no room for a page this long, in
    /// milliseconds, is cut off (`slow_consumer`).
    #[arg(
        long,
        env = "EVENTPLANE_SUBSCRIPTION_STALL_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub subscription_stall_timeout_ms: u64,
}

impl QueryArgs {
    pub fn config(&self) -> QueryConfig {
        QueryConfig {
            l1_capacity_bytes: self.l1_capacity_bytes,
            consistency_timeout: Duration::from_millis(self.consistency_timeout_ms),
            slow_query: Duration::from_millis(self.slow_query_ms),
            read_timeout: Duration::from_millis(self.read_timeout_ms.max(1)),
            replica: crate::query::replica::ReplicaConfig {
                fallback: self.read_fallback_to_primary,
                max_lag: Duration::from_millis(self.replica_max_lag_ms),
            },
            subscriptions: crate::query::subscriptions::SubscriptionConfig {
                heartbeat: Duration::from_millis(self.subscription_heartbeat_ms),
                max_subscribers: self.max_subscribers,
                buffer: self.subscription_buffer as usize,
                stall_timeout: Duration::from_millis(self.subscription_stall_timeout_ms),
            },
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct CommandRole {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub listen: ListenArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub command: CommandArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ProjectorRole {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub catalog: CatalogArgs,
    #[command(flatten)]
    pub listen: ListenArgs,
    #[command(flatten)]
    pub projector: ProjectorArgs,
    #[command(flatten)]
    pub source: SourceArgs,
}

/// Where the projector reads events from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Tail the Postgres log (every projector does, for the projections
    /// that declare `transport.kind: postgres`).
    Postgres,
    /// Also consume the Kafka-fed projections from the relay's topic.
    Kafka,
}

#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// `kafka`: besides its share of the Postgres-fed projections, this
    /// process joins the consumer group of every Kafka-fed projection.
    #[arg(long, env = "EVENTPLANE_SOURCE", value_enum, default_value_t = Source::Postgres)]
    pub source: Source,
    /// Kafka bootstrap servers, `host:port[,host:port…]` (with `--source
    /// kafka`).
    #[arg(long, env = "KAFKA_BROKERS", required_if_eq("source", "kafka"))]
    pub brokers: Option<String>,
    /// Consumer groups are named `<prefix>.<projection>`.
    #[arg(long, env = "EVENTPLANE_GROUP_PREFIX", default_value = "eventplane")]
    pub group_prefix: String,
    /// How long the group waits for a silent replica before moving its
    /// partitions to the others, in milliseconds.
    #[arg(
        long,
        env = "EVENTPLANE_KAFKA_SESSION_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub session_timeout_ms: u64,
}

impl SourceArgs {
    pub fn kafka(&self) -> Option<crate::projector::kafka::KafkaSource> {
        match (self.source, &self.brokers) {
            (Source::Kafka, Some(brokers)) => Some(crate::projector::kafka::KafkaSource {
                brokers: brokers.clone(),
                group_prefix: self.group_prefix.clone(),
                session_timeout: Duration::from_millis(self.session_timeout_ms.max(1000)),
            }),
            _ => None,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct QueryRole {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub catalog: CatalogArgs,
    #[command(flatten)]
    pub listen: ListenArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub query: QueryArgs,
}

/// `eventplane relay`: one replica publishes at a time (the lease
/// holder); start several for failover.
#[derive(Args, Debug, Clone)]
pub struct RelayRole {
    #[command(flatten)]
    pub db: DbArgs,
    /// Kafka bootstrap servers, `host:port[,host:port…]`.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub brokers: String,
    /// Topic the events are published to.
    #[arg(
        long,
        env = "EVENTPLANE_RELAY_TOPIC",
        default_value = eventplane_api::transport::DEFAULT_TOPIC
    )]
    pub topic: String,
    /// The relay's checkpoint and lease (replicas of one relay share it);
    /// defaults to the topic.
    #[arg(long, env = "EVENTPLANE_RELAY_NAME")]
    pub relay_name: Option<String>,
    /// Most events per published batch.
    #[arg(long, env = "EVENTPLANE_RELAY_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: i64,
    /// How long the lease lasts unrenewed, in milliseconds: the longest
    /// publishing pauses after the holder died.
    #[arg(long, env = "EVENTPLANE_RELAY_LEASE_TTL_MS", default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
    /// Poll interval in milliseconds when no notification arrives.
    #[arg(long, env = "EVENTPLANE_RELAY_POLL_INTERVAL_MS", default_value_t = 500)]
    pub poll_interval_ms: u64,
    /// Longest the broker may take to acknowledge a message, in
    /// milliseconds, before the batch is retried.
    #[arg(
        long,
        env = "EVENTPLANE_RELAY_DELIVERY_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub delivery_timeout_ms: u64,
    /// Create the topic with this many partitions when missing (0: never).
    #[arg(long, env = "EVENTPLANE_RELAY_TOPIC_PARTITIONS", default_value_t = 0)]
    pub topic_partitions: i32,
    /// Address of `/metrics`, `/healthz`, `/readyz` and `/relay/status`.
    #[arg(long, env = "EVENTPLANE_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
}

impl RelayRole {
    pub fn config(&self) -> crate::relay::RelayConfig {
        crate::relay::RelayConfig {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            name: self
                .relay_name
                .clone()
                .unwrap_or_else(|| self.topic.clone()),
            holder: format!("{}-{}", crate::catalog::member_name(), std::process::id()),
            batch_size: self.batch_size.max(1),
            lease_ttl: Duration::from_millis(self.lease_ttl_ms.max(300)),
            poll_interval: Duration::from_millis(self.poll_interval_ms.max(1)),
            delivery_timeout: Duration::from_millis(self.delivery_timeout_ms.max(1)),
            create_partitions: self.topic_partitions,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct DevRole {
    #[command(flatten)]
    pub db: DbArgs,
    /// Redis URL for L2 and invalidations.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Projection manifests to declare at start; without them the bundled
    /// `orders` sample is declared.
    #[command(flatten)]
    pub catalog: CatalogArgs,
    /// Address the HTTP API listens on.
    #[arg(long, env = "EVENTPLANE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(
        long,
        env = "EVENTPLANE_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_listen: SocketAddr,
    /// Bearer tokens are off unless a JWKS is given.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Orders the start-up demo places (0: no demo).
    #[arg(long, env = "EVENTPLANE_DEMO_ORDERS", default_value_t = 2000)]
    pub demo_orders: usize,
    /// Concurrent clients of the demo.
    #[arg(long, env = "EVENTPLANE_DEMO_CLIENTS", default_value_t = 32)]
    pub demo_clients: usize,
    /// Stop after the demo instead of serving.
    #[arg(long)]
    pub exit_after_demo: bool,
    #[command(flatten)]
    pub command: CommandArgs,
    #[command(flatten)]
    pub projector: ProjectorArgs,
    #[command(flatten)]
    pub query: QueryArgs,
}

#[derive(Args, Debug, Clone)]
pub struct PartitionsArgs {
    #[command(subcommand)]
    pub command: PartitionsCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum PartitionsCommand {
    /// Show what `apply` would change, without changing anything.
    Plan(PartitionsRun),
    /// Create, move, detach and drop partitions as the policies say.
    Apply(PartitionsRun),
}

#[derive(Args, Debug, Clone)]
pub struct PartitionsRun {
    /// PartitionPolicy manifest file; several policies may be separated by `---`.
    #[arg(long, env = "EVENTPLANE_PARTITION_POLICY")]
    pub policy: PathBuf,
    #[command(flatten)]
    pub db: DbArgs,
    /// Plan as of this instant (RFC 3339) instead of the current time.
    #[arg(long, env = "EVENTPLANE_PARTITIONS_NOW", value_parser = parse_instant)]
    pub now: Option<chrono::DateTime<chrono::Utc>>,
    /// Print the report as JSON.
    #[arg(long, env = "EVENTPLANE_PARTITIONS_JSON")]
    pub json: bool,
    /// Longest a DDL statement waits for a lock before it is retried, in milliseconds.
    #[arg(
        long,
        env = "EVENTPLANE_PARTITIONS_LOCK_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub lock_timeout_ms: u64,
}

fn parse_instant(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 timestamp: {e}"))
}

#[derive(Args, Debug, Clone)]
pub struct ProjectionsArgs {
    #[command(subcommand)]
    pub command: ProjectionsCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum ProjectionsCommand {
    /// Declare the projections of a manifest file or a directory of them;
    /// running services pick them up without a restart.
    Apply {
        /// A Projection manifest (YAML, several separated by `---`), or a
        /// directory of *.yaml files.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List declared projections, or show one.
    Get {
        name: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List a projection's dead letters (events it could not apply), oldest
    /// first.
    DeadLetters {
        name: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Apply a projection's dead letters with its current spec (after it
    /// was fixed), in log order; those that still fail stay.
    Replay {
        name: String,
        /// At most this many in one run.
        #[arg(long, default_value_t = 10_000)]
        limit: i64,
        /// Redis URL, to drop the projection's cached entries afterwards.
        #[arg(long, env = "REDIS_URL")]
        redis_url: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Stop serving a projection; its tables stay unless --drop-tables.
    Delete {
        name: String,
        /// Also drop its view, every version's table, checkpoints and dead letters.
        #[arg(long)]
        drop_tables: bool,
        #[command(flatten)]
        db: DbArgs,
    },
}
