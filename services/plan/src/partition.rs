//! The partition planner: a pure function from a `PartitionPolicySpec`, what
//! the catalog shows and the current time to the ordered DDL steps that
//! bring the table in line. The calendar arithmetic (interval boundaries in a
//! time zone, across clock changes) lives here too, so the executor and the
//! planner never disagree about where an interval starts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Datelike, Days, LocalResult, Months, NaiveDate, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use eventplane_api::SpecError;
use eventplane_api::partition::{Interval, PartitionPolicySpec, RetentionAction};

/// Longest clock jump searched when local midnight does not exist. The
/// largest on record skipped a whole day (Samoa, 2011); two days is ample.
const MAX_GAP_MINUTES: i64 = 2 * 24 * 60;

/// A partition's bounds as the catalog reports them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Bound {
    /// `FOR VALUES FROM (from) TO (to)`; `MINVALUE`/`MAXVALUE` and infinite
    /// timestamps map to the extremes of `DateTime<Utc>`.
    Range {
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
    /// The default partition.
    Default,
    /// Bounds that cannot be read as a time range, kept verbatim.
    Other(String),
}

/// A partition attached to the table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExistingPartition {
    pub name: String,
    pub bound: Bound,
    /// Postgres's estimate (`reltuples`); -1 when never analyzed.
    pub row_estimate: i64,
}

/// What the executor found in the catalog.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Observed {
    /// Whether the table is partitioned by range.
    pub partitioned: bool,
    /// The partition key when it is one plain column; `None` for an
    /// expression or several columns.
    pub key_column: Option<String>,
    pub partitions: Vec<ExistingPartition>,
    /// Instants that have rows waiting in the default partition; each is
    /// mapped to its interval by the planner.
    pub default_rows: Vec<DateTime<Utc>>,
}

/// One DDL change, run by the executor in a transaction of its own.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum Step {
    /// Create a partition for `[from, to)` and attach it.
    Create {
        name: String,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
    /// Create a partition for `[from, to)`, move the rows of that range out
    /// of the default partition into it, and attach it.
    MoveFromDefault {
        name: String,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
    /// Create the default partition.
    CreateDefault { name: String },
    /// Detach a retired partition, keeping its table.
    Detach { name: String },
    /// Move a retired partition into the archive schema, then detach it.
    Archive { name: String, schema: String },
    /// Detach a retired partition (if still attached) and drop its table.
    Drop { name: String },
}

impl Step {
    /// The partition the step changes.
    pub fn name(&self) -> &str {
        match self {
            Step::Create { name, .. }
            | Step::MoveFromDefault { name, .. }
            | Step::CreateDefault { name }
            | Step::Detach { name }
            | Step::Archive { name, .. }
            | Step::Drop { name } => name,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let instant = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        match self {
            Step::Create { name, from, to } => {
                write!(f, "create {name} [{}, {})", instant(from), instant(to))
            }
            Step::MoveFromDefault { name, from, to } => write!(
                f,
                "create {name} [{}, {}) with the rows waiting in the default partition",
                instant(from),
                instant(to)
            ),
            Step::CreateDefault { name } => write!(f, "create default partition {name}"),
            Step::Detach { name } => write!(f, "detach {name}"),
            Step::Archive { name, schema } => {
                write!(f, "detach {name} into archive schema {schema}")
            }
            Step::Drop { name } => write!(f, "detach and drop {name}"),
        }
    }
}

/// The steps that bring the table in line with its policy, and a summary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// In the order they must run: default partition, new partitions
    /// (oldest first), then retired partitions (oldest first).
    pub steps: Vec<Step>,
    /// Partitions left alone and why, ranges skipped because of overlaps,
    /// rows left behind.
    pub notes: Vec<String>,
    /// End of the newest policy partition once the plan has run.
    pub premade_until: Option<DateTime<Utc>>,
    /// Start of the oldest policy partition once the plan has run.
    pub oldest_kept: Option<DateTime<Utc>>,
    /// When the current interval ends: the next time planning can change
    /// anything without a change to the table or the spec.
    pub next_boundary: DateTime<Utc>,
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    #[error("table {0} is not partitioned by range; create it with PARTITION BY RANGE (<column>)")]
    NotPartitioned(String),
    #[error("table is partitioned by {found}, but the policy names column {expected}")]
    WrongKey { expected: String, found: String },
    #[error("{0:?} is not an IANA time zone name")]
    BadTimeZone(String),
    #[error("invalid policy: {0}")]
    InvalidSpec(SpecError),
}

/// Interval arithmetic in the policy's time zone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calendar {
    tz: Tz,
    interval: Interval,
}

impl Calendar {
    pub fn new(spec: &PartitionPolicySpec) -> Result<Calendar, PlanError> {
        let tz = spec
            .time_zone
            .parse::<Tz>()
            .map_err(|_| PlanError::BadTimeZone(spec.time_zone.clone()))?;
        Ok(Calendar {
            tz,
            interval: spec.interval,
        })
    }

    /// Start of the interval holding `t`: the greatest boundary `<= t`.
    pub fn interval_start(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let mut start = self.midnight(self.first_day(self.local_date(t)));
        // Where clocks fall back across midnight, an instant can read as the
        // previous local day although that day's interval has ended; and the
        // reverse cannot happen, but stepping back keeps the invariant
        // `start <= t < next_start(start)` without relying on that.
        while start > t {
            let earlier = self.shift(start, -1);
            if earlier >= start {
                // Saturated at the start of representable time.
                return earlier;
            }
            start = earlier;
        }
        loop {
            let next = self.next_start(start);
            if next > t {
                return start;
            }
            start = next;
        }
    }

