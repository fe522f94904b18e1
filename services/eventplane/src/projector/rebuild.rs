//! Rebuilds: a projection's new version is built beside the active one and
//! swapped in atomically.
//!
//! 1. Load: the new version gets its own table (`<table>_v<N>`, primary key
//!    only) and its own checkpoint (`<name>@v<N>`), and the ordinary
//!    projector batch replays the whole log into it in large batches —
//!    the same mapping, folding and bulk statements as the live path.
//! 2. Secondary indexes are created after the load, then the table is
//!    analyzed.
//! 3. Verify: events applied plus events dead-lettered must equal the
//!    events of the projection's types up to the checkpoint.
//! 4. Swap, in one short transaction: lock the live checkpoint (the live
//!    projector pauses), catch the new version up under that lock, point the
//!    stable view at the new table, mark the old version retained, and hand
//!    the live checkpoint the new version's position. The live projector
//!    then follows the new active version. Readers of the stable name see
//!    the old view or the new one; the view lock is taken with a short
//!    `lock_timeout` and the whole swap retried if readers hold it.
//!
//! Setting `spec.version` back to a retained version swaps it back: it is
//! caught up from where it stopped, then swapped the same way (a Kafka-fed
//! projection's retained version is built again instead: its partitions
//! stopped at different places in the log). A session
//! advisory lock makes sure two rebuilds of one projection never run at
//! once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use eventplane_api::{ProjectionSpec, quote_ident};
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use eventplane_api::VersionState;
use eventplane_plan::content;
use eventplane_store::batch::{
    BatchOutcome, Prepared, apply_batch, apply_locked, horizon, prepare, read_tail, write,
};
use eventplane_store::checkpoints::{self, version_checkpoint};
use eventplane_store::kafka_offsets;
use eventplane_store::replay::{self, Replayed};
use eventplane_store::{Projection, versions};

use crate::invalidation::{Invalidator, Scope};
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct RebuildOptions {
    /// Events replayed per batch.
    pub batch_size: i64,
    /// Retained versions older than this are dropped after a swap.
    pub retain_previous: Duration,
    /// Longest the swap waits for the view's lock before it backs off and
    /// retries; readers queue behind a waiting swap, so this bounds their
    /// wait.
    pub swap_lock_timeout: Duration,
    pub swap_attempts: u32,
}

