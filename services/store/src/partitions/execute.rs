//! Applies a partition plan. One run holds a session-level advisory lock per
//! table, so runs from several places never interleave; each step is its
//! own short transaction under a lock timeout, retried with backoff when a
//! lock is busy. A statement that wants a lock writers conflict with waits
//! only `exclusive_lock_timeout`, so writers queued behind it are never
//! stalled for longer than that (see `ApplyOptions`).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use eventplane_api::{PartitionPolicySpec, RetentionAction, quote_ident};
use eventplane_plan::{Bound, Calendar, PlanError, Step};
use sqlx::{Acquire, PgConnection, PgPool};

use super::catalog::{Relation, Snapshot, snapshot};
pub use super::{ApplyOptions, ApplyReport, PartitionError};

/// Constraint added to a new partition before it is attached so that the
/// attach can prove the rows fit without scanning them; dropped afterwards
/// because the partition constraint then says the same.
const BOUND_CHECK: &str = "ep_partition_bound";
/// First retry delay after a lock timeout; doubled per attempt.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest delay between attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often a waiting run checks whether the other run has finished.
const RUN_LOCK_POLL: Duration = Duration::from_millis(100);

/// `lock_not_available`: `lock_timeout` expired.
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// `deadlock_detected`: another session's locks crossed ours; retrying
/// after the other side finished succeeds.
const DEADLOCK_DETECTED: &str = "40P01";
/// `check_violation`: attaching found rows for the new partition in the
/// default partition, written after they were observed.
const CHECK_VIOLATION: &str = "23514";

/// Observes the table, plans, and (unless dry-running) runs the steps.
pub async fn apply(
    pool: &PgPool,
    spec: &PartitionPolicySpec,
    now: DateTime<Utc>,
    options: &ApplyOptions,
) -> Result<ApplyReport, PartitionError> {
    // Identifiers from the spec end up in DDL: nothing runs unless they passed.
    spec.validate().map_err(PlanError::InvalidSpec)?;
    // A dedicated connection that is closed, not returned to the pool, when
    // dropped: a cancelled run can never leave the advisory lock behind on
    // a pooled connection.
    let mut conn = pool.acquire().await?.detach();
    let key = format!("eventplane.partitions:{}", spec.table);
    lock_run(&mut conn, &key, options).await?;
    let result = run(&mut conn, spec, now, options).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(&key)
        .execute(&mut conn)
        .await;
    if let Err(error) = unlocked {
        // Closing the session releases the lock just as well.
        tracing::warn!(table = %spec.table, %error, "advisory unlock failed; closing the connection");
    }
    drop(conn);
    result
}

async fn lock_run(
    conn: &mut PgConnection,
    key: &str,
    options: &ApplyOptions,
) -> Result<(), PartitionError> {
    let started = tokio::time::Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
        if locked {
            return Ok(());
        }
        if started.elapsed() >= options.run_lock_wait {
            tracing::warn!(
                key,
                attempts,
                "another partition run holds the table's lock"
            );
            return Err(PartitionError::LockBusy);
        }
        tokio::time::sleep(RUN_LOCK_POLL).await;
    }
}

async fn run(
    conn: &mut PgConnection,
    spec: &PartitionPolicySpec,
    now: DateTime<Utc>,
    options: &ApplyOptions,
) -> Result<ApplyReport, PartitionError> {
    let dry_run = options.dry_run || spec.dry_run;
    let mut snap = snapshot(conn, spec).await?;
    let mut executed = Vec::new();
    let mut step_millis = Vec::new();

    if !dry_run && !spec.suspend && !snap.detach_pending.is_empty() {
        for (relation, bound) in snap.detach_pending.clone() {
            let started = std::time::Instant::now();
            let what = format!("finishing the detach of {}", relation.name);
            let finalize = [format!(
                "ALTER TABLE {} DETACH PARTITION {} FINALIZE",
                snap.parent.sql(),
                relation.sql()
            )];
            retry_statements(conn, options.patient(), &what, &finalize).await?;
            let finished =
                finish_retirement(conn, spec, now, &snap.parent, &relation, &bound, options)
                    .await?;
            executed.push(finished);
            step_millis.push(millis(started));
        }
        snap = snapshot(conn, spec).await?;
    }

    let plan = eventplane_plan::plan(spec, &snap.observed, now)?;
    if dry_run || plan.steps.is_empty() {
        return Ok(ApplyReport {
            plan,
            executed,
            step_millis,
            partitions_after: snap.observed.partitions,
            archived: snap.archived,
        });
    }

    let column = quote_ident(&spec.column);
    let mut default = snap.default.clone();
    for step in &plan.steps {
        let started = std::time::Instant::now();
        let ran = run_step(conn, &snap, &column, &mut default, step, options).await?;
        let elapsed_ms = millis(started);
        tracing::info!(table = %spec.table, step = %ran, elapsed_ms, "partition step applied");
        executed.push(ran);
        step_millis.push(elapsed_ms);
    }

    let after = snapshot(conn, spec).await?;
    Ok(ApplyReport {
        plan,
        executed,
        step_millis,
        partitions_after: after.observed.partitions,
        archived: after.archived,
    })
}

