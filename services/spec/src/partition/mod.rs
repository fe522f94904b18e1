//! `PartitionPolicy`: the spec of a time-partitioned table and the pure
//! planner that turns it and the observed catalog into DDL steps.

pub mod planner;
pub mod types;
