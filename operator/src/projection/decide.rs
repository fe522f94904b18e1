//! The Projection controller's decisions, as pure functions: from the
//! resource and what a reconcile observed (the version registry, the
//! rebuild Jobs, the lag, the query plans, the query Deployment and its
//! pods' metrics) to the actions to take, the status to write, the Events
//! to emit and when to look again; and what carrying out an action changed
//! in the status and the Events.

pub use crate::events::EventSpec;
use std::time::Duration;

use chrono::{DateTime, Utc};
use eventplane_api::resource::{
    BuildProgress, Phase, ProjectionStatus, QueryCheck, RetainedVersion, RoleServing,
};
use eventplane_api::{ProjectionSpec, VersionState};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use super::job::{self, JobState, RebuildJob};
use super::scaling::{self, ReadPath};
use crate::conditions::{self, DEGRADED, READY, RECONCILING, STALLED, reason, rfc3339};
use crate::context::SecretProblem;

/// Look again this often while a rebuild runs, to keep its progress in the
/// status current (Job changes trigger a reconcile on their own).
pub const WHILE_BUILDING: Duration = Duration::from_secs(10);
/// Soon after an outcome that settles within seconds: a swap being
/// recorded, a cancelled Job's pods stopping.
pub const SHORTLY: Duration = Duration::from_secs(5);
/// Look again this often when nothing is under way, to refresh the lag and
/// the query plans.
pub const WHEN_READY: Duration = Duration::from_secs(60);
/// Retry of problems that may clear by themselves (database down).
pub const RETRY_TRANSIENT: Duration = Duration::from_secs(30);
/// Retry of problems that need someone to act (missing Secret, bad spec,
/// failed rebuild).
pub const RETRY_STALLED: Duration = Duration::from_secs(120);

/// Event reasons (Kubernetes Events, not conditions).
pub mod event {
    pub const PENDING: &str = "Pending";
    pub const BUILDING: &str = "Building";
    pub const CATCHING_UP: &str = "CatchingUp";
    pub const SWAPPING: &str = "Swapping";
    pub const READY: &str = "Ready";
    pub const REBUILD_FAILED: &str = "RebuildFailed";
    pub const REBUILD_CANCELLED: &str = "RebuildCancelled";
    pub const QUERY_SCANS_WHOLE_TABLE: &str = "QueryScansWholeTable";
    pub const VERSION_DROPPED: &str = "VersionDropped";
    pub const TABLES_DROPPED: &str = "TablesDropped";
    pub const NO_LONGER_SERVED: &str = "NoLongerServed";
    pub const TABLES_LEFT_BEHIND: &str = "TablesLeftBehind";
    pub const SCALED: &str = "Scaled";
}

/// One version in the registry, as plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    pub version: u32,
    pub table: String,
    pub state: VersionState,
    pub events_done: i64,
    pub events_total: i64,
    pub retired_at: Option<DateTime<Utc>>,
}

/// The live version's progress against the log.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Lag {
    pub seconds: f64,
    pub events: i64,
    /// Set when the live projector stopped on an event it cannot apply.
    pub halted: Option<String>,
}

/// What a reconcile saw in the database and the cluster.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Observed {
    pub versions: Vec<Version>,
    /// Every rebuild Job of this projection, whatever its version.
    pub jobs: Vec<RebuildJob>,
    pub lag: Option<Lag>,
    pub queries: Vec<QueryCheck>,
    /// The query Deployment, when it exists.
    pub read_path: Option<ReadPath>,
    /// The declaration in the database's catalog and how far it reached.
    pub catalog: Option<CatalogSeen>,
}

/// The projection's catalog entry as a reconcile found it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct CatalogSeen {
    /// The catalog generation of the entry's last change.
    pub generation: i64,
    pub served_by: Vec<RoleServing>,
}

/// Why a reconcile could not observe the projection.
#[derive(Clone, Debug, PartialEq)]
pub enum Problem {
    InvalidSpec(String),
    /// The catalog refused the declaration (a table another projection or
    /// the event store holds, a name declared from elsewhere, a changed
    /// table or key).
    Refused(String),
    DatabaseNotSet,
    Secret(SecretProblem),
    DatabaseUnreachable(String),
    DatabaseError(String),
}

#[derive(Clone, Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per reconcile, moved into decide once"
)]
pub enum Observation {
    Problem(Problem),
    Seen(Observed),
}

/// The resource as `decide` needs it.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub name: &'a str,
    pub spec: &'a ProjectionSpec,
    pub generation: Option<i64>,
    pub previous: Option<&'a ProjectionStatus>,
    pub now: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create (server-side apply) the rebuild Job of this version.
    CreateJob { version: u32 },
    /// Delete a rebuild Job that is no longer wanted, waiting for its pods.
    DeleteJob { name: String },
    /// Drop retained versions retired before the cutoff.
    DropExpired { cutoff: DateTime<Utc> },
    /// Set the query Deployment's replica count, unless another field
    /// manager owns it; `why` is the decision's reason and message.
    Scale {
        deployment: String,
        replicas: i32,
        why: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: ProjectionStatus,
    pub events: Vec<EventSpec>,
    pub requeue: Duration,
    /// What scaling keeps for the next reconcile; `None` leaves it as it was.
    pub memory: Option<scaling::Memory>,
}

/// What carrying out an action changed, as far as the status and the
/// Events tell.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `DropExpired` dropped these tables.
    Dropped { tables: Vec<String> },
    /// `Scale` changed the Deployment's replica count.
    Scaled {
        deployment: String,
        from: i32,
        to: i32,
        why: String,
    },
}

