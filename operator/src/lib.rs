//! The Eventplane operator: controllers for `Projection` and
//! `PartitionPolicy` (group `eventplane.io`, version `v1alpha1`).

pub mod crds;