    /// Start of the interval after the one starting at `start`.
    pub fn next_start(&self, start: DateTime<Utc>) -> DateTime<Utc> {
        let mut day = self.first_day(self.local_date(start));
        loop {
            let after = self.add(day, 1);
            if after == day {
                // Saturated at the end of representable time.
                return DateTime::<Utc>::MAX_UTC;
            }
            day = after;
            let next = self.midnight(day);
            // A skipped local day (Samoa, 2011) maps two dates to one instant.
            if next > start {
                return next;
            }
        }
    }

    /// The boundary `n` intervals after (or before, if negative) the
    /// interval starting at `start`.
    pub fn shift(&self, start: DateTime<Utc>, n: i64) -> DateTime<Utc> {
        self.midnight(self.add(self.first_day(self.local_date(start)), n))
    }

    /// Whether `[from, to)` is exactly one interval.
    pub fn is_interval(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
        // Far outside any calendar a table is partitioned for, where local
        // time arithmetic could overflow.
        let plausible = |t: DateTime<Utc>| (1..=9999).contains(&t.year());
        plausible(from)
            && plausible(to)
            && self.interval_start(from) == from
            && self.next_start(from) == to
    }

    /// The local date of `from`, as used in partition names.
    pub fn local_date(&self, t: DateTime<Utc>) -> NaiveDate {
        t.with_timezone(&self.tz).date_naive()
    }

    fn first_day(&self, d: NaiveDate) -> NaiveDate {
        match self.interval {
            Interval::Monthly => d.with_day(1).unwrap_or(d),
            Interval::Weekly => d - Days::new(u64::from(d.weekday().num_days_from_monday())),
            Interval::Daily => d,
        }
    }

    fn add(&self, d: NaiveDate, n: i64) -> NaiveDate {
        let shifted = match self.interval {
            Interval::Monthly => {
                let months = Months::new(n.unsigned_abs().min(u64::from(u32::MAX)) as u32);
                if n >= 0 {
                    d.checked_add_months(months)
                } else {
                    d.checked_sub_months(months)
                }
            }
            Interval::Weekly | Interval::Daily => {
                let per = if self.interval == Interval::Weekly {
                    7
                } else {
                    1
                };
                let days = Days::new(n.unsigned_abs().saturating_mul(per));
                if n >= 0 {
                    d.checked_add_days(days)
                } else {
                    d.checked_sub_days(days)
                }
            }
        };
        // Only reachable hundreds of thousands of years away; the validated
        // spec keeps us within decades of now.
        shifted.unwrap_or(if n >= 0 {
            NaiveDate::MAX
        } else {
            NaiveDate::MIN
        })
    }

    /// Local midnight of `d`, or the earliest instant after it where
    /// midnight is skipped; the earlier of two where it happens twice.
    fn midnight(&self, d: NaiveDate) -> DateTime<Utc> {
        let naive = d.and_time(chrono::NaiveTime::MIN);
        if let Some(t) = self.earliest(naive) {
            return t;
        }
        // Inside a clock jump: find the first valid local minute, then the
        // first valid second before it (historic offsets are not always
        // whole minutes).
        for minute in 1..=MAX_GAP_MINUTES {
            let candidate = naive + TimeDelta::minutes(minute);
            if let Some(t) = self.earliest(candidate) {
                let earliest_second = (1..60)
                    .map_while(|s| self.earliest(candidate - TimeDelta::seconds(s)))
                    .last();
                return earliest_second.unwrap_or(t);
            }
        }
        // Not reachable with real tz data; UTC midnight keeps boundaries
        // monotonic rather than failing.
        naive.and_utc()
    }

    fn earliest(&self, naive: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&naive) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
            LocalResult::None => None,
        }
    }
}

/// Start of the interval holding `t`. The spec's time zone must be valid
/// (`validate` checks it); an invalid one falls back to UTC.
pub fn interval_start(spec: &PartitionPolicySpec, t: DateTime<Utc>) -> DateTime<Utc> {
    calendar_or_utc(spec).interval_start(t)
}

/// Start of the interval after the one starting at `start`.
pub fn next_start(spec: &PartitionPolicySpec, start: DateTime<Utc>) -> DateTime<Utc> {
    calendar_or_utc(spec).next_start(start)
}

/// Name of the partition whose interval starts at `from`: the table name,
/// `_p`, then the local year and month (`events_p2026_11`), plus the day for
/// weekly and daily intervals (`events_p2026_11_23`).
pub fn partition_name(spec: &PartitionPolicySpec, from: DateTime<Utc>) -> String {
    name_for(spec, &calendar_or_utc(spec), from)
}

/// Name of the default partition.
pub fn default_partition_name(spec: &PartitionPolicySpec) -> String {
    format!("{}_default", spec.table_name())
}

fn calendar_or_utc(spec: &PartitionPolicySpec) -> Calendar {
    Calendar::new(spec).unwrap_or(Calendar {
        tz: Tz::UTC,
        interval: spec.interval,
    })
}

fn name_for(spec: &PartitionPolicySpec, calendar: &Calendar, from: DateTime<Utc>) -> String {
    let d = calendar.local_date(from);
    match spec.interval {
        Interval::Monthly => format!("{}_p{:04}_{:02}", spec.table_name(), d.year(), d.month()),
        Interval::Weekly | Interval::Daily => format!(
            "{}_p{:04}_{:02}_{:02}",
            spec.table_name(),
            d.year(),
            d.month(),
            d.day()
        ),
    }
}

