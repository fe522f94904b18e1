//! A rebuild's set-based load: the replay query of
//! [`eventplane_plan::replay`] computes the new version's final rows from
//! the log in Postgres; they stream back and are copied into the table in
//! chunks (`COPY`), each in a short transaction of its own.
//!
//! The query itself writes nothing, so it holds no transaction id: the
//! live projectors' horizon never waits for it, only for one chunk's write.
//! The checkpoint moves, to the horizon the query read below, once every
//! row is written. Until then the version has nothing applied, and a load
//! that stops part-way (a crash, an event the query cannot map) leaves rows
//! that the next [`load`] empties before anything is loaded again.

use eventplane_api::quote_ident;
use eventplane_plan::replay::{NotSetBased, ReplayParam, UNSURE_SQLSTATE, replay_sql};
use futures::TryStreamExt as _;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row as _};

use crate::batch::horizon;
use crate::checkpoints::{self, Advance, Checkpoint};
use crate::projection::Projection;

/// Rows written per transaction.
const CHUNK_ROWS: usize = 20_000;

#[derive(Debug, Clone, PartialEq)]
pub enum Replayed {
    /// The events up to the horizon are applied.
    Loaded { events: i64, rows: u64 },
    /// The batch path must do it; nothing was applied.
    Unsuitable(String),
}