/// Completes what the interrupted run was retiring `relation` for, now that
/// it is detached: the drop, or the move into the archive schema (which
/// the archive step does before its detach, so it is normally done). Only
/// for a partition past retention: a detach someone else started is
/// finished and left at that.
async fn finish_retirement(
    conn: &mut PgConnection,
    spec: &PartitionPolicySpec,
    now: DateTime<Utc>,
    parent: &Relation,
    relation: &Relation,
    bound: &Bound,
    options: &ApplyOptions,
) -> Result<Step, PartitionError> {
    let name = relation.name.clone();
    let Some(retention) = &spec.retention else {
        return Ok(Step::Detach { name });
    };
    let calendar = Calendar::new(spec)?;
    let cutoff = calendar.shift(calendar.interval_start(now), -i64::from(retention.keep));
    if !matches!(bound, Bound::Range { to, .. } if *to <= cutoff) {
        return Ok(Step::Detach { name });
    }
    match (retention.action, retention.archive_schema.as_deref()) {
        (RetentionAction::Drop, _) => {
            let drop = [format!("DROP TABLE {}", relation.sql())];
            retry_statements(conn, options.patient(), "drop", &drop).await?;
            Ok(Step::Drop { name })
        }
        (RetentionAction::Archive, Some(schema)) => {
            if relation.schema != schema {
                let statements = archive_statements(parent, relation, schema, Some(bound));
                retry_statements(conn, options.patient(), "archive", &statements).await?;
            }
            Ok(Step::Archive {
                name,
                schema: schema.to_string(),
            })
        }
        _ => Ok(Step::Detach { name }),
    }
}

/// Moves `part` into `schema` and marks it as an archived partition of
/// `parent`.
fn archive_statements(
    parent: &Relation,
    part: &Relation,
    schema: &str,
    bound: Option<&Bound>,
) -> [String; 3] {
    let archived = Relation {
        schema: schema.to_string(),
        name: part.name.clone(),
    };
    [
        // Takes no table lock; made here so that an archive schema needs no
        // step of its own outside the policy.
        format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema)),
        format!(
            "ALTER TABLE {} SET SCHEMA {}",
            part.sql(),
            quote_ident(schema)
        ),
        format!(
            "COMMENT ON TABLE {} IS {}",
            archived.sql(),
            quote_literal(&archive_comment(parent, bound))
        ),
    ]
}

