//! The PartitionPolicy controller's decisions, as pure functions: from what
//! a reconcile observed and did (an `Outcome`) to the status to write, the
//! Events to emit and when to look again.

pub use crate::events::EventSpec;
use std::time::Duration;

use chrono::{DateTime, Utc};
use eventplane_api::resource::{PartitionInfo, PartitionPolicyStatus};
use eventplane_plan::{Bound, ExistingPartition, Plan, PlanError, Step};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::conditions::{self, reason, rfc3339};
use crate::context::SecretProblem;

/// Look again at least this often, so drift (a partition dropped by hand)
/// is noticed and corrected within minutes.
pub const RESYNC: Duration = Duration::from_secs(600);
/// Soonest requeue after a boundary, so clock skew between the operator and
/// the database does not make it look one second too early.
const BOUNDARY_SLACK: Duration = Duration::from_secs(5);
/// Retry of problems that may clear by themselves (database down, lock
/// held by another runner).
pub const RETRY_TRANSIENT: Duration = Duration::from_secs(30);
/// Retry of problems that need someone to act (missing Secret, bad table).
pub const RETRY_STALLED: Duration = Duration::from_secs(120);

/// What a completed run saw and did.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    pub plan: Plan,
    pub executed: Vec<Step>,
    pub partitions: Vec<ExistingPartition>,
    /// Retired partitions in the archive schema.
    pub archived: Vec<ExistingPartition>,
    pub dry_run: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Suspended,
    InvalidSpec(String),
    Secret(SecretProblem),
    DatabaseUnreachable(String),
    PlanFailed(PlanError),
    /// The lock is held by another runner (another operator replica or the CLI).
    LockBusy,
    /// A DDL step failed after `executed` had succeeded.
    DdlFailed {
        message: String,
        executed: Vec<Step>,
    },
    Applied(Applied),
}

impl EventSpec {
    fn warning(reason: &'static str, note: String) -> Self {
        EventSpec {
            warning: true,
            reason,
            action: "Reconcile".into(),
            note,
        }
    }

    fn step(step: &Step) -> Self {
        EventSpec {
            warning: false,
            reason: step_reason(step),
            action: format!("{}/{}", step_action(step), step.name()),
            note: step.to_string(),
        }
    }
}

fn step_action(step: &Step) -> &'static str {
    match step {
        Step::Create { .. } | Step::CreateDefault { .. } => "Create",
        Step::MoveFromDefault { .. } => "MoveRows",
        Step::Detach { .. } => "Detach",
        Step::Archive { .. } => "Archive",
        Step::Drop { .. } => "Drop",
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: PartitionPolicyStatus,
    pub events: Vec<EventSpec>,
    pub requeue: Option<Duration>,
}

/// The Event reason of a DDL step.
pub fn step_reason(step: &Step) -> &'static str {
    match step {
        Step::Create { .. } => "PartitionCreated",
        Step::MoveFromDefault { .. } => "RowsMovedFromDefault",
        Step::CreateDefault { .. } => "DefaultPartitionCreated",
        Step::Detach { .. } => "PartitionDetached",
        Step::Archive { .. } => "PartitionArchived",
        Step::Drop { .. } => "PartitionDropped",
    }
}

fn partition_info(p: &ExistingPartition) -> PartitionInfo {
    let (from, to) = match &p.bound {
        Bound::Range { from, to } => (Some(rfc3339(*from)), Some(rfc3339(*to))),
        Bound::Default | Bound::Other(_) => (None, None),
    };
    PartitionInfo {
        name: p.name.clone(),
        from,
        to,
        row_estimate: p.row_estimate,
    }
}

/// When to look again after a successful run: at the next interval
/// boundary, but never later than the resync period.
pub fn requeue_after(plan: &Plan, now: DateTime<Utc>) -> Duration {
    let until_boundary = (plan.next_boundary - now).to_std().unwrap_or_default() + BOUNDARY_SLACK;
    until_boundary.min(RESYNC)
}