impl Plan {
    /// Adds what carrying out an action changed.
    pub fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Dropped { tables } => {
                self.events.extend(tables.into_iter().map(|table| EventSpec {
                    warning: false,
                    reason: event::VERSION_DROPPED,
                    action: format!("Drop/{table}"),
                    note: format!(
                        "dropped table {table}: retired longer than spec.rebuild.retainPreviousHours ago"
                    ),
                }));
            }
            Outcome::Scaled {
                deployment,
                from,
                to,
                why,
            } => {
                self.status.replicas = Some(to);
                self.events.push(EventSpec {
                    warning: false,
                    reason: event::SCALED,
                    action: format!("Scale/{deployment}"),
                    note: format!("{deployment}: {from} → {to} replicas ({why})"),
                });
            }
        }
    }
}

fn hours(h: u32) -> chrono::Duration {
    chrono::Duration::hours(i64::from(h))
}

pub fn decide(input: Input<'_>, observation: Observation) -> Plan {
    match observation {
        Observation::Problem(problem) => stalled(input, problem),
        Observation::Seen(observed) => seen(input, observed),
    }
}

impl Problem {
    /// The condition reason, the message for users and when to retry.
    pub fn describe(&self) -> (&'static str, String, Duration) {
        match self {
            Problem::InvalidSpec(message) => (reason::INVALID_SPEC, message.clone(), RETRY_STALLED),
            Problem::Refused(message) => (
                reason::DECLARATION_REFUSED,
                message.clone(),
                RETRY_STALLED,
            ),
            Problem::DatabaseNotSet => (
                reason::DATABASE_NOT_SET,
                "spec.database is not set: name the Secret that holds the Postgres URL of the projection's tables".to_string(),
                RETRY_STALLED,
            ),
            Problem::Secret(problem) => {
                let (why, message) = problem.describe("projection");
                (why, message, RETRY_STALLED)
            }
            Problem::DatabaseUnreachable(message) => (
                reason::DATABASE_UNREACHABLE,
                format!("cannot connect to the database: {message}"),
                RETRY_TRANSIENT,
            ),
            Problem::DatabaseError(message) => (
                reason::DATABASE_ERROR,
                format!("database error: {message}"),
                RETRY_TRANSIENT,
            ),
        }
    }
}

fn stalled(input: Input<'_>, problem: Problem) -> Plan {
    let before = previous_conditions(input);
    let (why, message, retry) = problem.describe();
    // Keep what was known about the versions: this run could not look.
    let mut status = input.previous.cloned().unwrap_or_default();
    status.observed_generation = input.generation;
    if status.phase.is_none() {
        status.phase = Some(Phase::Pending);
    }
    let mut conditions = conditions::stalled(before, why, &message, input.generation, input.now);
    if let Some(degraded) = conditions::find(before, DEGRADED) {
        conditions.push(degraded.clone());
    }
    status.conditions = conditions;
    Plan {
        actions: Vec::new(),
        status,
        events: vec![EventSpec {
            warning: true,
            reason: why,
            action: "Reconcile".into(),
            note: message,
        }],
        requeue: retry,
        memory: None,
    }
}

fn previous_conditions<'a>(input: Input<'a>) -> &'a [Condition] {
    input
        .previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

/// Why a Job is in the way of the wanted rebuild, if it is.
fn unwanted(
    job: &RebuildJob,
    wanted: u32,
    hash: &str,
    active: Option<u32>,
    row: Option<&Version>,
) -> Option<String> {
    if job.deleting {
        return None;
    }
    if job.version != Some(wanted) {
        // A finished Job of another version does no harm; its TTL removes it.
        return (!job.finished()).then(|| {
            format!(
                "version {} is no longer wanted (spec.version is {wanted})",
                job.version
                    .map_or_else(|| "?".to_string(), |v| v.to_string())
            )
        });
    }
    if active == Some(wanted) {
        return None;
    }
    if job.spec_hash.as_deref().is_some_and(|h| h != hash) {
        return Some(format!(
            "the spec of version {wanted} changed since the Job was created"
        ));
    }
    // A Job that built this version before it was swapped out again (a
    // swap back within the Job's TTL): its work is done and undone.
    if job.state == JobState::Succeeded
        && let (Some(row), Some(finished)) = (row, job.finished_at)
        && row.state == VersionState::Retained
        && row.retired_at.is_some_and(|retired| retired >= finished)
    {
        return Some(format!(
            "version {wanted} was retired after this Job built it; it is built again"
        ));
    }
    None
}

/// Estimated seconds until the load is done, from the rate since the Job
/// started.
fn eta(row: &Version, started: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<i64> {
    let elapsed = (now - started?).as_seconds_f64();
    if row.events_done <= 0 || elapsed <= 0.0 || row.events_done >= row.events_total {
        return None;
    }
    let rate = row.events_done as f64 / elapsed;
    Some(((row.events_total - row.events_done) as f64 / rate).ceil() as i64)
}

/// Where an observed projection stands: its phase and condition, when to
/// look again, and what its phase calls for.
struct Standing {
    phase: Phase,
    reason: &'static str,
    message: String,
    requeue: Duration,
    /// The rebuild under way, for the status.
    building: Option<BuildProgress>,
    /// The reason and message of a failed rebuild, for `Degraded`.
    failure: Option<(String, String)>,
    /// Start the rebuild Job of the wanted version.
    start_job: bool,
}

impl Standing {
    fn new(phase: Phase, reason: &'static str, message: String, requeue: Duration) -> Self {
        Standing {
            phase,
            reason,
            message,
            requeue,
            building: None,
            failure: None,
            start_job: false,
        }
    }

    fn with_progress(self, progress: BuildProgress) -> Self {
        Standing {
            building: Some(progress),
            ..self
        }
    }
}

/// What the phase decisions of an observed projection share.
struct View<'a> {
    spec: &'a ProjectionSpec,
    now: DateTime<Utc>,
    wanted: u32,
    /// The name of the wanted version's rebuild Job.
    job_name: String,
    active: Option<&'a Version>,
    wanted_row: Option<&'a Version>,
    /// Which version serves reads meanwhile, for messages.
    serving: String,
}

