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
//! caught up from where it stopped, then swapped the same way. A session
//! advisory lock makes sure two rebuilds of one projection never run at
//! once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use eventplane_spec::{ProjectionSpec, quote_ident};
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use crate::invalidation::Invalidator;
use crate::metrics::Metrics;
use crate::projections::Projection;
use crate::projector::batch::{
    BatchOutcome, Checkpoint, Prepared, apply_batch, apply_locked, horizon, prepare, read_tail,
    write,
};
use crate::versions;

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
    redis: Option<redis::aio::ConnectionManager>,
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
            Invalidator::new(&projection.name, redis, metrics)
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
        load_seconds: 0.0,
        events_per_second: 0.0,
        index_seconds: 0.0,
        swap_attempts: 0,
        swap_lock_ms: 0.0,
        dropped_versions: Vec::new(),
    };
    let mut conn = pool.acquire().await?;
    let spec = match versions::get(&mut conn, &name, version).await? {
        Some(row) if row.state == "active" => {
            report.already_active = true;
            return Ok(report);
        }
        Some(row) if row.state == "retained" => {
            report.swapped_back = true;
            row.spec()
                .map_err(|e| RebuildError::StoredSpec(version, e.to_string()))?
        }
        Some(row)
            if content(&row.spec)
                == content(&serde_json::to_value(&projection.spec).expect("specs serialize"))
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
    report.events_loaded = load(pool, &mut build, options).await?;
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
    for statement in eventplane_spec::index_sql(&build.spec, &build.table) {
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
    let create_table = eventplane_spec::create_table_sql(&build.spec, &build.table)
        .remove(0)
        .replacen("CREATE TABLE", "CREATE UNLOGGED TABLE", 1);
    sqlx::query(AssertSqlSafe(create_table))
        .execute(&mut *conn)
        .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = ANY($1)")
        .bind(build.spec.event_types())
        .fetch_one(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO projection_versions (projection, version, table_name, spec, state, events_total) \
         VALUES ($1, $2, $3, $4, 'building', $5)",
    )
    .bind(&build.name)
    .bind(build.spec.version as i32)
    .bind(&build.table)
    .bind(sqlx::types::Json(&build.spec))
    .bind(total)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection) VALUES ($1) \
         ON CONFLICT (projection) DO UPDATE SET tx_id = '0', position = 0, applied = 0, halted_reason = NULL",
    )
    .bind(&build.checkpoint)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The parts of a spec that decide a version's rows: a half-built version
/// is resumed only if these are unchanged (scaling, caching, queries and the
/// like may change while it loads).
fn content(spec: &serde_json::Value) -> serde_json::Value {
    let mut spec = spec.clone();
    if let Some(fields) = spec.as_object_mut() {
        for operational in [
            "scaling",
            "reclaimPolicy",
            "database",
            "rebuild",
            "cache",
            "queries",
        ] {
            fields.remove(operational);
        }
    }
    spec
}

