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

use crate::error::SpecError;
use crate::partition::types::{Interval, PartitionPolicySpec, RetentionAction};

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
    #[error(
        "table {0} is not partitioned by range; create it with PARTITION BY RANGE (<column>)"
    )]
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
            start = self.shift(start, -1);
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
            day = self.add(day, 1);
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
        from > DateTime::<Utc>::MIN_UTC
            && to < DateTime::<Utc>::MAX_UTC
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
                let per = if self.interval == Interval::Weekly { 7 } else { 1 };
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
        shifted.unwrap_or(if n >= 0 { NaiveDate::MAX } else { NaiveDate::MIN })
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
    let mut start = kept.first().map_or(current, |(from, _)| (**from).min(current));
    while start <= last {
        wanted.insert(start);
        start = calendar.next_start(start);
    }

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

    let mut steps = Vec::new();
    let taken: BTreeSet<&str> = observed.partitions.iter().map(|p| p.name.as_str()).collect();
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

    let action = spec.retention.as_ref().map(|r| r.action);
    for (_, p) in &retire {
        let name = p.name.clone();
        steps.push(match action {
            Some(RetentionAction::Drop) => Step::Drop { name },
            _ => Step::Detach { name },
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