impl RebuildOptions {
    pub fn from_spec(spec: &ProjectionSpec) -> Self {
        RebuildOptions {
            batch_size: i64::from(spec.rebuild.batch_size.max(1)),
            retain_previous: Duration::from_secs(
                u64::from(spec.rebuild.retain_previous_hours) * 3600,
            ),
            swap_lock_timeout: Duration::from_millis(50),
            swap_attempts: 40,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("a rebuild of projection {0:?} is already running")]
    AlreadyRunning(String),
    #[error("version {version} halted on an event: {reason}")]
    Halted { version: u32, reason: String },
    #[error(
        "verification failed: {applied} events applied and dead-lettered, but the log holds {expected} up to the checkpoint"
    )]
    Verify { applied: i64, expected: i64 },
    #[error("readers held the view through {0} swap attempts; try again")]
    SwapContended(u32),
    #[error("stored spec of version {0} is unreadable: {1}")]
    StoredSpec(u32, String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RebuildReport {
    pub projection: String,
    pub version: u32,
    pub table: String,
    /// The version was active already: nothing was done.
    pub already_active: bool,
    /// A retained version was caught up and swapped back.
    pub swapped_back: bool,
    pub events_loaded: i64,
    /// The log up to the horizon was replayed by one set-based query (see
    /// `eventplane_store::replay`), not batch by batch.
    pub set_based: bool,
    pub load_seconds: f64,
    pub events_per_second: f64,
    pub index_seconds: f64,
    pub swap_attempts: u32,
    /// From taking the view's lock to commit: what a reader could wait.
    pub swap_lock_ms: f64,
    pub dropped_versions: Vec<String>,
}

const LOCK_NOT_AVAILABLE: &str = "55P03";

/// Builds `projection.spec.version` and swaps it in (see the module docs).
pub async fn run(
    pool: &PgPool,
    projection: &Projection,
    redis: Option<crate::redis_conn::Redis>,
    metrics: Arc<Metrics>,
    options: &RebuildOptions,
) -> Result<RebuildReport, RebuildError> {
    // A connection of its own, closed rather than pooled when dropped: a
    // cancelled rebuild never leaves the lock behind.
    let mut lock = pool.acquire().await?.detach();
    let key = format!("eventplane.rebuild:{}", projection.name);
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(&key)
        .fetch_one(&mut lock)
        .await?;
    if !locked {
        return Err(RebuildError::AlreadyRunning(projection.name.clone()));
    }
    let result = run_locked(pool, projection, options).await;
    drop(lock);
    let mut report = result?;
    if !report.already_active {
        if let Some(redis) = redis {
            let scope = Scope::new(&eventplane_store::db::instance_id(pool).await?);
            Invalidator::new(scope, &projection.name, redis, metrics)
                .invalidate_all()
                .await;
        }
        let cutoff =
            Utc::now() - chrono::Duration::from_std(options.retain_previous).unwrap_or_default();
        report.dropped_versions = versions::drop_expired(pool, &projection.name, cutoff).await?;
    }
    tracing::info!(
        projection = %report.projection,
        version = report.version,
        events = report.events_loaded,
        rate = report.events_per_second as u64,
        swap_lock_ms = report.swap_lock_ms,
        "rebuild swapped in"
    );
    Ok(report)
}

async fn run_locked(
    pool: &PgPool,
    projection: &Projection,
    options: &RebuildOptions,
) -> Result<RebuildReport, RebuildError> {
    let name = projection.name.clone();
    let version = projection.spec.version;
    let mut report = RebuildReport {
        projection: name.clone(),
        version,
        table: projection.table.clone(),
        already_active: false,
        swapped_back: false,
        events_loaded: 0,
        set_based: false,
        load_seconds: 0.0,
        events_per_second: 0.0,
        index_seconds: 0.0,
        swap_attempts: 0,
        swap_lock_ms: 0.0,
        dropped_versions: Vec::new(),
    };
    let mut conn = pool.acquire().await?;
    let spec = match versions::get(&mut conn, &name, version).await? {
        Some(row) if row.state == VersionState::Active => {
            report.already_active = true;
            return Ok(report);
        }
        // A retained version of a Kafka-fed projection cannot be caught up
        // from one place in the log: its partitions stood at different
        // places when it was replaced. It is built again instead.
        Some(row)
            if row.state == VersionState::Retained && projection.spec.kafka_topic().is_none() =>
        {
            report.swapped_back = true;
            row.spec()
                .map_err(|e| RebuildError::StoredSpec(version, e.to_string()))?
        }
        Some(row)
            if row.state != VersionState::Retained
                && row
                    .spec()
                    .is_ok_and(|stored| content::same_rows(&stored, &projection.spec))
                && resumable(&mut conn, projection).await? =>
        {
            // A previous attempt stopped part-way: its table and checkpoint
            // moved together, so the load resumes where it stopped.
            projection.spec.clone()
        }
        stale => {
            if stale.is_some() {
                discard(&mut conn, projection).await?;
            }
            start(&mut conn, projection).await?;
            projection.spec.clone()
        }
    };
    drop(conn);
    let mut build = Arc::new(Projection::build(name.clone(), spec));

    let started = Instant::now();
    (report.events_loaded, report.set_based) = load(pool, &mut build, options).await?;
    report.load_seconds = started.elapsed().as_secs_f64();
    report.events_per_second = report.events_loaded as f64 / report.load_seconds.max(1e-9);

    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    sqlx::query(AssertSqlSafe(format!(
        "ALTER TABLE {} SET LOGGED",
        quote_ident(&build.table)
    )))
    .execute(&mut *conn)
    .await?;
    for statement in eventplane_plan::index_sql(&build.spec, &build.table) {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(AssertSqlSafe(format!(
        "ANALYZE {}",
        quote_ident(&build.table)
    )))
    .execute(&mut *conn)
    .await?;
    report.index_seconds = started.elapsed().as_secs_f64();
    verify(&mut conn, &build).await?;
    drop(conn);

    let (attempts, lock_ms) = swap(pool, &mut build, options).await?;
    report.swap_attempts = attempts;
    report.swap_lock_ms = lock_ms;
    Ok(report)
}

/// Registers the new version and creates its table (primary key only) and
/// its checkpoint.
async fn start(conn: &mut PgConnection, projection: &Projection) -> Result<(), RebuildError> {
    let build = Projection::build(projection.name.clone(), projection.spec.clone());
    // Unlogged while it loads: the bulk replay writes no WAL. It is made
    // logged before the swap; a crash before that empties it, which
    // `run_locked` detects and answers by starting over.
    let create_table = eventplane_plan::create_table_sql(&build.spec, &build.table)
        .remove(0)
        .replacen("CREATE TABLE", "CREATE UNLOGGED TABLE", 1);
    sqlx::query(AssertSqlSafe(create_table))
        .execute(&mut *conn)
        .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = ANY($1)")
        .bind(build.spec.event_types())
        .fetch_one(&mut *conn)
        .await?;
    versions::register_build(&mut *conn, &build, total).await?;
    checkpoints::reset(&mut *conn, &build.checkpoint).await?;
    Ok(())
}

/// Whether a half-built version can be resumed: its unlogged table still
/// holds what its checkpoint says (a server crash empties unlogged tables).
async fn resumable(conn: &mut PgConnection, projection: &Projection) -> Result<bool, RebuildError> {
    let build = Projection::build(projection.name.clone(), projection.spec.clone());
    let applied = checkpoints::get(&mut *conn, &build.checkpoint)
        .await?
        .map(|row| row.applied);
    let empty: bool = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT NOT EXISTS (SELECT 1 FROM {})",
        quote_ident(&build.table)
    )))
    .fetch_one(&mut *conn)
    .await?;
    Ok(applied.is_some() && !(empty && applied > Some(0)))
}