/// Runs one step and returns the step that actually ran.
async fn run_step(
    conn: &mut PgConnection,
    snap: &Snapshot,
    column: &str,
    default: &mut Option<Relation>,
    step: &Step,
    options: &ApplyOptions,
) -> Result<Step, PartitionError> {
    let parent = &snap.parent;
    let in_parent_schema = |name: &str| Relation {
        schema: parent.schema.clone(),
        name: name.to_string(),
    };
    let existing = |name: &str| {
        snap.relations
            .get(name)
            .cloned()
            .unwrap_or_else(|| in_parent_schema(name))
    };
    // Attaching next to a default partition locks it ACCESS EXCLUSIVE (and
    // scans it): writers whose rows land there would queue behind the wait.
    let attach_patience = |default: &Option<Relation>| {
        if default.is_some() {
            options.brief()
        } else {
            options.patient()
        }
    };
    let what = format!("{step}");
    match step {
        Step::CreateDefault { name } => {
            let part = in_parent_schema(name);
            let statements = [
                create_like(&part, parent),
                format!(
                    "ALTER TABLE {} ATTACH PARTITION {} DEFAULT",
                    parent.sql(),
                    part.sql()
                ),
            ];
            retry_statements(conn, options.patient(), &what, &statements).await?;
            *default = Some(part);
            Ok(step.clone())
        }
        Step::Create { name, from, to } => {
            let part = in_parent_schema(name);
            let create = create_statements(&part, parent, column, *from, *to);
            let result = retry_statements(conn, attach_patience(default), &what, &create).await;
            match (result, default.as_ref()) {
                // Rows for this range reached the default partition after
                // they were observed: move them, as the plan would have.
                (Err(PartitionError::Database(e)), Some(default_part))
                    if has_state(&e, CHECK_VIOLATION) =>
                {
                    let moved = Step::MoveFromDefault {
                        name: name.clone(),
                        from: *from,
                        to: *to,
                    };
                    let what = format!("{moved}");
                    let statements = move_statements(
                        &part,
                        parent,
                        default_part,
                        &snap.columns,
                        column,
                        *from,
                        *to,
                    );
                    retry_statements(conn, options.brief(), &what, &statements).await?;
                    Ok(moved)
                }
                (result, _) => result.map(|()| step.clone()),
            }
        }
        Step::MoveFromDefault { name, from, to } => {
            let part = in_parent_schema(name);
            let Some(default_part) = default.as_ref() else {
                // The default partition vanished since it was observed:
                // nothing to move, a plain create does.
                let create = create_statements(&part, parent, column, *from, *to);
                retry_statements(conn, options.patient(), &what, &create).await?;
                return Ok(Step::Create {
                    name: name.clone(),
                    from: *from,
                    to: *to,
                });
            };
            let statements = move_statements(
                &part,
                parent,
                default_part,
                &snap.columns,
                column,
                *from,
                *to,
            );
            retry_statements(conn, options.brief(), &what, &statements).await?;
            Ok(step.clone())
        }
        Step::Detach { name } => {
            let part = existing(name);
            detach(conn, parent, &part, default.is_some(), options, &what).await?;
            Ok(step.clone())
        }
        Step::Archive { name, schema } => {
            let part = existing(name);
            let archive = Relation {
                schema: schema.clone(),
                name: part.name.clone(),
            };
            if part.schema != *schema {
                let bound = snap
                    .observed
                    .partitions
                    .iter()
                    .find(|p| p.name == *name)
                    .map(|p| &p.bound);
                // Moved while still attached, so a run cut short between
                // the move and the detach leaves a partition the next run
                // still sees, plans again and finishes. The partition is
                // locked ACCESS EXCLUSIVE: late writers to its range and
                // readers of the parent would queue behind the wait.
                let statements = archive_statements(parent, &part, schema, bound);
                retry_statements(conn, options.brief(), &what, &statements).await?;
            }
            detach(conn, parent, &archive, default.is_some(), options, &what).await?;
            Ok(step.clone())
        }
        Step::Drop { name } => {
            let part = existing(name);
            detach(conn, parent, &part, default.is_some(), options, &what).await?;
            // A transaction of its own: once detached, the table is locked
            // by nobody else, and its files are released at this commit.
            let drop = [format!("DROP TABLE {}", part.sql())];
            retry_statements(conn, options.patient(), &what, &drop).await?;
            Ok(step.clone())
        }
    }
}

/// Detaches `part`: concurrently (no ACCESS EXCLUSIVE lock on the parent)
/// unless the table has a default partition, which Postgres does not allow;
/// then the parent is locked ACCESS EXCLUSIVE for a catalog change only,
/// waiting at most `exclusive_lock_timeout` for it.
async fn detach(
    conn: &mut PgConnection,
    parent: &Relation,
    part: &Relation,
    has_default: bool,
    options: &ApplyOptions,
    what: &str,
) -> Result<(), PartitionError> {
    let patience = if has_default {
        options.brief()
    } else {
        options.patient()
    };
    let mut backoff = Backoff::new(patience, what);
    loop {
        match detach_once(conn, parent, part, has_default, options).await {
            Ok(()) => return Ok(()),
            Err(error) => backoff.after(error).await?,
        }
    }
}