/// Whether a half-built version can be resumed: its unlogged table still
/// holds what its checkpoint says (a server crash empties unlogged tables).
async fn resumable(conn: &mut PgConnection, projection: &Projection) -> Result<bool, RebuildError> {
    let build = Projection::build(projection.name.clone(), projection.spec.clone());
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT applied FROM projection_checkpoints WHERE projection = $1")
            .bind(&build.checkpoint)
            .fetch_optional(&mut *conn)
            .await?;
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
    sqlx::query("DELETE FROM projection_versions WHERE projection = $1 AND version = $2")
        .bind(&build.name)
        .bind(build.spec.version as i32)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM projection_dead_letters WHERE projection = $1")
        .bind(&build.checkpoint)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Replays the log into the new version until it reaches the horizon;
/// returns the events applied. Everything below the horizon seen at the
/// start is read and mapped one batch ahead of the writes (two cores at
/// work instead of one); ordinary batches then take it up to the current
/// horizon.
async fn load(
    pool: &PgPool,
    build: &mut Arc<Projection>,
    options: &RebuildOptions,
) -> Result<i64, RebuildError> {
    let mut loaded = prefetched_load(pool, build, options).await?;
    loop {
        let outcome = apply_batch(pool, build, options.batch_size).await?;
        loaded += progress(pool, build, &outcome).await?;
        if !outcome.full {
            return Ok(loaded);
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
    sqlx::query(
        "UPDATE projection_versions SET events_done = events_done + $3 WHERE projection = $1 AND version = $2",
    )
    .bind(&build.name)
    .bind(build.spec.version as i32)
    .bind(outcome.events as i64)
    .execute(pool)
    .await?;
    Ok(outcome.events as i64)
}

async fn prefetched_load(
    pool: &PgPool,
    build: &Arc<Projection>,
    options: &RebuildOptions,
) -> Result<i64, RebuildError> {
    let mut conn = pool.acquire().await?;
    let horizon = horizon(&mut conn).await?;
    let (tx_id, position): (i64, i64) = sqlx::query_as(
        "SELECT tx_id::text::bigint, position FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(&build.checkpoint)
    .fetch_one(&mut *conn)
    .await?;
    let start = Checkpoint { tx_id, position };

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
        let (tx_id, position): (i64, i64) = sqlx::query_as(
            "SELECT tx_id::text::bigint, position FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
        )
        .bind(&build.checkpoint)
        .fetch_one(&mut *tx)
        .await?;
        if (Checkpoint { tx_id, position }) != expected {
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
/// or dead-lettered, none twice.
async fn verify(conn: &mut PgConnection, build: &Projection) -> Result<(), RebuildError> {
    let (applied, expected): (i64, i64) = sqlx::query_as(
        "SELECT c.applied + (SELECT count(*) FROM projection_dead_letters d WHERE d.projection = c.projection), \
                (SELECT count(*) FROM events e WHERE e.event_type = ANY($2) AND (e.tx_id, e.position) <= (c.tx_id, c.position)) \
         FROM projection_checkpoints c WHERE c.projection = $1",
    )
    .bind(&build.checkpoint)
    .bind(build.spec.event_types())
    .fetch_one(conn)
    .await?;
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
    let live: (i64, i64, i64) = sqlx::query_as(
        "SELECT tx_id::text::bigint, position, applied FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
    )
    .bind(&name)
    .fetch_one(&mut *tx)
    .await?;
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
    if let Some(old) = &old {
        sqlx::query(
            "UPDATE projection_versions SET state = 'retained', retired_at = now() WHERE projection = $1 AND version = $2",
        )
        .bind(&name)
        .bind(old.version)
        .execute(&mut *tx)
        .await?;
        // The retired version keeps the live position, so it can be caught
        // up and swapped back later.
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, tx_id, position, applied) \
             VALUES ($1, $2::text::xid8, $3, $4) \
             ON CONFLICT (projection) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, \
                 applied = EXCLUDED.applied, halted_reason = NULL, updated_at = now()",
        )
        .bind(format!("{name}@v{}", old.version))
        .bind(live.0.to_string())
        .bind(live.1)
        .bind(live.2)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE projection_dead_letters SET projection = $2 WHERE projection = $1")
            .bind(&name)
            .bind(format!("{name}@v{}", old.version))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "UPDATE projection_versions SET state = 'active', activated_at = now(), retired_at = NULL, \
             events_done = GREATEST(events_done, events_total) \
         WHERE projection = $1 AND version = $2",
    )
    .bind(&name)
    .bind(build.spec.version as i32)
    .execute(&mut *tx)
    .await?;
    // The live checkpoint takes the new version's position; the live
    // projector resumes from there on the new table.
    sqlx::query(
        "UPDATE projection_checkpoints AS live SET tx_id = b.tx_id, position = b.position, applied = b.applied, \
             last_event_at = b.last_event_at, halted_reason = NULL, updated_at = now() \
         FROM projection_checkpoints AS b WHERE live.projection = $1 AND b.projection = $2",
    )
    .bind(&name)
    .bind(&build.checkpoint)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE projection_dead_letters SET projection = $2 WHERE projection = $1")
        .bind(&build.checkpoint)
        .bind(&name)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(lock_taken.elapsed().as_secs_f64() * 1000.0)
}

/// `eventplane rebuild`: what a rebuild Job runs. Prints the report as JSON.
pub async fn cli(args: crate::cli::RebuildArgs) -> anyhow::Result<()> {
    let text = match (&args.manifest, &args.projection) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)?,
        (None, None) => anyhow::bail!(
            "give --projection FILE or --manifest TEXT (EVENTPLANE_PROJECTION_MANIFEST)"
        ),
    };
    let manifest = eventplane_spec::load_manifests(&text)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the manifest holds no Projection"))?;
    let projection = Projection::from_manifest(manifest);
    let pool = crate::db::connect(&args.db.database_url, 4, "rebuild").await?;
    crate::db::migrate(&pool).await?;
    // The first version of a new projection is created here too.
    versions::ensure(&pool, &projection).await?;
    let redis = match &args.redis_url {
        Some(url) => Some(crate::invalidation::redis_manager(url).await?),
        None => None,
    };
    let options = RebuildOptions::from_spec(&projection.spec);
    let report = run(&pool, &projection, redis, Metrics::new(), &options).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