fn show(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Computes the steps that bring the observed table in line with `spec` at
/// time `now`.
pub fn plan(
    spec: &PartitionPolicySpec,
    observed: &Observed,
    now: DateTime<Utc>,
) -> Result<Plan, PlanError> {
    let calendar = Calendar::new(spec)?;
    spec.validate().map_err(PlanError::InvalidSpec)?;
    if !observed.partitioned {
        return Err(PlanError::NotPartitioned(spec.table.clone()));
    }
    match &observed.key_column {
        Some(column) if *column == spec.column => {}
        other => {
            return Err(PlanError::WrongKey {
                expected: spec.column.clone(),
                found: other.as_ref().map_or_else(
                    || "an expression or several columns".to_string(),
                    |c| format!("column {c}"),
                ),
            });
        }
    }

    let current = calendar.interval_start(now);
    let next_boundary = calendar.next_start(current);
    let cutoff = spec
        .retention
        .as_ref()
        .map(|r| calendar.shift(current, -i64::from(r.keep)));
    let mut notes = Vec::new();

    // Partitions whose bounds are exactly one interval belong to the policy,
    // whatever their name; everything else is someone else's and only
    // constrains where new partitions may go.
    let mut aligned: BTreeMap<DateTime<Utc>, &ExistingPartition> = BTreeMap::new();
    let mut foreign: Vec<(&str, DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    let mut has_default = false;
    for p in &observed.partitions {
        match &p.bound {
            Bound::Range { from, to } if calendar.is_interval(*from, *to) => {
                aligned.insert(*from, p);
            }
            Bound::Range { from, to } => {
                notes.push(format!(
                    "{} covers [{}, {}), which is not one {:?} interval in {}: left alone",
                    p.name,
                    show(*from),
                    show(*to),
                    spec.interval,
                    spec.time_zone
                ));
                foreign.push((&p.name, *from, *to));
            }
            Bound::Default => {
                has_default = true;
                if !spec.default_partition {
                    notes.push(format!(
                        "{} is a default partition the policy does not ask for: left alone",
                        p.name
                    ));
                }
            }
            Bound::Other(expr) => notes.push(format!(
                "{} has bounds the policy cannot read ({expr}): left alone",
                p.name
            )),
        }
    }

    if spec.suspend {
        notes.push("the policy is suspended: nothing is changed".into());
        return Ok(Plan {
            steps: Vec::new(),
            notes,
            premade_until: aligned.values().filter_map(|p| upper(&p.bound)).max(),
            oldest_kept: aligned.keys().next().copied(),
            next_boundary,
        });
    }

    let retired = |to: DateTime<Utc>| cutoff.is_some_and(|c| to <= c);
    let (retire, kept): (Vec<_>, Vec<_>) = aligned.iter().partition(|(from, _)| {
        let to = calendar.next_start(**from);
        retired(to)
    });

    // Every interval from the oldest kept partition (or the current one) to
    // the last premade one, so holes are filled.
    let mut wanted = BTreeSet::new();
    let last = calendar.shift(current, i64::from(spec.premake));
    // Rows in the default partition must leave it before their interval's
    // partition is attached, wherever that interval lies.
    let mut moves = BTreeSet::new();
    if has_default {
        let mut left_behind = BTreeSet::new();
        for t in &observed.default_rows {
            let from = calendar.interval_start(*t);
            if retired(calendar.next_start(from)) {
                left_behind.insert(from);
            } else {
                moves.insert(from);
                wanted.insert(from);
            }
        }
        for from in left_behind {
            notes.push(format!(
                "rows from [{}, {}) wait in the default partition but are older than retention: left there",
                show(from),
                show(calendar.next_start(from))
            ));
        }
    }
    // A past interval made for waiting rows is kept from then on, so the
    // holes after it are filled now rather than on the next run.
    let mut start = kept
        .first()
        .map(|(from, _)| **from)
        .into_iter()
        .chain(moves.first().copied())
        .fold(current, DateTime::min);
    while start <= last {
        wanted.insert(start);
        start = calendar.next_start(start);
    }

    let mut steps = Vec::new();
    let taken: BTreeSet<&str> = observed
        .partitions
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    if spec.default_partition && !has_default {
        let name = default_partition_name(spec);
        if taken.contains(name.as_str()) {
            notes.push(format!(
                "{name} already exists with other bounds: no default partition is made"
            ));
        } else {
            steps.push(Step::CreateDefault { name });
        }
    }

    let mut made = Vec::new();
    for from in wanted {
        if aligned.contains_key(&from) {
            continue;
        }
        let to = calendar.next_start(from);
        let name = name_for(spec, &calendar, from);
        if let Some((other, ..)) = foreign.iter().find(|(_, f, t)| *f < to && from < *t) {
            notes.push(format!(
                "{name} [{}, {}) is not made: it would overlap {other}",
                show(from),
                show(to)
            ));
            continue;
        }
        if taken.contains(name.as_str()) {
            notes.push(format!(
                "{name} [{}, {}) is not made: a partition of that name has other bounds",
                show(from),
                show(to)
            ));
            continue;
        }
        made.push((from, to));
        steps.push(if moves.contains(&from) {
            Step::MoveFromDefault { name, from, to }
        } else {
            Step::Create { name, from, to }
        });
    }

    for (_, p) in &retire {
        let name = p.name.clone();
        let Some(retention) = &spec.retention else {
            break;
        };
        steps.push(match (retention.action, &retention.archive_schema) {
            (RetentionAction::Drop, _) => Step::Drop { name },
            (RetentionAction::Archive, Some(schema)) => Step::Archive {
                name,
                schema: schema.clone(),
            },
            // `validate` has made sure an archive names its schema.
            (RetentionAction::Archive, None) | (RetentionAction::Detach, _) => {
                Step::Detach { name }
            }
        });
    }

    let kept_bounds = kept
        .iter()
        .map(|(from, _)| (**from, calendar.next_start(**from)))
        .chain(made);
    let (mut oldest_kept, mut premade_until) = (None, None);
    for (from, to) in kept_bounds {
        oldest_kept = Some(oldest_kept.map_or(from, |o: DateTime<Utc>| o.min(from)));
        premade_until = Some(premade_until.map_or(to, |p: DateTime<Utc>| p.max(to)));
    }
    Ok(Plan {
        steps,
        notes,
        premade_until,
        oldest_kept,
        next_boundary,
    })
}

fn upper(bound: &Bound) -> Option<DateTime<Utc>> {
    match bound {
        Bound::Range { to, .. } => Some(*to),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventplane_api::partition::{DatabaseRef, Retention};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .with_timezone(&Utc)
    }

    fn spec(interval: Interval, time_zone: &str, premake: u32) -> PartitionPolicySpec {
        PartitionPolicySpec {
            database: DatabaseRef {
                secret_name: "db".into(),
                key: "url".into(),
            },
            table: "t".into(),
            column: "at".into(),
            interval,
            premake,
            time_zone: time_zone.into(),
            retention: None,
            default_partition: false,
            suspend: false,
            dry_run: false,
        }
    }

    fn monthly(premake: u32) -> PartitionPolicySpec {
        spec(Interval::Monthly, "UTC", premake)
    }

    fn keep(
        mut spec: PartitionPolicySpec,
        keep: u32,
        action: RetentionAction,
    ) -> PartitionPolicySpec {
        spec.retention = Some(Retention::new(keep, action));
        spec
    }

    fn range(name: &str, from: &str, to: &str) -> ExistingPartition {
        ExistingPartition {
            name: name.into(),
            bound: Bound::Range {
                from: t(from),
                to: t(to),
            },
            row_estimate: 0,
        }
    }

    fn default_partition(name: &str) -> ExistingPartition {
        ExistingPartition {
            name: name.into(),
            bound: Bound::Default,
            row_estimate: 0,
        }
    }

    fn observed(partitions: Vec<ExistingPartition>) -> Observed {
        Observed {
            partitioned: true,
            key_column: Some("at".into()),
            partitions,
            default_rows: Vec::new(),
        }
    }

    /// Months of 2026 as aligned UTC partitions named like ours.
    fn months_2026(months: &[u32]) -> Vec<ExistingPartition> {
        months
            .iter()
            .map(|m| {
                let from = Utc.with_ymd_and_hms(2026, *m, 1, 0, 0, 0).unwrap();
                let to = from.checked_add_months(Months::new(1)).unwrap();
                ExistingPartition {
                    name: format!("t_p2026_{m:02}"),
                    bound: Bound::Range { from, to },
                    row_estimate: 0,
                }
            })
            .collect()
    }

    fn names(plan: &Plan) -> Vec<String> {
        plan.steps.iter().map(|s| s.to_string()).collect()
    }

    /// What the catalog would show after the plan ran.
    fn applied(before: &Observed, plan: &Plan) -> Observed {
        let mut after = before.clone();
        for step in &plan.steps {
            match step {
                Step::Create { name, from, to } | Step::MoveFromDefault { name, from, to } => {
                    after.partitions.push(ExistingPartition {
                        name: name.clone(),
                        bound: Bound::Range {
                            from: *from,
                            to: *to,
                        },
                        row_estimate: 0,
                    });
                    after.default_rows.retain(|r| !(*from <= *r && *r < *to));
                }
                Step::CreateDefault { name } => after.partitions.push(default_partition(name)),
                Step::Detach { name } | Step::Archive { name, .. } | Step::Drop { name } => {
                    after.partitions.retain(|p| p.name != *name)
                }
            }
        }
        after
    }

    #[test]
    fn interval_boundaries_follow_the_calendar_and_the_time_zone() {
        // (what, interval, zone, now, expected start, expected next start)
        let cases = [
            (
                "mid-month",
                Interval::Monthly,
                "UTC",
                "2026-11-15T10:00:00Z",
                "2026-11-01T00:00:00Z",
                "2026-12-01T00:00:00Z",
            ),
            (
                "exactly on a boundary",
                Interval::Monthly,
                "UTC",
                "2026-12-01T00:00:00Z",
                "2026-12-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
            (
                "just before a boundary",
                Interval::Monthly,
                "UTC",
                "2026-11-30T23:59:59.999999Z",
                "2026-11-01T00:00:00Z",
                "2026-12-01T00:00:00Z",
            ),
            (
                "December rolls over the year",
                Interval::Monthly,
                "UTC",
                "2026-12-31T23:00:00Z",
                "2026-12-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
            (
                "leap February 2028 has 29 days",
                Interval::Monthly,
                "UTC",
                "2028-02-29T12:00:00Z",
                "2028-02-01T00:00:00Z",
                "2028-03-01T00:00:00Z",
            ),
            (
                "February 2100 is not leap",
                Interval::Monthly,
                "UTC",
                "2100-02-28T12:00:00Z",
                "2100-02-01T00:00:00Z",
                "2100-03-01T00:00:00Z",
            ),
            (
                "New York month spans the spring change",
                Interval::Monthly,
                "America/New_York",
                "2026-03-15T12:00:00Z",
                "2026-03-01T05:00:00Z",
                "2026-04-01T04:00:00Z",
            ),
            (
                "New York early hours belong to the previous local month",
                Interval::Monthly,
                "America/New_York",
                "2026-04-01T03:00:00Z",
                "2026-03-01T05:00:00Z",
                "2026-04-01T04:00:00Z",
            ),
            (
                "New York spring-forward day has 23 hours",
                Interval::Daily,
                "America/New_York",
                "2026-03-08T12:00:00Z",
                "2026-03-08T05:00:00Z",
                "2026-03-09T04:00:00Z",
            ),
            (
                "Santiago day before the skipped midnight",
                Interval::Daily,
                "America/Santiago",
                "2026-09-05T12:00:00Z",
                "2026-09-05T04:00:00Z",
                "2026-09-06T04:00:00Z",
            ),
            (
                "Santiago skipped midnight starts at 01:00",
                Interval::Daily,
                "America/Santiago",
                "2026-09-06T12:00:00Z",
                "2026-09-06T04:00:00Z",
                "2026-09-07T03:00:00Z",
            ),
            (
                "Santiago repeated hour before midnight stays in its day",
                Interval::Daily,
                "America/Santiago",
                "2026-04-05T03:30:00Z",
                "2026-04-04T03:00:00Z",
                "2026-04-05T04:00:00Z",
            ),
            (
                "Beirut skipped midnight starts at 01:00",
                Interval::Daily,
                "Asia/Beirut",
                "2026-03-29T10:00:00Z",
                "2026-03-28T22:00:00Z",
                "2026-03-29T21:00:00Z",
            ),
            (
                "Havana repeated midnight starts at the first one",
                Interval::Monthly,
                "America/Havana",
                "2026-11-01T04:30:00Z",
                "2026-11-01T04:00:00Z",
                "2026-12-01T05:00:00Z",
            ),
            (
                "week starts on Monday",
                Interval::Weekly,
                "UTC",
                "2026-11-25T08:00:00Z",
                "2026-11-23T00:00:00Z",
                "2026-11-30T00:00:00Z",
            ),
            (
                "week across New Year",
                Interval::Weekly,
                "UTC",
                "2027-01-01T08:00:00Z",
                "2026-12-28T00:00:00Z",
                "2027-01-04T00:00:00Z",
            ),
            (
                "Sunday night belongs to the week before",
                Interval::Weekly,
                "UTC",
                "2026-11-29T23:59:00Z",
                "2026-11-23T00:00:00Z",
                "2026-11-30T00:00:00Z",
            ),
            (
                "Tokyo day starts the evening before in UTC",
                Interval::Daily,
                "Asia/Tokyo",
                "2026-11-23T16:00:00Z",
                "2026-11-23T15:00:00Z",
                "2026-11-24T15:00:00Z",
            ),
        ];
        for (what, interval, zone, now, start, next) in cases {
            let spec = spec(interval, zone, 0);
            let got = interval_start(&spec, t(now));
            assert_eq!(got, t(start), "{what}: start");
            assert_eq!(next_start(&spec, got), t(next), "{what}: next start");
        }
    }

    #[test]
    fn partition_names_use_the_local_date() {
        let mut qualified = monthly(0);
        qualified.table = "audit.entries".into();
        let cases = [
            ("monthly", monthly(0), "2026-11-01T00:00:00Z", "t_p2026_11"),
            (
                "schema is not part of the name",
                qualified,
                "2026-11-01T00:00:00Z",
                "entries_p2026_11",
            ),
            (
                "New York month",
                spec(Interval::Monthly, "America/New_York", 0),
                "2026-03-01T05:00:00Z",
                "t_p2026_03",
            ),
            (
                "daily",
                spec(Interval::Daily, "UTC", 0),
                "2026-11-23T00:00:00Z",
                "t_p2026_11_23",
            ),
            (
                "weekly",
                spec(Interval::Weekly, "UTC", 0),
                "2026-11-23T00:00:00Z",
                "t_p2026_11_23",
            ),
            (
                "Tokyo day",
                spec(Interval::Daily, "Asia/Tokyo", 0),
                "2026-11-23T15:00:00Z",
                "t_p2026_11_24",
            ),
        ];
        for (what, spec, from, expected) in cases {
            assert_eq!(partition_name(&spec, t(from)), expected, "{what}");
        }
    }

    #[test]
    fn longest_names_fit_in_a_postgres_identifier() {
        let mut spec = spec(Interval::Daily, "UTC", 0);
        spec.table = "x".repeat(48);
        assert!(partition_name(&spec, t("2026-11-23T00:00:00Z")).len() <= 63);
        assert!(default_partition_name(&spec).len() <= 63);
    }

    #[test]
    fn fresh_table_gets_the_current_month_and_premade_ones_across_new_year() {
        let plan = plan(&monthly(3), &observed(vec![]), t("2026-11-15T10:00:00Z")).unwrap();
        assert_eq!(
            names(&plan),
            [
                "create t_p2026_11 [2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z)",
                "create t_p2026_12 [2026-12-01T00:00:00Z, 2027-01-01T00:00:00Z)",
                "create t_p2027_01 [2027-01-01T00:00:00Z, 2027-02-01T00:00:00Z)",
                "create t_p2027_02 [2027-02-01T00:00:00Z, 2027-03-01T00:00:00Z)",
            ]
        );
        assert_eq!(plan.oldest_kept, Some(t("2026-11-01T00:00:00Z")));
        assert_eq!(plan.premade_until, Some(t("2027-03-01T00:00:00Z")));
        assert_eq!(plan.next_boundary, t("2026-12-01T00:00:00Z"));
        assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    }

    #[test]
    fn premake_zero_makes_only_the_current_interval() {
        let cases = [
            (
                Interval::Monthly,
                "create t_p2026_11 [2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z)",
            ),
            (
                Interval::Weekly,
                "create t_p2026_11_23 [2026-11-23T00:00:00Z, 2026-11-30T00:00:00Z)",
            ),
            (
                Interval::Daily,
                "create t_p2026_11_25 [2026-11-25T00:00:00Z, 2026-11-26T00:00:00Z)",
            ),
        ];
        for (interval, expected) in cases {
            let plan = plan(
                &spec(interval, "UTC", 0),
                &observed(vec![]),
                t("2026-11-25T10:00:00Z"),
            )
            .unwrap();
            assert_eq!(names(&plan), [expected], "{interval:?}");
        }
    }

    #[test]
    fn weekly_and_daily_premake_consecutive_intervals() {
        let weekly = plan(
            &spec(Interval::Weekly, "UTC", 2),
            &observed(vec![]),
            t("2026-12-30T10:00:00Z"),
        )
        .unwrap();
        assert_eq!(
            names(&weekly),
            [
                "create t_p2026_12_28 [2026-12-28T00:00:00Z, 2027-01-04T00:00:00Z)",
                "create t_p2027_01_04 [2027-01-04T00:00:00Z, 2027-01-11T00:00:00Z)",
                "create t_p2027_01_11 [2027-01-11T00:00:00Z, 2027-01-18T00:00:00Z)",
            ]
        );
        let daily = plan(
            &spec(Interval::Daily, "America/Santiago", 2),
            &observed(vec![]),
            t("2026-09-05T12:00:00Z"),
        )
        .unwrap();
        assert_eq!(
            names(&daily),
            [
                "create t_p2026_09_05 [2026-09-05T04:00:00Z, 2026-09-06T04:00:00Z)",
                "create t_p2026_09_06 [2026-09-06T04:00:00Z, 2026-09-07T03:00:00Z)",
                "create t_p2026_09_07 [2026-09-07T03:00:00Z, 2026-09-08T03:00:00Z)",
            ]
        );
    }

    #[test]
    fn months_with_matching_bounds_count_as_present_whatever_their_name() {
        // What the event store's migration makes: this month and the next.
        let mut spec = monthly(3);
        spec.table = "events".into();
        let mut existing = observed(vec![
            range(
                "events_2026_11",
                "2026-11-01T00:00:00Z",
                "2026-12-01T00:00:00Z",
            ),
            range(
                "events_2026_12",
                "2026-12-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
        ]);
        existing.key_column = Some("at".into());
        let plan = plan(&spec, &existing, t("2026-11-15T10:00:00Z")).unwrap();
        assert_eq!(
            names(&plan),
            [
                "create events_p2027_01 [2027-01-01T00:00:00Z, 2027-02-01T00:00:00Z)",
                "create events_p2027_02 [2027-02-01T00:00:00Z, 2027-03-01T00:00:00Z)",
            ]
        );
    }

    #[test]
    fn holes_between_the_oldest_kept_partition_and_the_premade_ones_are_filled() {
        let existing = observed(months_2026(&[8, 11]));
        let plan = plan(&monthly(1), &existing, t("2026-11-15T10:00:00Z")).unwrap();
        assert_eq!(
            names(&plan),
            [
                "create t_p2026_09 [2026-09-01T00:00:00Z, 2026-10-01T00:00:00Z)",
                "create t_p2026_10 [2026-10-01T00:00:00Z, 2026-11-01T00:00:00Z)",
                "create t_p2026_12 [2026-12-01T00:00:00Z, 2027-01-01T00:00:00Z)",
            ]
        );
        assert_eq!(plan.oldest_kept, Some(t("2026-08-01T00:00:00Z")));
    }

    #[test]
    fn default_partition_is_created_first() {
        let mut spec = monthly(1);
        spec.default_partition = true;
        let plan = plan(&spec, &observed(vec![]), t("2026-11-15T10:00:00Z")).unwrap();
        assert_eq!(
            names(&plan),
            [
                "create default partition t_default",
                "create t_p2026_11 [2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z)",
                "create t_p2026_12 [2026-12-01T00:00:00Z, 2027-01-01T00:00:00Z)",
            ]
        );
    }

    #[test]
    fn rows_waiting_in_the_default_partition_move_into_their_new_partition() {
        let mut spec = keep(monthly(1), 6, RetentionAction::Detach);
        spec.default_partition = true;
        let mut existing = observed(months_2026(&[11]));
        existing.partitions.push(default_partition("t_default"));
        existing.default_rows = vec![
            t("2026-12-24T18:00:00Z"), // premade month
            t("2026-12-01T00:00:00Z"), // same month again
            t("2026-09-03T08:00:00Z"), // a past month still kept
            t("2027-06-01T00:00:00Z"), // beyond premake
            t("2020-01-15T00:00:00Z"), // retired long ago
        ];
        let plan = plan(&spec, &existing, t("2026-11-15T10:00:00Z")).unwrap();
        assert_eq!(
            names(&plan),
            [
                "create t_p2026_09 [2026-09-01T00:00:00Z, 2026-10-01T00:00:00Z) with the rows waiting in the default partition",
                "create t_p2026_10 [2026-10-01T00:00:00Z, 2026-11-01T00:00:00Z)",
                "create t_p2026_12 [2026-12-01T00:00:00Z, 2027-01-01T00:00:00Z) with the rows waiting in the default partition",
                "create t_p2027_06 [2027-06-01T00:00:00Z, 2027-07-01T00:00:00Z) with the rows waiting in the default partition",
            ]
        );
        assert_eq!(plan.notes.len(), 1, "{:?}", plan.notes);
        assert!(
            plan.notes[0].contains("2020-01-01T00:00:00Z"),
            "{:?}",
            plan.notes
        );
    }

    #[test]
    fn rows_reported_without_a_default_partition_are_ignored() {
        let mut existing = observed(months_2026(&[11]));
        existing.default_rows = vec![t("2026-11-20T00:00:00Z")];
        let plan = plan(&monthly(0), &existing, t("2026-11-15T10:00:00Z")).unwrap();
        assert!(plan.steps.is_empty(), "{:?}", plan.steps);
    }

    #[test]
    fn retention_retires_partitions_ending_before_the_cutoff() {
        let existing = observed(months_2026(&[6, 7, 8, 9, 10, 11, 12]));
        let now = t("2026-11-15T10:00:00Z");
        // (keep, action, expected retirement steps)
        let cases: [(u32, RetentionAction, &[&str]); 6] = [
            (
                0,
                RetentionAction::Detach,
                &[
                    "detach t_p2026_06",
                    "detach t_p2026_07",
                    "detach t_p2026_08",
                    "detach t_p2026_09",
                    "detach t_p2026_10",
                ],
            ),
            (
                1,
                RetentionAction::Detach,
                &[
                    "detach t_p2026_06",
                    "detach t_p2026_07",
                    "detach t_p2026_08",
                    "detach t_p2026_09",
                ],
            ),
            (
                3,
                RetentionAction::Detach,
                &["detach t_p2026_06", "detach t_p2026_07"],
            ),
            (
                3,
                RetentionAction::Drop,
                &["detach and drop t_p2026_06", "detach and drop t_p2026_07"],
            ),
            (5, RetentionAction::Drop, &[]),
            (24, RetentionAction::Detach, &[]),
        ];
        for (n, action, expected) in cases {
            let plan = plan(&keep(monthly(1), n, action), &existing, now).unwrap();
            assert_eq!(names(&plan), expected, "keep {n} {action:?}");
        }
    }

    #[test]
    fn archive_retention_moves_retired_partitions_into_its_schema() {
        let mut spec = monthly(1);
        spec.retention = Some(Retention::archive(3, "cold"));
        let mut existing = observed(months_2026(&[6, 7, 8, 9, 10, 11, 12]));
        // Moved by a run that stopped before its detach finished.
        existing.partitions.push(range(
            "cold.t_p2026_05",
            "2026-05-01T00:00:00Z",
            "2026-06-01T00:00:00Z",
        ));
        let now = t("2026-11-15T10:00:00Z");
        let first = plan(&spec, &existing, now).unwrap();
        assert_eq!(
            names(&first),
            [
                "detach cold.t_p2026_05 into archive schema cold",
                "detach t_p2026_06 into archive schema cold",
                "detach t_p2026_07 into archive schema cold",
            ]
        );
        assert_eq!(
            first.steps[1],
            Step::Archive {
                name: "t_p2026_06".into(),
                schema: "cold".into()
            }
        );
        assert_eq!(first.oldest_kept, Some(t("2026-08-01T00:00:00Z")));
        let second = plan(&spec, &applied(&existing, &first), now).unwrap();
        assert_eq!(second.steps, vec![]);
        let json = serde_json::to_value(&first.steps[1]).unwrap();
        assert_eq!(json["action"], "archive");
        assert_eq!(json["schema"], "cold");
    }

    #[test]
    fn retention_zero_keeps_the_current_interval_and_its_premade_ones() {
        let plan = plan(
            &keep(monthly(2), 0, RetentionAction::Drop),
            &observed(months_2026(&[10])),
            t("2026-11-15T10:00:00Z"),
        )
        .unwrap();
        assert_eq!(
            names(&plan),
            [
                "create t_p2026_11 [2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z)",
                "create t_p2026_12 [2026-12-01T00:00:00Z, 2027-01-01T00:00:00Z)",
                "create t_p2027_01 [2027-01-01T00:00:00Z, 2027-02-01T00:00:00Z)",
                "detach and drop t_p2026_10",
            ]
        );
        assert_eq!(plan.oldest_kept, Some(t("2026-11-01T00:00:00Z")));
    }

    #[test]
    fn odd_partitions_are_left_alone_reported_and_never_overlapped() {
        let existing = observed(vec![
            range("t_legacy", "2026-11-10T00:00:00Z", "2026-12-10T00:00:00Z"),
            range("t_old", "2019-01-01T00:00:00Z", "2020-01-01T00:00:00Z"),
            ExistingPartition {
                name: "t_weird".into(),
                bound: Bound::Other("FOR VALUES FROM ('x') TO ('y')".into()),
                row_estimate: 0,
            },
        ]);
        let spec = keep(monthly(3), 1, RetentionAction::Drop);
        let plan = plan(&spec, &existing, t("2026-11-15T10:00:00Z")).unwrap();
        assert_eq!(
            names(&plan),
            [
                "create t_p2027_01 [2027-01-01T00:00:00Z, 2027-02-01T00:00:00Z)",
                "create t_p2027_02 [2027-02-01T00:00:00Z, 2027-03-01T00:00:00Z)",
            ]
        );
        let notes = plan.notes.join("\n");
        for expected in [
            "t_legacy covers",
            "t_old covers",
            "t_weird has bounds",
            "t_p2026_11 [",
            "t_p2026_12 [",
        ] {
            assert!(
                notes.contains(expected),
                "{expected:?} missing from:\n{notes}"
            );
        }
    }

    #[test]
    fn unbounded_partitions_are_left_alone() {
        let below = ExistingPartition {
            name: "t_before".into(),
            bound: Bound::Range {
                from: DateTime::<Utc>::MIN_UTC,
                to: t("2019-01-01T00:00:00Z"),
            },
            row_estimate: 0,
        };
        let above = ExistingPartition {
            name: "t_after".into(),
            bound: Bound::Range {
                from: t("2027-01-01T00:00:00Z"),
                to: DateTime::<Utc>::MAX_UTC,
            },
            row_estimate: 0,
        };
        let spec = keep(monthly(3), 0, RetentionAction::Drop);
        let plan = plan(
            &spec,
            &observed(vec![below, above]),
            t("2026-11-15T10:00:00Z"),
        )
        .unwrap();
        assert_eq!(
            names(&plan),
            [
                "create t_p2026_11 [2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z)",
                "create t_p2026_12 [2026-12-01T00:00:00Z, 2027-01-01T00:00:00Z)",
            ]
        );
        assert_eq!(plan.notes.len(), 4, "{:?}", plan.notes);
    }

    #[test]
    fn table_that_is_not_partitioned_is_an_error() {
        let mut existing = observed(vec![]);
        existing.partitioned = false;
        let err = plan(&monthly(3), &existing, t("2026-11-15T10:00:00Z")).unwrap_err();
        assert_eq!(err, PlanError::NotPartitioned("t".into()));
        assert!(err.to_string().contains("PARTITION BY RANGE"), "{err}");
    }

    #[test]
    fn partition_key_other_than_the_policy_column_is_an_error() {
        let cases = [
            (Some("created_at"), "column created_at"),
            (None, "an expression or several columns"),
        ];
        for (key, found) in cases {
            let mut existing = observed(vec![]);
            existing.key_column = key.map(String::from);
            let err = plan(&monthly(3), &existing, t("2026-11-15T10:00:00Z")).unwrap_err();
            assert_eq!(
                err,
                PlanError::WrongKey {
                    expected: "at".into(),
                    found: found.into()
                }
            );
        }
    }

    #[test]
    fn unknown_time_zone_is_an_error() {
        let err = plan(
            &spec(Interval::Monthly, "Europe/Atlantis", 3),
            &observed(vec![]),
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(err, PlanError::BadTimeZone("Europe/Atlantis".into()));
    }

    #[test]
    fn suspended_policy_plans_nothing() {
        let mut spec = keep(monthly(3), 0, RetentionAction::Drop);
        spec.suspend = true;
        let plan = plan(
            &spec,
            &observed(months_2026(&[1])),
            t("2026-11-15T10:00:00Z"),
        )
        .unwrap();
        assert!(plan.steps.is_empty());
        assert!(plan.notes.iter().any(|n| n.contains("suspended")));
    }

    #[test]
    fn a_plan_applied_then_planned_again_plans_nothing() {
        let now = t("2026-11-15T10:00:00Z");
        let mut with_default = keep(monthly(2), 3, RetentionAction::Drop);
        with_default.default_partition = true;
        let mut rows_waiting = observed(months_2026(&[1, 5, 11]));
        rows_waiting.partitions.push(default_partition("t_default"));
        rows_waiting.default_rows = vec![t("2026-09-09T00:00:00Z"), t("2027-05-01T00:00:00Z")];
        let cases = [
            ("fresh monthly", monthly(3), observed(vec![])),
            (
                "fresh daily in Santiago",
                spec(Interval::Daily, "America/Santiago", 40),
                observed(vec![]),
            ),
            (
                "weekly in New York",
                spec(Interval::Weekly, "America/New_York", 10),
                observed(vec![]),
            ),
            ("holes", monthly(1), observed(months_2026(&[3, 9, 12]))),
            ("retention and rows waiting", with_default, rows_waiting),
        ];
        for (what, spec, before) in cases {
            let first = plan(&spec, &before, now).unwrap();
            assert!(!first.steps.is_empty(), "{what}: nothing to do at first");
            let second = plan(&spec, &applied(&before, &first), now).unwrap();
            assert_eq!(second.steps, vec![], "{what}");
            assert_eq!(second.premade_until, first.premade_until, "{what}");
            assert_eq!(second.oldest_kept, first.oldest_kept, "{what}");
        }
    }

    #[test]
    fn steps_serialize_with_an_action_tag() {
        let step = Step::Create {
            name: "t_p2026_11".into(),
            from: t("2026-11-01T00:00:00Z"),
            to: t("2026-12-01T00:00:00Z"),
        };
        let json = serde_json::to_value(&step).unwrap();
        assert_eq!(json["action"], "create");
        assert_eq!(json["from"], "2026-11-01T00:00:00Z");
    }
}