/// Drops a half-built version made from another spec, or one a crash
/// emptied.
async fn discard(conn: &mut PgConnection, projection: &Projection) -> Result<(), RebuildError> {
    let build = Projection::build(projection.name.clone(), projection.spec.clone());
    sqlx::query(AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {}",
        quote_ident(&build.table)
    )))
    .execute(&mut *conn)
    .await?;
    versions::forget(&mut *conn, &build.name, build.spec.version).await?;
    checkpoints::delete_dead_letters(&mut *conn, &build.checkpoint).await?;
    Ok(())
}

/// Replays the log into the new version until it reaches the horizon;
/// returns the events applied, and whether a set-based replay did the
/// bulk of it. A version with nothing applied yet is replayed by one
/// set-based query where its spec and events allow; otherwise, and for
/// what was appended since, everything below the horizon seen at the start
/// is read and mapped one batch ahead of the writes (two cores at work
/// instead of one), and ordinary batches then take it up to the current
/// horizon.
async fn load(
    pool: &PgPool,
    build: &mut Arc<Projection>,
    options: &RebuildOptions,
) -> Result<(i64, bool), RebuildError> {
    let mut loaded = 0;
    let mut set_based = false;
    match replay::load(pool, build).await? {
        Replayed::Loaded { events, .. } => {
            versions::add_progress(pool, &build.name, build.spec.version, events).await?;
            loaded = events;
            set_based = true;
        }
        Replayed::Unsuitable(why) => {
            tracing::info!(projection = %build.name, version = build.spec.version, %why, "replaying batch by batch");
        }
    }
    loaded += prefetched_load(pool, build, options).await?;
    loop {
        let outcome = apply_batch(pool, build, options.batch_size).await?;
        loaded += progress(pool, build, &outcome).await?;
        if !outcome.full {
            return Ok((loaded, set_based));
        }
    }
}

/// Records a batch's progress; a halt ends the rebuild.
async fn progress(
    pool: &PgPool,
    build: &Projection,
    outcome: &BatchOutcome,
) -> Result<i64, RebuildError> {
    if let Some(reason) = &outcome.halted {
        return Err(RebuildError::Halted {
            version: build.spec.version,
            reason: reason.clone(),
        });
    }
    versions::add_progress(pool, &build.name, build.spec.version, outcome.events as i64).await?;
    Ok(outcome.events as i64)
}

