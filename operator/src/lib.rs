//! The Eventplane operator: controllers for `Projection` and
//! `PartitionPolicy` (group `eventplane.io`, version `v1alpha1`).

pub mod conditions;
pub mod context;
pub mod crds;
pub mod error;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod partitionpolicy;
pub mod projection;
pub mod run;
