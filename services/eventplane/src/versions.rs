//! The projection version registry (`projection_versions`): which version
//! of each projection is active, which is being built, which are kept for
//! swapping back, and the spec each was built from. The live projector
//! follows the active version; rebuilds add versions; the operator reads it
//! for status.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use eventplane_spec::{ProjectionSpec, quote_ident};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use crate::projections::{Projection, version_table};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct VersionRow {
    pub projection: String,
    pub version: i32,
    pub table_name: String,
    pub spec: Value,
    /// `building`, `active` or `retained`.
    pub state: String,
    pub events_done: i64,
    pub events_total: i64,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub retired_at: Option<DateTime<Utc>>,
}

impl VersionRow {
    pub fn spec(&self) -> anyhow::Result<ProjectionSpec> {
        Ok(serde_json::from_value(self.spec.clone())?)
    }
}

/// What `ensure` found.
#[derive(Debug, Clone, PartialEq)]
pub enum Ensured {
    /// The first version was created (or an unversioned table adopted).
    Created,
    /// The active version is the one the spec asks for.
    Current,
    /// The spec asks for another version than the active one.
    NeedsRebuild { active: u32, wanted: u32 },
}

const COLUMNS: &str = "projection, version, table_name, spec, state, events_done, events_total, created_at, activated_at, retired_at";

pub async fn list(pool: &PgPool, name: &str) -> sqlx::Result<Vec<VersionRow>> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM projection_versions WHERE projection = $1 ORDER BY version"
    )))
    .bind(name)
    .fetch_all(pool)
    .await
}

pub async fn get(
    conn: &mut PgConnection,
    name: &str,
    version: u32,
) -> sqlx::Result<Option<VersionRow>> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM projection_versions WHERE projection = $1 AND version = $2"
    )))
    .bind(name)
    .bind(version as i32)
    .fetch_optional(conn)
    .await
}

pub async fn active(conn: &mut PgConnection, name: &str) -> sqlx::Result<Option<VersionRow>> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM projection_versions WHERE projection = $1 AND state = 'active'"
    )))
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// Points the stable name at `table`: readers see the old view or the new
/// one, never neither (both statements commit together).
pub async fn point_view(conn: &mut PgConnection, base: &str, table: &str) -> sqlx::Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "DROP VIEW IF EXISTS {}",
        quote_ident(base)
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE VIEW {} AS SELECT * FROM {}",
        quote_ident(base),
        quote_ident(table)
    )))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn relkind(conn: &mut PgConnection, name: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relname = $1",
    )
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// Makes sure the projection has an active version, its table, indexes and
/// view, and a checkpoint; returns what it found and the runtime of the
/// active version (whose spec may differ from `projection`'s if a rebuild
/// is due).
pub async fn ensure(
    pool: &PgPool,
    projection: &Projection,
) -> anyhow::Result<(Ensured, Arc<Projection>)> {
    let mut tx = pool.begin().await?;
    // Concurrent set-ups of one projection (several replicas starting
    // together) take turns.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7341))")
        .bind(&projection.name)
        .execute(&mut *tx)
        .await?;
    let spec = &projection.spec;
    let base = &spec.table;
    let ensured = match active(&mut tx, &projection.name).await? {
        None => {
            let table = version_table(base, spec.version);
            if relkind(&mut tx, base).await?.as_deref() == Some("r") {
                // A table from before versioning: it becomes this version.
                sqlx::query(AssertSqlSafe(format!(
                    "ALTER TABLE {} RENAME TO {}",
                    quote_ident(base),
                    quote_ident(&table)
                )))
                .execute(&mut *tx)
                .await?;
            }
            for statement in eventplane_spec::create_table_sql(spec, &table) {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await?;
            }
            point_view(&mut tx, base, &table).await?;
            sqlx::query(
                "INSERT INTO projection_versions (projection, version, table_name, spec, state, activated_at) \
                 VALUES ($1, $2, $3, $4, 'active', now())",
            )
            .bind(&projection.name)
            .bind(spec.version as i32)
            .bind(&table)
            .bind(sqlx::types::Json(spec))
            .execute(&mut *tx)
            .await?;
            Ensured::Created
        }
        Some(row) if row.version as u32 == spec.version => {
            let stored = row.spec()?;
            if stored.columns != spec.columns || stored.key != spec.key {
                tracing::warn!(
                    projection = %projection.name,
                    "columns changed without a version bump; increase spec.version to rebuild"
                );
            } else {
                // Handlers, indexes and queries may change in place; new
                // indexes are created, the handlers apply from now on.
                for statement in eventplane_spec::index_sql(spec, &row.table_name) {
                    sqlx::query(AssertSqlSafe(statement))
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("UPDATE projection_versions SET spec = $3 WHERE projection = $1 AND version = $2")
                    .bind(&projection.name)
                    .bind(row.version)
                    .bind(sqlx::types::Json(spec))
                    .execute(&mut *tx)
                    .await?;
            }
            if relkind(&mut tx, base).await?.is_none() {
                point_view(&mut tx, base, &row.table_name).await?;
            }
            Ensured::Current
        }
        Some(row) => Ensured::NeedsRebuild {
            active: row.version as u32,
            wanted: spec.version,
        },
    };
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection) VALUES ($1) ON CONFLICT DO NOTHING",
    )
    .bind(&projection.name)
    .execute(&mut *tx)
    .await?;
    let row = active(&mut tx, &projection.name)
        .await?
        .expect("an active version exists now");
    tx.commit().await?;
    let runtime = if row.version as u32 == spec.version {
        Projection::live(projection.name.clone(), spec.clone())
    } else {
        Projection::live(projection.name.clone(), row.spec()?)
    };
    Ok((ensured, Arc::new(runtime)))
}

/// Drops the retained versions retired before `cutoff`; returns their tables.
pub async fn drop_expired(
    pool: &PgPool,
    name: &str,
    cutoff: DateTime<Utc>,
) -> sqlx::Result<Vec<String>> {
    let expired: Vec<(i32, String)> = sqlx::query_as(
        "SELECT version, table_name FROM projection_versions \
         WHERE projection = $1 AND state = 'retained' AND retired_at < $2",
    )
    .bind(name)
    .bind(cutoff)
    .fetch_all(pool)
    .await?;
    let mut dropped = Vec::new();
    for (version, table) in expired {
        let mut tx = pool.begin().await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            quote_ident(&table)
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM projection_versions WHERE projection = $1 AND version = $2")
            .bind(name)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1")
            .bind(format!("{name}@v{version}"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        dropped.push(table);
    }
    Ok(dropped)
}

/// Drops every trace of a projection: its view, every version's table, its
/// checkpoints, versions and dead letters (`reclaimPolicy: Delete`).
pub async fn drop_all(pool: &PgPool, name: &str, base: &str) -> sqlx::Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT table_name FROM projection_versions WHERE projection = $1")
            .bind(name)
            .fetch_all(&mut *tx)
            .await?;
    if relkind(&mut tx, base).await?.as_deref() == Some("v") {
        sqlx::query(AssertSqlSafe(format!("DROP VIEW {}", quote_ident(base))))
            .execute(&mut *tx)
            .await?;
    }
    for table in &tables {
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            quote_ident(table)
        )))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM projection_versions WHERE projection = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM projection_checkpoints WHERE projection = $1 OR projection LIKE $1 || '@v%'",
    )
    .bind(name)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM projection_dead_letters WHERE projection = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(tables)
}