async fn detach_once(
    conn: &mut PgConnection,
    parent: &Relation,
    part: &Relation,
    has_default: bool,
    options: &ApplyOptions,
) -> Result<(), sqlx::Error> {
    // A concurrent detach cut short by the lock timeout leaves the
    // partition pending; only FINALIZE can finish it.
    let pending: Option<bool> = sqlx::query_scalar(
        "SELECT inhdetachpending FROM pg_inherits
      WHERE inhrelid = to_regclass($1) AND inhparent = to_regclass($2)",
    )
    .bind(part.sql())
    .bind(parent.sql())
    .fetch_optional(&mut *conn)
    .await?;
    match pending {
        // Already detached (by a run that stopped before reporting).
        None => Ok(()),
        Some(true) => {
            let sql = format!(
                "ALTER TABLE {} DETACH PARTITION {} FINALIZE",
                parent.sql(),
                part.sql()
            );
            in_transaction(conn, options.lock_timeout, &[sql]).await
        }
        Some(false) if has_default => {
            let sql = format!(
                "ALTER TABLE {} DETACH PARTITION {}",
                parent.sql(),
                part.sql()
            );
            in_transaction(conn, options.exclusive_lock_timeout, &[sql]).await
        }
        Some(false) => {
            // CONCURRENTLY cannot run inside a transaction block, so the
            // timeout is set for the session and reset afterwards. Its
            // waits (for the parent's SHARE UPDATE EXCLUSIVE lock, then for
            // transactions that still see the partition) queue no writer.
            let sql = format!(
                "ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY",
                parent.sql(),
                part.sql()
            );
            sqlx::query(sqlx::AssertSqlSafe(set_lock_timeout(
                options.lock_timeout,
                false,
            )))
            .execute(&mut *conn)
            .await?;
            let result = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await;
            sqlx::query("RESET lock_timeout")
                .execute(&mut *conn)
                .await?;
            result.map(|_| ())
        }
    }
}

/// The comment that marks a table as this parent's archived partition, with
/// its bounds: the catalog keeps no bounds for a detached table, and the
/// archive listing reads them back from here.
pub(crate) fn archive_comment(parent: &Relation, bound: Option<&Bound>) -> String {
    let range = match bound {
        Some(Bound::Range { from, to }) => format!(
            " [{}, {})",
            from.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            to.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        ),
        _ => String::new(),
    };
    format!("{}{range}", archive_comment_prefix(parent))
}

/// What every archive comment of `parent` starts with.
pub(crate) fn archive_comment_prefix(parent: &Relation) -> String {
    format!("eventplane archive of {}.{}:", parent.schema, parent.name)
}

/// A string literal: the comment holds catalog names, which may contain
/// quotes.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn create_like(part: &Relation, parent: &Relation) -> String {
    // INCLUDING INDEXES copies the parent's partitioned indexes as plain
    // indexes (PG 11+), which ATTACH then adopts instead of building its own
    // while it holds its locks.
    format!(
        "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS INCLUDING INDEXES)",
        part.sql(),
        parent.sql()
    )
}

fn bound_check(part: &Relation, column: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    // IS NOT NULL too: the partition constraint includes it, and ATTACH only
    // skips its scan when existing constraints imply all of it.
    format!(
        "ALTER TABLE {} ADD CONSTRAINT {BOUND_CHECK} CHECK ({column} IS NOT NULL AND {column} >= {} AND {column} < {})",
        part.sql(),
        literal(from),
        literal(to)
    )
}