impl<'a> View<'a> {
    fn new(input: Input<'a>, versions: &'a [Version]) -> Self {
        let wanted = input.spec.version;
        let active = versions.iter().find(|v| v.state == VersionState::Active);
        View {
            spec: input.spec,
            now: input.now,
            wanted,
            job_name: job::job_name(input.name, wanted),
            active,
            wanted_row: versions.iter().find(|v| v.version == wanted),
            serving: active.map_or_else(
                || "no version serves reads yet".to_string(),
                |a| format!("version {} keeps serving", a.version),
            ),
        }
    }

    fn active_version(&self) -> Option<u32> {
        self.active.map(|v| v.version)
    }

    /// The wanted version's rebuild, as the status shows it.
    fn progress(&self, job: Option<&RebuildJob>) -> BuildProgress {
        let row = self.wanted_row;
        BuildProgress {
            version: self.wanted,
            table: eventplane_store::version_table(&self.spec.table, self.wanted),
            job: Some(self.job_name.clone()),
            events_done: row.map_or(0, |r| r.events_done),
            events_total: row.map_or(0, |r| r.events_total),
            eta_seconds: row.and_then(|r| eta(r, job.and_then(|j| j.started_at), self.now)),
        }
    }
}

/// The rebuild Jobs of a projection, by what they mean for the wanted
/// version.
struct Jobs<'a> {
    /// To delete, each with why.
    cancelled: Vec<(&'a RebuildJob, String)>,
    /// Jobs that must be gone before another rebuild starts: two rebuilds
    /// of one projection never run at once, and a Job name is reused only
    /// once the old Job has left.
    blockers: Vec<&'a RebuildJob>,
    /// The wanted version's Job, when it is not in the way.
    current: Option<&'a RebuildJob>,
    /// Some Job, of whatever version, still runs.
    unfinished: bool,
}

impl<'a> Jobs<'a> {
    fn sort(view: &View<'_>, jobs: &'a [RebuildJob]) -> Self {
        let hash = job::spec_hash(view.spec);
        let cancelled: Vec<(&RebuildJob, String)> = jobs
            .iter()
            .filter_map(|job| {
                unwanted(
                    job,
                    view.wanted,
                    &hash,
                    view.active_version(),
                    view.wanted_row,
                )
                .map(|why| (job, why))
            })
            .collect();
        let in_way =
            |job: &&RebuildJob| job.deleting || cancelled.iter().any(|(c, _)| c.name == job.name);
        let blockers = jobs
            .iter()
            .filter(in_way)
            .filter(|j| !j.finished() || j.name == view.job_name)
            .collect();
        let current = jobs
            .iter()
            .filter(|j| !in_way(j))
            .find(|j| j.version == Some(view.wanted) && j.name == view.job_name);
        Jobs {
            blockers,
            current,
            unfinished: jobs.iter().any(|j| !j.finished()),
            cancelled,
        }
    }
}

fn cancel(job: &RebuildJob, why: &str) -> (Action, EventSpec) {
    (
        Action::DeleteJob {
            name: job.name.clone(),
        },
        EventSpec {
            warning: false,
            reason: event::REBUILD_CANCELLED,
            action: format!("Cancel/{}", job.name),
            note: format!("deleted rebuild Job {}: {why}", job.name),
        },
    )
}

fn standing(view: &View<'_>, jobs: &Jobs<'_>) -> Standing {
    match view.active {
        Some(active) if active.version == view.wanted => current(view, jobs.current),
        None => first_version(),
        Some(_) => match jobs.current {
            None if !jobs.blockers.is_empty() => waiting(view, &jobs.blockers),
            None => starting(view),
            Some(job) => match &job.state {
                JobState::Running => running(view, job),
                JobState::Succeeded => finished(view, job),
                JobState::Failed { reason, message } => failed(view, job, reason, message),
            },
        },
    }
}

/// The wanted version is active; its Job may still be finishing.
fn current(view: &View<'_>, job: Option<&RebuildJob>) -> Standing {
    let wanted = view.wanted;
    if job.is_some_and(|j| !j.finished()) {
        Standing::new(
            Phase::Swapping,
            reason::SWAPPING,
            format!("version {wanted} is active; its rebuild Job is finishing"),
            SHORTLY,
        )
        .with_progress(view.progress(job))
    } else {
        Standing::new(
            Phase::Ready,
            reason::VERSION_CURRENT,
            format!("version {wanted} is active"),
            WHEN_READY,
        )
    }
}

/// No version is active yet: the registry creates the first one.
fn first_version() -> Standing {
    Standing::new(
        Phase::Pending,
        reason::CREATING,
        "the first version is being created".into(),
        SHORTLY,
    )
}

/// Another rebuild Job must leave before the wanted one starts.
fn waiting(view: &View<'_>, blockers: &[&RebuildJob]) -> Standing {
    let names: Vec<&str> = blockers.iter().map(|j| j.name.as_str()).collect();
    Standing::new(
        Phase::Building,
        reason::PREVIOUS_REBUILD_STOPPING,
        format!(
            "waiting for rebuild Job {} to stop before rebuilding version {}; {}",
            names.join(", "),
            view.wanted,
            view.serving
        ),
        SHORTLY,
    )
    .with_progress(view.progress(None))
}

/// Nothing in the way: the wanted version's rebuild Job is created.
fn starting(view: &View<'_>) -> Standing {
    Standing {
        start_job: true,
        ..Standing::new(
            Phase::Building,
            reason::REBUILDING,
            format!(
                "rebuilding version {} with Job {}; {}",
                view.wanted, view.job_name, view.serving
            ),
            WHILE_BUILDING,
        )
        .with_progress(view.progress(None))
    }
}

