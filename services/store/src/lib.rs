//! Eventplane's database layer, on Postgres: connection pools and
//! migrations, the event store and its command queue, the projection
//! catalog and version registry, the processes that follow them and their
//! leases, checkpoints and dead letters, the outbox relay's checkpoint and lease, Kafka-fed projections' offsets and batches, catch-up subscriptions' reads, the projector's batch
//! (read below the horizon, map, fold, bulk write, advance, in one
//! transaction) and the partition executor. Everything here owns a table
//! or a statement; nothing here speaks HTTP or Redis.

pub mod batch;
pub mod catalog;
pub mod checkpoints;
pub mod db;
pub mod error_body;
pub mod events;
pub mod jobs;
pub mod kafka_batch;
pub mod kafka_offsets;
pub mod leases;
pub mod partitions;
pub mod processes;
pub mod projection;
pub mod relay;
pub mod replay;
pub mod status;
pub mod subscription;
pub mod token;
pub mod versions;

pub use error_body::ErrorBody;
pub use projection::{Projection, version_table};
pub use token::Token;
