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
///
/// Writers queue behind a statement that waits for a lock they conflict
/// with, so the statements that want such a lock (`ACCESS EXCLUSIVE` on the
/// parent, on the default partition or on a partition being archived) wait
/// at most `exclusive_lock_timeout` and are retried; the rest take locks
/// that writers pass (`SHARE UPDATE EXCLUSIVE` on the parent, locks on
/// tables nobody writes to) and may wait up to `lock_timeout`.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Longest a statement whose lock writers pass waits for it before it
    /// gives up and is retried.
    pub lock_timeout: Duration,
    /// Attempts per step when its lock is busy.
    pub max_attempts: u32,
    /// Longest a statement that writers would queue behind waits for its
    /// lock: what a writer can stall for, plus the short time the lock is
    /// then held.
    pub exclusive_lock_timeout: Duration,
    /// Attempts per such statement: more than `max_attempts`, since each
    /// gives up sooner.
    pub exclusive_attempts: u32,
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
            // Well under the 50 ms a writer may wait during maintenance.
            exclusive_lock_timeout: Duration::from_millis(20),
            // With the backoff (0.1 s doubling to 2 s) about a minute of
            // trying before the run gives up and is retried later.
            exclusive_attempts: 30,
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
    /// are finished first, with the drop or archive move they were for, and
    /// reported as the `Detach`, `Drop` or `Archive` that completed.
    pub executed: Vec<Step>,
    /// How long each executed step took, in milliseconds, in the order of
    /// `executed`.
    pub step_millis: Vec<u64>,
    /// The table's partitions once the run finished.
    pub partitions_after: Vec<ExistingPartition>,
    /// Partitions retired into the archive schema (named `schema.table`)
    /// that are still there; empty unless retention archives.
    pub archived: Vec<ExistingPartition>,
}