/// The rebuild Job runs: loading the log, then catching up with it.
fn running(view: &View<'_>, job: &RebuildJob) -> Standing {
    let (wanted, serving) = (view.wanted, &view.serving);
    let progress = view.progress(Some(job));
    let loaded = view
        .wanted_row
        .is_some_and(|r| r.state != VersionState::Building || r.events_done >= r.events_total);
    let standing = if loaded {
        Standing::new(
            Phase::CatchingUp,
            reason::CATCHING_UP,
            format!("version {wanted} is loaded and catching up with the log; {serving}"),
            WHILE_BUILDING,
        )
    } else {
        Standing::new(
            Phase::Building,
            reason::REBUILDING,
            format!(
                "loading version {wanted}: {} of {} events; {serving}",
                progress.events_done, progress.events_total
            ),
            WHILE_BUILDING,
        )
    };
    standing.with_progress(progress)
}

/// The rebuild Job succeeded; the swap is yet to show in the registry.
fn finished(view: &View<'_>, job: &RebuildJob) -> Standing {
    Standing::new(
        Phase::Swapping,
        reason::SWAPPING,
        format!(
            "rebuild Job {} finished; waiting for version {} to show as active",
            job.name, view.wanted
        ),
        SHORTLY,
    )
    .with_progress(view.progress(Some(job)))
}

/// The rebuild Job failed: reported until the spec is fixed or the Job is
/// gone.
fn failed(view: &View<'_>, job: &RebuildJob, why: &str, message: &str) -> Standing {
    let detail = if message.is_empty() {
        why.to_string()
    } else {
        format!("{why}: {message}")
    };
    let text = format!(
        "rebuild Job {} of version {} failed ({detail}); {}. \
         See `kubectl logs job/{}`. Fix the spec, or delete the Job to retry; \
         a failed Job is removed after {} minutes and the rebuild then retried",
        job.name,
        view.wanted,
        view.serving,
        job.name,
        job::TTL_AFTER_FINISHED / 60
    );
    Standing {
        failure: Some((why.to_string(), text.clone())),
        ..Standing::new(Phase::Failed, reason::REBUILD_FAILED, text, RETRY_STALLED)
            .with_progress(view.progress(Some(job)))
    }
}

/// Retained versions retired before this are dropped.
fn retention_cutoff(spec: &ProjectionSpec, now: DateTime<Utc>) -> DateTime<Utc> {
    now - hours(spec.rebuild.retain_previous_hours)
}

fn expired(version: &Version, cutoff: DateTime<Utc>) -> bool {
    version.state == VersionState::Retained && version.retired_at.is_some_and(|t| t < cutoff)
}

/// `Ready`, `Reconciling`, `Stalled` and `Degraded` of an observed
/// projection.
fn observed_conditions(
    input: Input<'_>,
    standing: &Standing,
    halted: Option<&str>,
) -> Vec<Condition> {
    let before = previous_conditions(input);
    let (generation, now) = (input.generation, input.now);
    let in_progress = matches!(
        standing.phase,
        Phase::Pending | Phase::Building | Phase::CatchingUp | Phase::Swapping
    );
    let failed = standing.phase == Phase::Failed;
    // A condition that holds carries the standing's reason and message.
    let about = |holds: bool| {
        if holds {
            (standing.reason, standing.message.clone())
        } else {
            (reason::RECONCILED, String::new())
        }
    };
    let (reconciling_reason, reconciling_message) = about(in_progress);
    let (stalled_reason, stalled_message) = about(failed);
    let degraded = match (&standing.failure, halted) {
        (Some((why, text)), _) => {
            conditions::condition(before, DEGRADED, true, why, text.clone(), generation, now)
        }
        (None, Some(halted)) => conditions::condition(
            before,
            DEGRADED,
            true,
            reason::PROJECTION_HALTED,
            format!("the live projector stopped on an event: {halted}"),
            generation,
            now,
        ),
        (None, None) => conditions::condition(
            before,
            DEGRADED,
            false,
            reason::RECONCILED,
            "",
            generation,
            now,
        ),
    };
    vec![
        conditions::condition(
            before,
            READY,
            standing.phase == Phase::Ready,
            standing.reason,
            standing.message.clone(),
            generation,
            now,
        ),
        conditions::condition(
            before,
            RECONCILING,
            in_progress,
            reconciling_reason,
            reconciling_message,
            generation,
            now,
        ),
        conditions::condition(
            before,
            STALLED,
            failed,
            stalled_reason,
            stalled_message,
            generation,
            now,
        ),
        degraded,
    ]
}

/// An Event when the phase changes, or the version it is about does.
fn phase_event(
    previous: Option<&ProjectionStatus>,
    status: &ProjectionStatus,
    standing: &Standing,
    wanted: u32,
) -> Option<EventSpec> {
    let about = |status: &ProjectionStatus| {
        (
            status.phase,
            status
                .building
                .as_ref()
                .map(|b| b.version)
                .or(status.active_version),
        )
    };
    if previous.map(about) == Some(about(status)) {
        return None;
    }
    let subject = about(status).1.unwrap_or(wanted);
    let (warning, why) = match standing.phase {
        Phase::Pending => (false, event::PENDING),
        Phase::Building => (false, event::BUILDING),
        Phase::CatchingUp => (false, event::CATCHING_UP),
        Phase::Swapping => (false, event::SWAPPING),
        Phase::Ready => (false, event::READY),
        Phase::Failed => (true, event::REBUILD_FAILED),
    };
    Some(EventSpec {
        warning,
        reason: why,
        action: format!("{why}/v{subject}"),
        note: standing.message.clone(),
    })
}

