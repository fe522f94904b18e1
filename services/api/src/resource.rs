//! Status types of the custom resources. They are written by the operator
//! only; field docs are what `kubectl explain` shows.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a projection stands in its life cycle.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, nothing built yet.
    Pending,
    /// A rebuild Job is loading a new table version from the event log.
    Building,
    /// The new version is loaded and catching up with the live log.
    CatchingUp,
    /// The new version is being swapped in.
    Swapping,
    /// The active version is current and serving.
    Ready,
    /// The last rebuild failed; the previous version keeps serving.
    Failed,
}

/// Progress of a rebuild.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BuildProgress {
    /// Version being built.
    pub version: u32,
    /// Table the version is built into.
    pub table: String,
    /// Name of the rebuild Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Events replayed so far.
    #[serde(default)]
    pub events_done: i64,
    /// Events to replay in all.
    #[serde(default)]
    pub events_total: i64,
    /// Estimated seconds until the load is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
}

/// A version kept after a swap so it can be swapped back.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RetainedVersion {
    pub version: u32,
    pub table: String,
    /// When the version stopped serving (RFC 3339).
    pub retired_at: String,
}

/// A declared list query checked with EXPLAIN against the live table.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct QueryCheck {
    pub name: String,
    /// True when the plan reads the whole table (a sequential scan).
    pub full_scan: bool,
    /// The planner's total cost estimate.
    pub cost: f64,
    /// The top plan node, e.g. "Index Scan using orders_by_status_customer".
    pub plan: String,
}

/// Observed state of a Projection.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The version serving reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_version: Option<u32>,
    /// The table behind the stable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_table: Option<String>,
    /// The rebuild in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub building: Option<BuildProgress>,
    /// Versions kept for swapping back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retained: Vec<RetainedVersion>,
    /// Seconds the projection is behind the event log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Events committed but not yet applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_events: Option<i64>,
    /// Replicas of the query Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Label selector of the query pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Each declared list query checked against the live table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queries: Vec<QueryCheck>,
    /// The catalog generation of this projection's declaration in its
    /// database: a process that has loaded it (or a later one) serves
    /// this spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_generation: Option<i64>,
    /// The running Eventplane processes of the database, by role, and how
    /// many of them have loaded this declaration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub served_by: Vec<RoleServing>,
    /// `servedBy` in short, e.g. `query 2/2, projector 1/1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<String>,
    /// Ready, Reconciling, Stalled and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// How far a declaration has reached the processes of one role.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RoleServing {
    /// `query` or `projector`.
    pub role: String,
    /// Processes of the role that have loaded the declaration.
    pub loaded: u32,
    /// Processes of the role running (heartbeat within the last 30 s).
    pub running: u32,
}

impl RoleServing {
    /// `query 2/2, projector 1/1`.
    pub fn summary(all: &[RoleServing]) -> String {
        all.iter()
            .map(|r| format!("{} {}/{}", r.role, r.loaded, r.running))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One partition as the operator last saw it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PartitionInfo {
    pub name: String,
    /// Lower bound, inclusive (RFC 3339); absent for the default partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Upper bound, exclusive (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Planner's estimate of the rows in the partition.
    pub row_estimate: i64,
}

/// Observed state of a PartitionPolicy.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PartitionPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Partitions attached to the table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionInfo>,
    /// Retired partitions moved into the archive schema (`schema.name`) and
    /// still there; with their bounds, read from the table's comment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub archived: Vec<PartitionInfo>,
    /// Upper bound of the newest partition (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub premade_until: Option<String>,
    /// Lower bound of the oldest partition kept (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_kept: Option<String>,
    /// When the operator looks again at the latest (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_maintenance: Option<String>,
    /// The steps of the last run, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_plan: Vec<String>,
    /// Under dryRun: the steps a run would take, retention included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run_plan: Vec<String>,
    /// Partitions left alone and why (shapes the policy does not manage).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Ready, Reconciling and Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
