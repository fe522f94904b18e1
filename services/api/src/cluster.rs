//! The parts of a projection spec that only matter in a cluster: where its
//! tables live, how rebuilds run, what happens on deletion and how its read
//! path scales. `eventplane dev` and the single-role commands ignore them.

use k8s_openapi::api::core::v1::ResourceRequirements;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

fn backoff_limit() -> i32 {
    2
}

fn active_deadline_seconds() -> i64 {
    3600
}

fn retain_previous_hours() -> u32 {
    24
}

fn rebuild_batch_size() -> u32 {
    10_000
}

/// How rebuild Jobs run.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RebuildSpec {
    /// CPU and memory of the rebuild Job's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Retries of a failed rebuild Job before it is reported as failed
    /// (default 2).
    #[serde(default = "backoff_limit")]
    #[schemars(range(min = 0, max = 10))]
    pub backoff_limit: i32,
    /// Longest a rebuild Job may run, in seconds (default 3600).
    #[serde(default = "active_deadline_seconds")]
    #[schemars(range(min = 60))]
    pub active_deadline_seconds: i64,
    /// How long a replaced version is kept so it can be swapped back, in
    /// hours (default 24). Setting `version` back to a kept version swaps
    /// it back in after catching it up.
    #[serde(default = "retain_previous_hours")]
    pub retain_previous_hours: u32,
    /// Events replayed per batch (default 10000).
    #[serde(default = "rebuild_batch_size")]
    #[schemars(range(min = 100, max = 100000))]
    pub batch_size: u32,
}

impl Default for RebuildSpec {
    fn default() -> Self {
        RebuildSpec {
            resources: None,
            backoff_limit: backoff_limit(),
            active_deadline_seconds: active_deadline_seconds(),
            retain_previous_hours: retain_previous_hours(),
            batch_size: rebuild_batch_size(),
        }
    }
}

/// What happens to the projection's tables when the Projection is deleted.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReclaimPolicy {
    /// Keep the tables (the default).
    #[default]
    Retain,
    /// Drop the tables, every version, and the projection's bookkeeping.
    Delete,
}

fn min_replicas() -> i32 {
    1
}

fn max_replicas() -> i32 {
    4
}

fn target_requests_per_replica() -> u32 {
    500
}

fn target_p99_ms() -> u32 {
    50
}

fn max_lag_seconds() -> u32 {
    5
}

fn scale_down_stabilization_seconds() -> u32 {
    300
}

/// How the projection's query Deployment is scaled.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingSpec {
    /// Scale this existing Deployment (in the Projection's namespace)
    /// instead of the query Deployment the operator manages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// Replicas asked for through the scale subresource (an HPA, KEDA or
    /// `kubectl scale`). When set, it wins: the operator applies it and does
    /// not autoscale. Remove it to hand scaling back to the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Fewest replicas the operator scales to (default 1).
    #[serde(default = "min_replicas")]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,
    /// Most replicas the operator scales to (default 4).
    #[serde(default = "max_replicas")]
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// Query rate one replica should serve, per second (default 500).
    #[serde(default = "target_requests_per_replica")]
    #[schemars(range(min = 1))]
    pub target_requests_per_replica: u32,
    /// Query P99 above which the operator adds a replica, in ms (default 50).
    #[serde(default = "target_p99_ms")]
    #[schemars(range(min = 1))]
    pub target_p99_ms: u32,
    /// Projection lag above which the operator adds a replica, in seconds
    /// (default 5). Ignored while a rebuild catches up.
    #[serde(default = "max_lag_seconds")]
    pub max_lag_seconds: u32,
    /// How long a higher replica count must be wanted before scaling up, in
    /// seconds (default 0: at once).
    #[serde(default)]
    pub scale_up_stabilization_seconds: u32,
    /// How long a lower replica count must be wanted before scaling down,
    /// in seconds (default 300).
    #[serde(default = "scale_down_stabilization_seconds")]
    pub scale_down_stabilization_seconds: u32,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        ScalingSpec {
            deployment: None,
            replicas: None,
            min_replicas: min_replicas(),
            max_replicas: max_replicas(),
            target_requests_per_replica: target_requests_per_replica(),
            target_p99_ms: target_p99_ms(),
            max_lag_seconds: max_lag_seconds(),
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: scale_down_stabilization_seconds(),
        }
    }
}
