//! `PartitionPolicy` without Kubernetes: reads a partitioned table's catalog,
//! runs the pure planner from `eventplane-plan`, and applies its steps with
//! short lock timeouts under a per-table advisory lock. The operator and the
//! `eventplane partitions` command both call `execute::apply`.

pub mod catalog;
pub mod execute;

use std::time::Duration;

use eventplane_plan::{ExistingPartition, Plan, PlanError, Step};
use serde::Serialize;
use thiserror::Error;

pub use catalog::observe;
pub use execute::apply;

/// Why an `apply` did not finish.
#[derive(Debug, Error)]
pub enum PartitionError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("table {0} does not exist")]
    MissingTable(String),
    #[error(
        "partition key column {column} is of type {found}; a partition policy needs timestamptz"
    )]
    KeyType { column: String, found: String },
    /// A lock stayed busy through every retry (the step and the attempts
    /// are logged), or another run on the same table did not finish in time.
    #[error(
        "the table stayed locked by other sessions through every retry; long transactions or another partition run hold it, try again later"
    )]
    LockBusy,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// How `apply` behaves towards other sessions.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Longest a DDL statement waits for a table lock before it gives up
    /// and is retried; writers queue behind a waiting DDL statement, so this
    /// bounds how long they can stall.
    pub lock_timeout: Duration,
    /// Attempts per step when its lock is busy.
    pub max_attempts: u32,
    /// Longest to wait for another `apply` on the same table to finish.
    pub run_lock_wait: Duration,
    /// Plan only, as if the policy said `dryRun: true`.
    pub dry_run: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            // Short enough that a blocked writer barely notices, long enough
            // to get in between the transactions of a busy table.
            lock_timeout: Duration::from_secs(2),
            max_attempts: 5,
            // A run that moves rows out of a default partition can take a
            // while; a second run waiting a minute is cheaper than failing.
            run_lock_wait: Duration::from_secs(60),
            dry_run: false,
        }
    }
}

/// What one `apply` planned and did.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyReport {
    pub plan: Plan,
    /// The steps that ran, in order. A `Create` that met rows newly written
    /// to the default partition is reported as the `MoveFromDefault` it
    /// turned into; pending concurrent detaches left by an interrupted run
    /// are finished first and reported as `Detach`.
    pub executed: Vec<Step>,
    /// The table's partitions once the run finished.
    pub partitions_after: Vec<ExistingPartition>,
}
