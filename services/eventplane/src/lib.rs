//! Eventplane runtime: the event store, the command, projector and query
//! roles, and the local stack that runs them all in one process.

pub mod api_error;
pub mod cli;
pub mod command;
pub mod db;
pub mod dev;
pub mod invalidation;
pub mod metrics;
pub mod partitions;
pub mod projections;
pub mod projector;
pub mod query;
pub mod rebuild;
pub mod roles;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod token;
pub mod versions;