pub fn decide(
    previous: Option<&PartitionPolicyStatus>,
    generation: Option<i64>,
    outcome: Outcome,
    now: DateTime<Utc>,
) -> Decision {
    let before: &[Condition] = previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    // Keep what we knew about the partitions when this run could not look.
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    let stall = |status: &mut PartitionPolicyStatus,
                 why: &'static str,
                 message: String,
                 retry: Duration| {
        status.conditions = conditions::stalled(before, why, &message, generation, now);
        status.next_maintenance = Some(rfc3339(
            now + chrono::Duration::from_std(retry).unwrap_or_default(),
        ));
        (vec![EventSpec::warning(why, message)], Some(retry))
    };
    let (events, requeue) = match outcome {
        Outcome::Suspended => {
            status.conditions = conditions::settled(
                before,
                false,
                reason::SUSPENDED,
                "spec.suspend is true; no changes are made",
                generation,
                now,
            );
            status.next_maintenance = None;
            (vec![], None)
        }
        Outcome::InvalidSpec(message) => {
            stall(&mut status, reason::INVALID_SPEC, message, RETRY_STALLED)
        }
        Outcome::Secret(problem) => {
            let (why, message) = problem.describe("policy");
            stall(&mut status, why, message, RETRY_STALLED)
        }
        Outcome::DatabaseUnreachable(message) => {
            let message = format!("cannot connect to the database: {message}");
            stall(
                &mut status,
                reason::DATABASE_UNREACHABLE,
                message,
                RETRY_TRANSIENT,
            )
        }
        Outcome::PlanFailed(err) => {
            let why = match err {
                PlanError::NotPartitioned(_) => reason::TABLE_NOT_PARTITIONED,
                _ => reason::PLAN_FAILED,
            };
            stall(&mut status, why, err.to_string(), RETRY_STALLED)
        }
        Outcome::LockBusy => {
            // Someone else is doing the same work right now: not a failure.
            status.conditions = vec![
                conditions::condition(
                    before,
                    conditions::READY,
                    false,
                    reason::LOCK_BUSY,
                    "another runner holds the partition lock",
                    generation,
                    now,
                ),
                conditions::condition(
                    before,
                    conditions::RECONCILING,
                    true,
                    reason::LOCK_BUSY,
                    "waiting for the partition lock",
                    generation,
                    now,
                ),
                conditions::condition(
                    before,
                    conditions::STALLED,
                    false,
                    reason::LOCK_BUSY,
                    "",
                    generation,
                    now,
                ),
            ];
            status.next_maintenance = Some(rfc3339(
                now + chrono::Duration::from_std(RETRY_TRANSIENT).unwrap_or_default(),
            ));
            (vec![], Some(RETRY_TRANSIENT))
        }
        Outcome::DdlFailed { message, executed } => {
            let mut events: Vec<EventSpec> = executed.iter().map(EventSpec::step).collect();
            status.last_plan = executed.iter().map(Step::to_string).collect();
            let (more, requeue) = stall(&mut status, reason::DDL_FAILED, message, RETRY_TRANSIENT);
            events.extend(more);
            (events, requeue)
        }
        Outcome::Applied(applied) => {
            let requeue = requeue_after(&applied.plan, now);
            status.partitions = applied.partitions.iter().map(partition_info).collect();
            status.archived = applied.archived.iter().map(partition_info).collect();
            status.premade_until = applied.plan.premade_until.map(rfc3339);
            status.oldest_kept = applied.plan.oldest_kept.map(rfc3339);
            status.notes = applied.plan.notes.clone();
            status.next_maintenance = Some(rfc3339(
                now + chrono::Duration::from_std(requeue).unwrap_or_default(),
            ));
            let events;
            if applied.dry_run {
                status.dry_run_plan = applied.plan.steps.iter().map(Step::to_string).collect();
                let message = format!("dry run: {} step(s) would run", applied.plan.steps.len());
                status.conditions =
                    conditions::settled(before, true, reason::DRY_RUN, &message, generation, now);
                events = if applied.plan.steps.is_empty() {
                    vec![]
                } else {
                    vec![EventSpec {
                        warning: false,
                        reason: "DryRunPlanned",
                        action: "Plan".into(),
                        note: status.dry_run_plan.join("; "),
                    }]
                };
            } else {
                status.dry_run_plan = Vec::new();
                if !applied.executed.is_empty() {
                    status.last_plan = applied.executed.iter().map(Step::to_string).collect();
                }
                let message = format!(
                    "{} partition(s); premade until {}",
                    status.partitions.len(),
                    status.premade_until.as_deref().unwrap_or("-")
                );
                status.conditions = conditions::settled(
                    before,
                    true,
                    reason::PARTITIONS_CURRENT,
                    &message,
                    generation,
                    now,
                );
                events = applied.executed.iter().map(EventSpec::step).collect();
            }
            (events, Some(requeue))
        }
    };
    Decision {
        status,
        events,
        requeue,
    }
}