fn attach(
    parent: &Relation,
    part: &Relation,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> [String; 2] {
    [
        format!(
            "ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})",
            parent.sql(),
            part.sql(),
            literal(from),
            literal(to)
        ),
        format!("ALTER TABLE {} DROP CONSTRAINT {BOUND_CHECK}", part.sql()),
    ]
}

fn create_statements(
    part: &Relation,
    parent: &Relation,
    column: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<String> {
    let mut statements = vec![
        create_like(part, parent),
        bound_check(part, column, from, to),
    ];
    statements.extend(attach(parent, part, from, to));
    statements
}

fn move_statements(
    part: &Relation,
    parent: &Relation,
    default: &Relation,
    columns: &[String],
    column: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<String> {
    // Explicit columns: the default partition may order its columns
    // differently from the parent (and from a table made LIKE the parent).
    let columns = columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let mut statements = vec![
        // Taken first and under the lock timeout: nothing may route a row
        // into the default partition between the move and the attach.
        format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", default.sql()),
        create_like(part, parent),
        // Added while the table is empty so it costs no scan; the moved rows
        // are checked as they are inserted.
        bound_check(part, column, from, to),
        format!(
            "WITH moved AS (DELETE FROM {} WHERE {column} >= {} AND {column} < {} RETURNING {columns}) \
             INSERT INTO {} ({columns}) SELECT {columns} FROM moved",
            default.sql(),
            literal(from),
            literal(to),
            part.sql()
        ),
    ];
    statements.extend(attach(parent, part, from, to));
    statements
}

/// A timestamp literal we rendered ourselves: partition bounds in DDL
/// cannot be bind parameters. RFC 3339 in UTC has no quote to escape.
fn literal(t: DateTime<Utc>) -> String {
    format!(
        "'{}'::timestamptz",
        t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    )
}

fn set_lock_timeout(timeout: Duration, local: bool) -> String {
    format!(
        "SET {}lock_timeout = '{}ms'",
        if local { "LOCAL " } else { "" },
        timeout.as_millis().max(1)
    )
}

async fn in_transaction(
    conn: &mut PgConnection,
    timeout: Duration,
    statements: &[String],
) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(set_lock_timeout(timeout, true)))
        .execute(&mut *tx)
        .await?;
    for sql in statements {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

fn millis(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn has_state(error: &sqlx::Error, state: &str) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == state))
}

/// How long a statement waits for its lock, and how often it is tried.
#[derive(Clone, Copy, Debug)]
struct Patience {
    timeout: Duration,
    attempts: u32,
}

impl ApplyOptions {
    /// For statements whose lock requests writers pass.
    fn patient(&self) -> Patience {
        Patience {
            timeout: self.lock_timeout,
            attempts: self.max_attempts,
        }
    }

    /// For statements that writers would queue behind while they wait.
    fn brief(&self) -> Patience {
        Patience {
            timeout: self.exclusive_lock_timeout,
            attempts: self.exclusive_attempts,
        }
    }
}

/// Bounded retries with exponential backoff and jitter for statements that
/// fail on a busy lock.
struct Backoff<'a> {
    patience: Patience,
    what: &'a str,
    attempt: u32,
    delay: Duration,
}

impl<'a> Backoff<'a> {
    fn new(patience: Patience, what: &'a str) -> Self {
        Backoff {
            patience,
            what,
            attempt: 1,
            delay: BACKOFF_START,
        }
    }

    /// Handles a failed attempt: waits and returns `Ok` when another attempt
    /// is due, or the error to give up with.
    async fn after(&mut self, error: sqlx::Error) -> Result<(), PartitionError> {
        if !is_busy(&error) {
            return Err(error.into());
        }
        let attempts = self.patience.attempts.max(1);
        if self.attempt >= attempts {
            tracing::warn!(step = self.what, attempts, "lock still busy; giving up");
            return Err(PartitionError::LockBusy);
        }
        tracing::info!(
            step = self.what,
            attempt = self.attempt,
            "lock busy; retrying"
        );
        tokio::time::sleep(self.delay + jitter(self.delay)).await;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        self.attempt += 1;
        Ok(())
    }
}

/// Runs `statements` in one transaction, retried while a lock is busy.
async fn retry_statements(
    conn: &mut PgConnection,
    patience: Patience,
    what: &str,
    statements: &[String],
) -> Result<(), PartitionError> {
    let mut backoff = Backoff::new(patience, what);
    loop {
        match in_transaction(conn, patience.timeout, statements).await {
            Ok(()) => return Ok(()),
            Err(error) => backoff.after(error).await?,
        }
    }
}

fn is_busy(error: &sqlx::Error) -> bool {
    has_state(error, LOCK_NOT_AVAILABLE) || has_state(error, DEADLOCK_DETECTED)
}

/// Up to half of `delay`, so runs that met the same lock do not retry in
/// step.
fn jitter(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    delay.mul_f64(f64::from(nanos % 1000) / 2000.0)
}
