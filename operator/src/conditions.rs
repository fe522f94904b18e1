//! Condition types and reasons (kstatus conventions: `Ready`, plus
//! `Reconciling` while work is under way and `Stalled` when it cannot go on
//! without a change from someone), with constructors that keep a
//! condition's transition time when its status did not change; and the two
//! forms a status gives a time in.

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
pub const DEGRADED: &str = "Degraded";

pub mod reason {
    pub const PARTITIONS_CURRENT: &str = "PartitionsCurrent";
    pub const DRY_RUN: &str = "DryRun";
    pub const SUSPENDED: &str = "Suspended";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    pub const DATABASE_UNREACHABLE: &str = "DatabaseUnreachable";
    pub const TABLE_NOT_PARTITIONED: &str = "TableNotPartitioned";
    pub const PLAN_FAILED: &str = "PlanFailed";
    pub const DDL_FAILED: &str = "DdlFailed";
    pub const LOCK_BUSY: &str = "LockBusy";
    pub const RECONCILED: &str = "Reconciled";
    // Projection reasons.
    pub const DATABASE_NOT_SET: &str = "DatabaseNotSet";
    pub const DATABASE_ERROR: &str = "DatabaseError";
    pub const VERSION_CURRENT: &str = "VersionCurrent";
    pub const CREATING: &str = "Creating";
    pub const REBUILDING: &str = "Rebuilding";
    pub const CATCHING_UP: &str = "CatchingUp";
    pub const SWAPPING: &str = "Swapping";
    pub const PREVIOUS_REBUILD_STOPPING: &str = "PreviousRebuildStopping";
    pub const REBUILD_FAILED: &str = "RebuildFailed";
    pub const PROJECTION_HALTED: &str = "ProjectionHalted";
    pub const DECLARATION_REFUSED: &str = "DeclarationRefused";
}

pub fn time(t: DateTime<Utc>) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_second(t.timestamp())
            .expect("timestamps of this era are in range"),
    )
}

/// A time in a status string field: RFC 3339 in whole seconds, in UTC.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Builds a condition; `previous` supplies the last transition time when
/// the status is unchanged, so a steady state does not churn the object.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| time(now));
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The three conditions of a resource that is ready (or not, with `reason`).
pub fn settled(
    previous: &[Condition],
    ready: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<Condition> {
    vec![
        condition(previous, READY, ready, reason, message, generation, now),
        condition(
            previous,
            RECONCILING,
            false,
            reason::RECONCILED,
            "",
            generation,
            now,
        ),
        condition(
            previous,
            STALLED,
            false,
            reason::RECONCILED,
            "",
            generation,
            now,
        ),
    ]
}

/// The conditions of a resource that cannot progress until something
/// changes: not ready, stalled with the reason.
pub fn stalled(
    previous: &[Condition],
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<Condition> {
    vec![
        condition(previous, READY, false, reason, message, generation, now),
        condition(previous, RECONCILING, false, reason, "", generation, now),
        condition(previous, STALLED, true, reason, message, generation, now),
    ]
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_status_keeps_its_transition_time() {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let t1 = t0 + chrono::Duration::hours(1);
        let first = settled(&[], true, reason::PARTITIONS_CURRENT, "ok", Some(1), t0);
        let again = settled(&first, true, reason::PARTITIONS_CURRENT, "ok", Some(2), t1);
        assert_eq!(find(&again, READY).unwrap().last_transition_time, time(t0));
        assert_eq!(find(&again, READY).unwrap().observed_generation, Some(2));
        let broken = stalled(&again, reason::SECRET_NOT_FOUND, "no secret", Some(2), t1);
        assert_eq!(find(&broken, READY).unwrap().last_transition_time, time(t1));
        assert_eq!(find(&broken, STALLED).unwrap().status, "True");
    }
}