async fn prefetched_load(
    pool: &PgPool,
    build: &Arc<Projection>,
    options: &RebuildOptions,
) -> Result<i64, RebuildError> {
    let mut conn = pool.acquire().await?;
    let horizon = horizon(&mut conn).await?;
    let start = checkpoints::get(&mut *conn, &build.checkpoint)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?
        .at();

    // The reader runs one batch ahead; the channel's bound keeps it there.
    let (ahead, mut batches) = tokio::sync::mpsc::channel::<sqlx::Result<Prepared>>(1);
    let reader = {
        let build = build.clone();
        let limit = options.batch_size;
        tokio::spawn(async move {
            let types = build.spec.event_types();
            let mut after = start;
            loop {
                let events = match read_tail(&mut conn, after, horizon, &types, limit).await {
                    Ok(events) => events,
                    Err(err) => {
                        let _ = ahead.send(Err(err)).await;
                        return;
                    }
                };
                let prepared = prepare(&build, &events, limit);
                after = prepared.next_read(after);
                let last = !prepared.full || prepared.halted();
                if ahead.send(Ok(prepared)).await.is_err() || last {
                    return;
                }
            }
        })
    };

    let mut expected = start;
    let mut loaded = 0;
    while let Some(prepared) = batches.recv().await {
        let prepared = prepared?;
        let mut tx = pool.begin().await?;
        let locked = checkpoints::lock(&mut tx, &build.checkpoint)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        if locked.at() != expected {
            // Only this rebuild writes its checkpoint (the advisory lock);
            // anything else means the batches read ahead are stale.
            reader.abort();
            return Err(RebuildError::Database(sqlx::Error::Protocol(format!(
                "checkpoint of {} moved under the rebuild",
                build.checkpoint
            ))));
        }
        let outcome = write(&mut tx, build, expected, horizon, prepared).await?;
        tx.commit().await?;
        loaded += progress(pool, build, &outcome).await?;
        expected = outcome.checkpoint;
        if !outcome.full {
            break;
        }
    }
    let _ = reader.await;
    Ok(loaded)
}

/// Every event of the projection's types up to the checkpoint was applied
/// or dead-lettered, none twice: the checkpoint's count (which moves for
/// both) equals the log's.
async fn verify(conn: &mut PgConnection, build: &Projection) -> Result<(), RebuildError> {
    let (applied, expected) =
        checkpoints::accounted(conn, &build.checkpoint, &build.spec.event_types()).await?;
    if applied != expected {
        return Err(RebuildError::Verify { applied, expected });
    }
    Ok(())
}

/// The swap (see the module docs). Returns the attempts it took and how
/// long the last one held the view's lock, in milliseconds.
async fn swap(
    pool: &PgPool,
    build: &mut Arc<Projection>,
    options: &RebuildOptions,
) -> Result<(u32, f64), RebuildError> {
    let mut backoff = Duration::from_millis(10);
    for attempt in 1..=options.swap_attempts {
        match swap_once(pool, build, options).await {
            Ok(lock_ms) => return Ok((attempt, lock_ms)),
            Err(RebuildError::Database(err))
                if err.as_database_error().and_then(|e| e.code()).as_deref()
                    == Some(LOCK_NOT_AVAILABLE) =>
            {
                tracing::info!(projection = %build.name, attempt, "readers hold the view; retrying the swap");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(err) => return Err(err),
        }
    }
    Err(RebuildError::SwapContended(options.swap_attempts))
}

async fn swap_once(
    pool: &PgPool,
    build: &mut Arc<Projection>,
    options: &RebuildOptions,
) -> Result<f64, RebuildError> {
    let name = build.name.clone();
    let mut tx = pool.begin().await?;
    sqlx::query(AssertSqlSafe(format!(
        "SET LOCAL lock_timeout = '{}ms'",
        options.swap_lock_timeout.as_millis().max(1)
    )))
    .execute(&mut *tx)
    .await?;
    // Freeze the live projection where it is.
    let live = checkpoints::lock(&mut tx, &name)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    // Catch the new version up under that lock.
    loop {
        let outcome = apply_locked(&mut tx, build, options.batch_size).await?;
        if let Some(reason) = outcome.halted {
            return Err(RebuildError::Halted {
                version: build.spec.version,
                reason,
            });
        }
        if !outcome.full {
            break;
        }
    }
    let old = versions::active(&mut tx, &name).await?;
    let lock_taken = Instant::now();
    versions::point_view(&mut tx, &build.spec.table, &build.table).await?;
    let old_version = old.as_ref().map(|row| row.version as u32);
    if let Some(old) = old_version {
        // The retired version keeps the live position and its dead
        // letters, so it can be caught up and swapped back later.
        let retired = version_checkpoint(&name, old);
        checkpoints::set(&mut tx, &retired, &live).await?;
        checkpoints::move_dead_letters(&mut tx, &name, &retired).await?;
    }
    versions::swap(&mut tx, &name, old_version, build.spec.version).await?;
    // The live checkpoint takes the new version's position; the live
    // projector resumes from there on the new table.
    checkpoints::copy(&mut tx, &build.checkpoint, &name).await?;
    checkpoints::move_dead_letters(&mut tx, &build.checkpoint, &name).await?;
    // Kafka-fed batches skip what the new version holds from now on.
    kafka_offsets::restart_counts(&mut tx, &name).await?;
    tx.commit().await?;
    Ok(lock_taken.elapsed().as_secs_f64() * 1000.0)
}