/// A Warning for each list query that has come to read the whole table.
fn full_scan_events(previous: Option<&ProjectionStatus>, queries: &[QueryCheck]) -> Vec<EventSpec> {
    queries
        .iter()
        .filter(|q| q.full_scan)
        .filter(|query| {
            let before = previous.and_then(|p| p.queries.iter().find(|q2| q2.name == query.name));
            !before.is_some_and(|b| b.full_scan)
        })
        .map(|query| EventSpec {
            warning: true,
            reason: event::QUERY_SCANS_WHOLE_TABLE,
            action: format!("Explain/{}", query.name),
            note: format!(
                "list query {:?} reads the whole table ({}); add an index on its filters and order",
                query.name, query.plan
            ),
        })
        .collect()
}

fn seen(input: Input<'_>, observed: Observed) -> Plan {
    let view = View::new(input, &observed.versions);
    let jobs = Jobs::sort(&view, &observed.jobs);
    let (mut actions, mut events): (Vec<Action>, Vec<EventSpec>) = jobs
        .cancelled
        .iter()
        .map(|(job, why)| cancel(job, why))
        .unzip();
    let standing = standing(&view, &jobs);
    if standing.start_job {
        actions.push(Action::CreateJob {
            version: view.wanted,
        });
    }

    // Retention: only when no rebuild runs, so a swap back never races the
    // drop of the version it swaps in.
    let cutoff = retention_cutoff(input.spec, input.now);
    if !jobs.unfinished
        && standing.phase == Phase::Ready
        && observed.versions.iter().any(|v| expired(v, cutoff))
    {
        actions.push(Action::DropExpired { cutoff });
    }

    let halted = observed.lag.as_ref().and_then(|l| l.halted.as_deref());
    let conditions = observed_conditions(input, &standing, halted);
    let scaling = scaling::step(
        &input.spec.scaling,
        observed.read_path,
        observed.lag.as_ref().map(|l| l.seconds),
        // A rebuild's lag is expected while it loads and catches up.
        matches!(standing.phase, Phase::Building | Phase::CatchingUp),
        input.now,
    );
    if let Some((deployment, decision)) = scaling.scale {
        actions.push(Action::Scale {
            deployment,
            replicas: decision.replicas,
            why: format!("{}: {}", decision.reason, decision.message),
        });
    }
    let status = ProjectionStatus {
        observed_generation: input.generation,
        phase: Some(standing.phase),
        active_version: view.active_version(),
        active_table: view.active.map(|a| a.table.clone()),
        building: standing.building.clone(),
        retained: observed
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Retained && !expired(v, cutoff))
            .map(|v| RetainedVersion {
                version: v.version,
                table: v.table.clone(),
                retired_at: v.retired_at.map(rfc3339).unwrap_or_default(),
            })
            .collect(),
        lag_seconds: observed.lag.as_ref().map(|l| l.seconds),
        lag_events: observed.lag.as_ref().map(|l| l.events),
        replicas: scaling.replicas,
        selector: scaling.selector,
        queries: observed.queries.clone(),
        catalog_generation: observed.catalog.as_ref().map(|c| c.generation),
        served: observed
            .catalog
            .as_ref()
            .map(|c| RoleServing::summary(&c.served_by)),
        served_by: observed
            .catalog
            .as_ref()
            .map(|c| c.served_by.clone())
            .unwrap_or_default(),
        conditions,
    };
    events.extend(phase_event(input.previous, &status, &standing, view.wanted));
    events.extend(full_scan_events(input.previous, &status.queries));
    Plan {
        actions,
        status,
        events,
        requeue: standing.requeue,
        memory: scaling.memory,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use eventplane_api::examples::ORDERS;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn ago(seconds: i64) -> DateTime<Utc> {
        now() - chrono::Duration::seconds(seconds)
    }

    fn spec(version: u32) -> ProjectionSpec {
        let mut spec = eventplane_api::load_manifests(ORDERS)
            .unwrap()
            .remove(0)
            .spec;
        spec.version = version;
        spec.database = Some(serde_json::from_value(json!({"secretName": "orders-db"})).unwrap());
        spec
    }

    fn version(v: u32, state: VersionState, done: i64, total: i64) -> Version {
        Version {
            version: v,
            table: format!("orders_v{v}"),
            state,
            events_done: done,
            events_total: total,
            retired_at: (state == VersionState::Retained).then(|| ago(3600)),
        }
    }

    fn active(v: u32) -> Version {
        version(v, VersionState::Active, 0, 0)
    }

    fn job(v: u32, state: JobState, spec: &ProjectionSpec) -> RebuildJob {
        RebuildJob {
            name: job::job_name("orders", v),
            version: Some(v),
            spec_hash: Some(job::spec_hash(spec)),
            state,
            started_at: Some(ago(100)),
            finished_at: None,
            deleting: false,
        }
    }

    fn failed() -> JobState {
        JobState::Failed {
            reason: "BackoffLimitExceeded".into(),
            message: "Job has reached the specified backoff limit".into(),
        }
    }

    fn run(spec: &ProjectionSpec, previous: Option<&ProjectionStatus>, observed: Observed) -> Plan {
        decide(
            Input {
                name: "orders",
                spec,
                generation: Some(4),
                previous,
                now: now(),
            },
            Observation::Seen(observed),
        )
    }

    fn condition<'a>(plan: &'a Plan, type_: &str) -> &'a Condition {
        conditions::find(&plan.status.conditions, type_).unwrap()
    }

    fn reasons(plan: &Plan) -> Vec<&'static str> {
        plan.events.iter().map(|e| e.reason).collect()
    }

    /// One row per phase transition: what was observed → the phase, the
    /// actions and the Events.
    #[test]
    fn phase_transitions() {
        let s2 = spec(2);
        struct Case {
            name: &'static str,
            previous: Option<Phase>,
            versions: Vec<Version>,
            jobs: Vec<RebuildJob>,
            phase: Phase,
            actions: Vec<Action>,
            events: Vec<&'static str>,
            requeue: Duration,
        }
        let cases = vec![
            Case {
                name: "no active version yet",
                previous: None,
                versions: vec![],
                jobs: vec![],
                phase: Phase::Pending,
                actions: vec![],
                events: vec![event::PENDING],
                requeue: SHORTLY,
            },
            Case {
                name: "version bumped: a Job is created",
                previous: Some(Phase::Ready),
                versions: vec![active(1)],
                jobs: vec![],
                phase: Phase::Building,
                actions: vec![Action::CreateJob { version: 2 }],
                events: vec![event::BUILDING],
                requeue: WHILE_BUILDING,
            },
            Case {
                name: "Job running, loading",
                previous: Some(Phase::Building),
                versions: vec![active(1), version(2, VersionState::Building, 10, 100)],
                jobs: vec![job(2, JobState::Running, &s2)],
                phase: Phase::Building,
                actions: vec![],
                events: vec![],
                requeue: WHILE_BUILDING,
            },
            Case {
                name: "loaded, catching up",
                previous: Some(Phase::Building),
                versions: vec![active(1), version(2, VersionState::Building, 100, 100)],
                jobs: vec![job(2, JobState::Running, &s2)],
                phase: Phase::CatchingUp,
                actions: vec![],
                events: vec![event::CATCHING_UP],
                requeue: WHILE_BUILDING,
            },
            Case {
                name: "Job done, registry not yet showing it",
                previous: Some(Phase::CatchingUp),
                versions: vec![active(1), version(2, VersionState::Building, 100, 100)],
                jobs: vec![job(2, JobState::Succeeded, &s2)],
                phase: Phase::Swapping,
                actions: vec![],
                events: vec![event::SWAPPING],
                requeue: SHORTLY,
            },
            Case {
                name: "swapped",
                previous: Some(Phase::Swapping),
                versions: vec![version(1, VersionState::Retained, 0, 0), active(2)],
                jobs: vec![job(2, JobState::Succeeded, &s2)],
                phase: Phase::Ready,
                actions: vec![],
                events: vec![event::READY],
                requeue: WHEN_READY,
            },
            Case {
                name: "Job failed",
                previous: Some(Phase::Building),
                versions: vec![active(1), version(2, VersionState::Building, 10, 100)],
                jobs: vec![job(2, failed(), &s2)],
                phase: Phase::Failed,
                actions: vec![],
                events: vec![event::REBUILD_FAILED],
                requeue: RETRY_STALLED,
            },
            Case {
                name: "back to a retained version: a rebuild like any other",
                previous: Some(Phase::Ready),
                versions: vec![version(2, VersionState::Retained, 100, 100), active(3)],
                jobs: vec![],
                phase: Phase::Building,
                actions: vec![Action::CreateJob { version: 2 }],
                events: vec![event::BUILDING],
                requeue: WHILE_BUILDING,
            },
        ];
        for case in cases {
            let previous = case.previous.map(|phase| ProjectionStatus {
                phase: Some(phase),
                active_version: Some(1),
                building: (phase != Phase::Ready).then(|| BuildProgress {
                    version: 2,
                    ..BuildProgress::default()
                }),
                ..ProjectionStatus::default()
            });
            let plan = run(
                &s2,
                previous.as_ref(),
                Observed {
                    versions: case.versions,
                    jobs: case.jobs,
                    ..Observed::default()
                },
            );
            assert_eq!(plan.status.phase, Some(case.phase), "{}", case.name);
            assert_eq!(plan.actions, case.actions, "{}", case.name);
            assert_eq!(reasons(&plan), case.events, "{}", case.name);
            assert_eq!(plan.requeue, case.requeue, "{}", case.name);
            assert_eq!(plan.status.observed_generation, Some(4));
        }
    }

    #[test]
    fn building_reports_progress_and_an_eta() {
        let s2 = spec(2);
        let plan = run(
            &s2,
            None,
            Observed {
                versions: vec![active(1), version(2, VersionState::Building, 250, 1000)],
                jobs: vec![job(2, JobState::Running, &s2)],
                ..Observed::default()
            },
        );
        let building = plan.status.building.clone().unwrap();
        assert_eq!(building.version, 2);
        assert_eq!(building.table, "orders_v2");
        assert_eq!(building.job.as_deref(), Some("orders-rebuild-v2"));
        assert_eq!((building.events_done, building.events_total), (250, 1000));
        // 250 events in 100 s: 750 to go at 2.5/s.
        assert_eq!(building.eta_seconds, Some(300));
        assert_eq!(plan.status.active_version, Some(1));
        assert_eq!(condition(&plan, READY).status, "False");
        assert_eq!(condition(&plan, RECONCILING).status, "True");
        assert_eq!(condition(&plan, RECONCILING).reason, reason::REBUILDING);
        assert!(
            condition(&plan, READY)
                .message
                .contains("version 1 keeps serving")
        );
    }

    #[test]
    fn a_failed_job_degrades_with_its_reason_and_the_old_version_serves() {
        let s2 = spec(2);
        let plan = run(
            &s2,
            None,
            Observed {
                versions: vec![active(1)],
                jobs: vec![job(2, failed(), &s2)],
                ..Observed::default()
            },
        );
        assert_eq!(plan.status.phase, Some(Phase::Failed));
        assert_eq!(plan.status.active_version, Some(1));
        assert!(
            plan.actions.is_empty(),
            "a failed Job is not retried at once"
        );
        let degraded = condition(&plan, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "BackoffLimitExceeded")
        );
        assert!(degraded.message.contains("version 1 keeps serving"));
        assert_eq!(condition(&plan, STALLED).status, "True");
        assert_eq!(condition(&plan, READY).status, "False");
        assert!(plan.events[0].warning);
        assert_eq!(plan.events[0].action, "RebuildFailed/v2");

        // Reported once: the next reconcile sees the same phase.
        let again = run(
            &s2,
            Some(&plan.status),
            Observed {
                versions: vec![active(1)],
                jobs: vec![job(2, failed(), &s2)],
                ..Observed::default()
            },
        );
        assert!(again.events.is_empty());
        assert_eq!(
            condition(&again, DEGRADED).last_transition_time,
            condition(&plan, DEGRADED).last_transition_time
        );
    }

    #[test]
    fn a_spec_fix_after_a_failed_job_replaces_the_job() {
        let old = spec(2);
        let mut fixed = spec(2);
        fixed.handlers.pop();
        let plan = run(
            &fixed,
            None,
            Observed {
                versions: vec![active(1)],
                jobs: vec![job(2, failed(), &old)],
                ..Observed::default()
            },
        );
        assert_eq!(
            plan.actions,
            vec![Action::DeleteJob {
                name: "orders-rebuild-v2".into()
            }]
        );
        assert_eq!(plan.status.phase, Some(Phase::Building));
        assert_eq!(
            condition(&plan, READY).reason,
            reason::PREVIOUS_REBUILD_STOPPING
        );
        assert_eq!(plan.requeue, SHORTLY);
    }

    #[test]
    fn a_version_change_during_a_rebuild_cancels_the_job_then_starts_the_new_one() {
        let s2 = spec(2);
        let s3 = spec(3);
        let observed = Observed {
            versions: vec![active(1), version(2, VersionState::Building, 10, 100)],
            jobs: vec![job(2, JobState::Running, &s2)],
            ..Observed::default()
        };
        let plan = run(&s3, None, observed.clone());
        assert_eq!(
            plan.actions,
            vec![Action::DeleteJob {
                name: "orders-rebuild-v2".into()
            }]
        );
        assert_eq!(plan.events[0].reason, event::REBUILD_CANCELLED);
        assert_eq!(plan.events[0].action, "Cancel/orders-rebuild-v2");
        assert_eq!(plan.status.phase, Some(Phase::Building));
        assert_eq!(plan.status.building.as_ref().unwrap().version, 3);

        // Its pods still stopping: wait, do not start a second rebuild.
        let mut stopping = observed.clone();
        stopping.jobs[0].deleting = true;
        let plan = run(&s3, Some(&plan.status), stopping);
        assert!(plan.actions.is_empty());
        assert!(plan.events.is_empty());

        // Gone: the new Job.
        let mut gone = observed;
        gone.jobs.clear();
        let plan = run(&s3, Some(&plan.status), gone);
        assert_eq!(plan.actions, vec![Action::CreateJob { version: 3 }]);
        assert_eq!(
            plan.status.building.unwrap().job.as_deref(),
            Some("orders-rebuild-v3")
        );
    }

    #[test]
    fn the_job_of_a_version_built_then_retired_is_replaced_on_swap_back() {
        let s2 = spec(2);
        let mut done = job(2, JobState::Succeeded, &s2);
        done.finished_at = Some(ago(7200));
        let plan = run(
            &s2,
            None,
            Observed {
                versions: vec![version(2, VersionState::Retained, 100, 100), active(3)],
                jobs: vec![done],
                ..Observed::default()
            },
        );
        assert_eq!(
            plan.actions,
            vec![Action::DeleteJob {
                name: "orders-rebuild-v2".into()
            }]
        );
    }

    #[test]
    fn ready_steady_state_does_nothing() {
        let s1 = spec(1);
        let observed = Observed {
            versions: vec![active(1)],
            lag: Some(Lag {
                seconds: 0.2,
                events: 3,
                halted: None,
            }),
            queries: vec![QueryCheck {
                name: "by_customer".into(),
                full_scan: false,
                cost: 4.2,
                plan: "Index Scan".into(),
            }],
            ..Observed::default()
        };
        let first = run(&s1, None, observed.clone());
        assert_eq!(reasons(&first), vec![event::READY]);
        let plan = run(&s1, Some(&first.status), observed);
        assert!(plan.actions.is_empty());
        assert!(plan.events.is_empty());
        assert_eq!(plan.status, first.status);
        assert_eq!(plan.requeue, WHEN_READY);
        assert_eq!(condition(&plan, READY).status, "True");
        assert_eq!(condition(&plan, RECONCILING).status, "False");
        assert_eq!(condition(&plan, STALLED).status, "False");
        assert_eq!(condition(&plan, DEGRADED).status, "False");
        assert_eq!(plan.status.lag_seconds, Some(0.2));
        assert_eq!(plan.status.lag_events, Some(3));
    }

    #[test]
    fn a_full_scan_is_reported_once_per_change() {
        let s1 = spec(1);
        let scan = |full_scan| Observed {
            versions: vec![active(1)],
            queries: vec![QueryCheck {
                name: "recent".into(),
                full_scan,
                cost: 40.0,
                plan: "Seq Scan on orders_v1".into(),
            }],
            ..Observed::default()
        };
        let first = run(&s1, None, scan(true));
        assert_eq!(
            reasons(&first),
            vec![event::READY, event::QUERY_SCANS_WHOLE_TABLE]
        );
        assert_eq!(first.events[1].action, "Explain/recent");
        assert!(first.events[1].warning);
        assert_eq!(condition(&first, DEGRADED).status, "False");
        let same = run(&s1, Some(&first.status), scan(true));
        assert!(same.events.is_empty());
        let fixed = run(&s1, Some(&same.status), scan(false));
        assert!(fixed.events.is_empty());
        let again = run(&s1, Some(&fixed.status), scan(true));
        assert_eq!(reasons(&again), vec![event::QUERY_SCANS_WHOLE_TABLE]);
    }

    #[test]
    fn expired_versions_are_dropped_when_no_rebuild_runs() {
        let s3 = spec(3);
        let mut old = version(1, VersionState::Retained, 0, 0);
        old.retired_at = Some(ago(25 * 3600));
        let kept = version(2, VersionState::Retained, 0, 0);
        let observed = Observed {
            versions: vec![old, kept, active(3)],
            ..Observed::default()
        };
        let plan = run(&s3, None, observed.clone());
        assert_eq!(
            plan.actions,
            vec![Action::DropExpired {
                cutoff: now() - chrono::Duration::hours(24)
            }]
        );
        assert_eq!(plan.status.retained.len(), 1);
        assert_eq!(plan.status.retained[0].version, 2);
        assert_eq!(plan.status.retained[0].retired_at, "2026-03-01T11:00:00Z");

        let mut busy = observed;
        busy.jobs.push(job(2, JobState::Running, &spec(2)));
        let plan = run(&s3, None, busy);
        assert!(
            !plan
                .actions
                .iter()
                .any(|a| matches!(a, Action::DropExpired { .. }))
        );
    }

    #[test]
    fn a_halted_projector_degrades_a_ready_projection() {
        let plan = run(
            &spec(1),
            None,
            Observed {
                versions: vec![active(1)],
                lag: Some(Lag {
                    seconds: 30.0,
                    events: 9,
                    halted: Some("missing /data/orderId".into()),
                }),
                ..Observed::default()
            },
        );
        let degraded = condition(&plan, DEGRADED);
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, reason::PROJECTION_HALTED);
        assert_eq!(condition(&plan, READY).status, "True");
    }

    #[test]
    fn the_query_deployment_is_scaled_and_shown_in_the_status() {
        let mut previous = run(
            &spec(1),
            None,
            Observed {
                versions: vec![active(1)],
                ..Observed::default()
            },
        )
        .status;
        previous.replicas = Some(4);
        previous.selector = Some("app=old".into());
        let read_path = ReadPath {
            deployment: "orders-query".into(),
            replicas: 7,
            selector: "app=orders-query".into(),
            measured: Some(scaling::Measured {
                signals: scaling::Signals::default(),
                scrape: scaling::scrape::Scrape {
                    at: now(),
                    pods: Default::default(),
                },
                history: Default::default(),
            }),
        };
        let plan = run(
            &spec(1),
            Some(&previous),
            Observed {
                versions: vec![active(1)],
                read_path: Some(read_path),
                ..Observed::default()
            },
        );
        assert_eq!(plan.status.replicas, Some(7));
        assert_eq!(plan.status.selector.as_deref(), Some("app=orders-query"));
        assert_eq!(
            plan.actions,
            vec![Action::Scale {
                deployment: "orders-query".into(),
                replicas: 4,
                why: "Bounds: no query pod could be measured; 7 replicas moved into [1, 4]".into(),
            }]
        );
        assert!(plan.memory.is_some());

        let gone = run(
            &spec(1),
            Some(&previous),
            Observed {
                versions: vec![active(1)],
                ..Observed::default()
            },
        );
        assert_eq!((gone.status.replicas, gone.status.selector), (None, None));
        assert!(gone.actions.is_empty());
        assert_eq!(gone.memory, None);
    }

    #[test]
    fn what_the_actions_did_is_recorded_in_the_status_and_events() {
        let mut plan = run(
            &spec(1),
            None,
            Observed {
                versions: vec![active(1)],
                ..Observed::default()
            },
        );
        plan.events.clear();
        plan.record(Outcome::Dropped {
            tables: vec!["orders_v0".into()],
        });
        plan.record(Outcome::Scaled {
            deployment: "orders-query".into(),
            from: 2,
            to: 3,
            why: "QueryRate: 250.0 queries/s at 100/s per replica".into(),
        });
        assert_eq!(plan.status.replicas, Some(3));
        assert_eq!(reasons(&plan), vec![event::VERSION_DROPPED, event::SCALED]);
        assert_eq!(plan.events[0].action, "Drop/orders_v0");
        assert_eq!(plan.events[1].action, "Scale/orders-query");
        assert_eq!(
            plan.events[1].note,
            "orders-query: 2 → 3 replicas (QueryRate: 250.0 queries/s at 100/s per replica)"
        );
    }

    #[test]
    fn problems_stall_and_keep_what_was_known() {
        let s1 = spec(1);
        let ready = run(
            &s1,
            None,
            Observed {
                versions: vec![active(1)],
                ..Observed::default()
            },
        );
        let plan = decide(
            Input {
                name: "orders",
                spec: &s1,
                generation: Some(5),
                previous: Some(&ready.status),
                now: now(),
            },
            Observation::Problem(Problem::Secret(SecretProblem::NotFound {
                secret: "orders-db".into(),
            })),
        );
        assert_eq!(plan.status.active_version, Some(1));
        assert_eq!(plan.status.phase, Some(Phase::Ready));
        assert_eq!(plan.status.observed_generation, Some(5));
        let stalled = condition(&plan, STALLED);
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", reason::SECRET_NOT_FOUND)
        );
        assert_eq!(condition(&plan, READY).status, "False");
        assert_eq!(condition(&plan, DEGRADED).status, "False");
        assert_eq!(plan.requeue, RETRY_STALLED);
        assert!(plan.events[0].warning);
        assert!(plan.actions.is_empty());

        let fresh = decide(
            Input {
                name: "orders",
                spec: &s1,
                generation: Some(1),
                previous: None,
                now: now(),
            },
            Observation::Problem(Problem::DatabaseUnreachable("refused".into())),
        );
        assert_eq!(fresh.status.phase, Some(Phase::Pending));
        assert_eq!(fresh.requeue, RETRY_TRANSIENT);
    }
}