/// Replays every event below the horizon into `projection`'s table, if
/// nothing is applied to it yet and its spec and events allow (see the
/// module docs). A version with nothing applied is emptied first, whichever
/// path then loads it: rows there are what a load that stopped part-way
/// left behind.
pub async fn load(pool: &PgPool, projection: &Projection) -> sqlx::Result<Replayed> {
    let mut conn = pool.acquire().await?;
    let start = checkpoints::get(&mut *conn, &projection.checkpoint)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    if start.applied != 0 {
        return Ok(Replayed::Unsuitable(
            "the version has events applied".into(),
        ));
    }
    clear(pool, projection).await?;
    let compiled = match replay_sql(&projection.spec, &projection.table) {
        Ok(compiled) => compiled,
        Err(NotSetBased(why)) => return Ok(Replayed::Unsuitable(why)),
    };
    let horizon = horizon(&mut conn).await?;
    let types = projection.spec.event_types();
    let covered: (i64, Option<i64>, Option<i64>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as(
            "WITH r AS (SELECT tx_id, position, recorded_at FROM events \
                 WHERE event_type = ANY($1) AND (tx_id, position) > ($2::text::xid8, $3) AND tx_id < $4::text::xid8) \
             SELECT (SELECT count(*) FROM r), l.tx_id::text::bigint, l.position, l.recorded_at \
             FROM (SELECT 1) one LEFT JOIN LATERAL \
                 (SELECT * FROM r ORDER BY r.tx_id DESC, r.position DESC LIMIT 1) l ON true",
        )
        .bind(&types)
        .bind(start.tx_id.to_string())
        .bind(start.position)
        .bind(horizon.to_string())
        .fetch_one(&mut *conn)
        .await?;
    let (events, last_tx, last_position, last_recorded) = covered;
    if events == 0 {
        return Ok(Replayed::Unsuitable("no events to replay".into()));
    }

    let columns: Vec<String> = projection
        .spec
        .key_names()
        .iter()
        .chain(&compiled.columns)
        .map(|c| quote_ident(c))
        .collect();
    let copy = format!(
        "COPY {} ({}) FROM STDIN",
        quote_ident(&projection.table),
        columns.join(", ")
    );
    let (chunks, mut written) = tokio::sync::mpsc::channel::<sqlx::Result<Chunk>>(2);
    let reader = {
        let start = start.at();
        let width = columns.len();
        tokio::spawn(async move {
            let result = read(
                &mut conn,
                &compiled.sql,
                &compiled.params,
                &types,
                (start, horizon),
                width,
                &chunks,
            )
            .await;
            if let Err(err) = result {
                let _ = chunks.send(Err(err)).await;
            }
        })
    };

    let mut rows = 0u64;
    let started = std::time::Instant::now();
    let mut first_row = None;
    let mut copying = std::time::Duration::ZERO;
    let outcome: sqlx::Result<()> = async {
        while let Some(chunk) = written.recv().await {
            let chunk = chunk?;
            first_row.get_or_insert_with(|| started.elapsed());
            let copy_started = std::time::Instant::now();
            let mut tx = pool.begin().await?;
            let mut sink = tx.copy_in_raw(&copy).await?;
            sink.send(chunk.text).await?;
            rows += sink.finish().await?;
            tx.commit().await?;
            copying += copy_started.elapsed();
        }
        Ok(())
    }
    .await;
    drop(written);
    let _ = reader.await;
    if let Err(err) = outcome {
        // An event the query cannot map exactly, a value it cannot cast or
        // a row the table refuses (a required column never set): the batch
        // path decides what becomes of them, from an empty table.
        let Some(db) = err.as_database_error() else {
            return Err(err);
        };
        let why = if db.code().is_some_and(|code| code == UNSURE_SQLSTATE) {
            db.message().to_string()
        } else {
            format!("the replay failed: {}", db.message())
        };
        clear(pool, projection).await?;
        return Ok(Replayed::Unsuitable(why));
    }
    // Where a set-based load spends its time: the query's sort before its
    // first row, then the copies it streams into.
    tracing::info!(
        projection = %projection.name,
        rows,
        first_chunk_seconds = first_row.unwrap_or_default().as_secs_f64(),
        copy_seconds = copying.as_secs_f64(),
        total_seconds = started.elapsed().as_secs_f64(),
        "set-based load"
    );

    let last = last_tx
        .zip(last_position)
        .map(|(tx_id, position)| Checkpoint { tx_id, position });
    let mut tx = pool.begin().await?;
    let locked = checkpoints::lock(&mut tx, &projection.checkpoint)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    if locked.applied != 0 || locked.at() != start.at() {
        return Err(sqlx::Error::Protocol(format!(
            "checkpoint of {} moved under the replay",
            projection.checkpoint
        )));
    }
    let step = Advance {
        to: start.at().after_batch(last, horizon, true),
        last_event_at: last_recorded,
        applied: events,
        halted_reason: None,
    };
    checkpoints::advance(&mut tx, &projection.checkpoint, &step).await?;
    tx.commit().await?;
    Ok(Replayed::Loaded { events, rows })
}

/// Empties a version's table, which holds rows of a load that did not
/// finish only while its checkpoint says nothing is applied.
async fn clear(pool: &PgPool, projection: &Projection) -> sqlx::Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "TRUNCATE {}",
        eventplane_api::quote_ident(&projection.table)
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// Rows of the replay as `COPY` text.
struct Chunk {
    text: Vec<u8>,
    rows: usize,
}

impl Chunk {
    fn new() -> Chunk {
        Chunk {
            text: Vec::with_capacity(CHUNK_ROWS * 64),
            rows: 0,
        }
    }

    /// Appends one row of `width` SQL texts (NULL as `\N`).
    fn push(&mut self, row: &PgRow, width: usize) -> sqlx::Result<()> {
        for i in 0..width {
            if i > 0 {
                self.text.push(b'\t');
            }
            match row.try_get::<Option<&str>, _>(i)? {
                None => self.text.extend_from_slice(b"\\N"),
                Some(value) => {
                    for &b in value.as_bytes() {
                        match b {
                            b'\\' => self.text.extend_from_slice(b"\\\\"),
                            b'\n' => self.text.extend_from_slice(b"\\n"),
                            b'\r' => self.text.extend_from_slice(b"\\r"),
                            b'\t' => self.text.extend_from_slice(b"\\t"),
                            _ => self.text.push(b),
                        }
                    }
                }
            }
        }
        self.text.push(b'\n');
        self.rows += 1;
        Ok(())
    }
}

/// Runs the replay query over the events after `start` and below
/// `horizon`, and sends its rows on in chunks.
async fn read(
    conn: &mut PgConnection,
    sql: &str,
    params: &[ReplayParam],
    types: &[String],
    (start, horizon): (Checkpoint, i64),
    width: usize,
    chunks: &tokio::sync::mpsc::Sender<sqlx::Result<Chunk>>,
) -> sqlx::Result<()> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    // Sorted group aggregation, no parallel workers: the query's arrays
    // rely on each key's rows arriving in log order. Shortest float text,
    // so fractional numbers compare as the projector prints them. No
    // statement timeout: the query reads the whole log, and it writes
    // nothing, so it holds up no one.
    sqlx::raw_sql(
        "SET LOCAL enable_hashagg = off; SET LOCAL max_parallel_workers_per_gather = 0; \
         SET LOCAL extra_float_digits = 1; SET LOCAL work_mem = '256MB'; \
         SET LOCAL statement_timeout = 0; SET TRANSACTION READ ONLY",
    )
    .execute(&mut *tx)
    .await?;
    let mut query = sqlx::query(AssertSqlSafe(sql))
        .bind(types)
        .bind(start.tx_id.to_string())
        .bind(start.position)
        .bind(horizon.to_string());
    for param in params {
        query = match param {
            ReplayParam::Types(types) | ReplayParam::Path(types) => query.bind(types.clone()),
            ReplayParam::Text(text) => query.bind(text.clone()),
        };
    }
    let mut rows = query.fetch(&mut *tx);
    let mut chunk = Chunk::new();
    while let Some(row) = rows.try_next().await? {
        chunk.push(&row, width)?;
        if chunk.rows == CHUNK_ROWS {
            let full = std::mem::replace(&mut chunk, Chunk::new());
            if chunks.send(Ok(full)).await.is_err() {
                return Ok(());
            }
        }
    }
    drop(rows);
    tx.commit().await?;
    if chunk.rows > 0 {
        let _ = chunks.send(Ok(chunk)).await;
    }
    Ok(())
}
