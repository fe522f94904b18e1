//! Eventplane's runtime roles over the store: the command and query HTTP
//! APIs, the projector's tailing tasks and rebuilds, the L1/L2 caches and
//! their invalidation through Redis, the command line, and the local stack
//! that runs every role in one process.

pub mod admin;
pub mod api_error;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod command;
pub mod conn;
pub mod dev;
pub mod edge;
pub mod gate;
pub mod invalidation;
pub mod metrics;
pub mod openapi;
pub mod partitions;
pub mod projections;
pub mod projector;
pub mod query;
pub mod redis_conn;
pub mod relay;
pub mod roles;
pub mod server;
pub mod traces;
