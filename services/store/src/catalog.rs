//! The projection catalog (`projection_catalog`, and the catalog generation
//! in `projection_catalog_generation`): what the services connected to a
//! database serve. Whoever declares projections writes it through
//! [`apply`] and [`remove`] (the operator from each Projection resource,
//! the CLI, the dev stack); projector and query processes [`load`] it and
//! follow it through the [`CHANNEL`] notification and a periodic look at
//! [`generation`].
//!
//! The generation moves on every change of what is served: a projection
//! declared, changed or removed, and a swap that makes another version
//! active. A process that has loaded generation N serves everything the
//! catalog said at N.

use chrono::{DateTime, Utc};
use eventplane_api::{ProjectionSpec, SpecError};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection, PgExecutor, PgPool};

use crate::projection::{Projection, version_table};
use crate::versions::{self, Ensured, relkind};

/// Notified (with the new generation as payload) when the catalog changes.
pub const CHANNEL: &str = "eventplane_catalog";

/// Why a declaration was refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{0}")]
    Invalid(#[from] SpecError),
    #[error("{field} cannot change (it is {current:?}); declare a new projection instead")]
    Immutable {
        field: &'static str,
        current: String,
    },
    #[error("table {table:?} is taken by {by}")]
    TableTaken { table: String, by: String },
    #[error("projection {name:?} is declared by {owner}; change it there")]
    Owned { name: String, owner: String },
    #[error("no projection named {0:?} is declared")]
    NotFound(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub change: Change,
    /// The catalog generation after the call.
    pub generation: i64,
    /// What the version registry found: a version change leaves a rebuild
    /// to do.
    pub ensured: Option<Ensured>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    /// The same spec was declared already by the same source.
    Unchanged,
}

/// One declared projection, with the version that serves it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    /// The spec as declared (its `version` may still be building).
    pub desired: ProjectionSpec,
    pub source: String,
    /// The catalog generation of the entry's last change.
    pub generation: i64,
    pub updated_at: DateTime<Utc>,
    /// The active version and its spec: what readers see through the
    /// stable name.
    pub active: Option<(u32, ProjectionSpec)>,
}

impl Entry {
    /// The runtime of the active version (the one to read and tail).
    pub fn active_projection(&self) -> Option<Projection> {
        self.active
            .as_ref()
            .map(|(_, spec)| Projection::live(self.name.clone(), spec.clone()))
    }
}

/// The catalog as of one generation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub generation: i64,
    pub entries: Vec<Entry>,
}

impl Snapshot {
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

/// The source of entries carried over from before the catalog: whoever
/// declares them next takes them over.
pub const MIGRATED: &str = "migrated";

/// Whether a declaration by `source` may change an entry declared by
/// `owner`: a Projection resource owns its entry; local declarations (the
/// CLI, the dev stack, files given at start) may replace one another.
fn may_change(owner: &str, source: &str) -> bool {
    owner == source
        || owner == MIGRATED
        || !(owner.starts_with("operator:") || source.starts_with("operator:"))
}

/// Declares `spec` as projection `name` (see the module docs): validates
/// it, refuses a table that belongs to something else, sets up its first
/// version's table (or changes indexes and queries in place) and records
/// it, all in one transaction. Declaring the same spec again changes
/// nothing.
pub async fn apply(
    pool: &PgPool,
    name: &str,
    spec: &ProjectionSpec,
    source: &str,
) -> Result<Applied, CatalogError> {
    eventplane_api::validate_name(name)?;
    spec.validate()?;
    let mut tx = pool.begin().await?;
    // Catalog writers take turns, so generations are handed out in commit
    // order and two declarations of one table cannot both pass the checks.
    let generation: i64 =
        sqlx::query_scalar("SELECT generation FROM projection_catalog_generation FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
    let existing: Option<(Value, String)> =
        sqlx::query_as("SELECT spec, source FROM projection_catalog WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((stored, owner)) = &existing {
        let stored = serde_json::from_value::<ProjectionSpec>(stored.clone()).ok();
        // Declaring what is declared already changes nothing, whoever
        // declares it (a rebuild Job repeats its Projection's spec).
        if stored.as_ref() == Some(spec) {
            return Ok(Applied {
                change: Change::Unchanged,
                generation,
                ensured: None,
            });
        }
        if !may_change(owner, source) {
            return Err(CatalogError::Owned {
                name: name.to_string(),
                owner: owner.clone(),
            });
        }
        if let Some(stored) = stored {
            immutable("spec.table", &stored.table, &spec.table)?;
            immutable(
                "spec.key",
                &stored.key_names().join(", "),
                &spec.key_names().join(", "),
            )?;
            // Neither transport knows where the other stands in the log.
            immutable(
                "spec.transport",
                &transport_text(&stored),
                &transport_text(spec),
            )?;
        }
    }
    check_table(&mut tx, name, spec).await?;
    let (ensured, _) =
        versions::ensure_in(&mut tx, &Projection::live(name.into(), spec.clone())).await?;
    let generation = bump(&mut tx).await?;
    sqlx::query(
        "INSERT INTO projection_catalog (name, spec, version, source, generation) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (name) DO UPDATE SET spec = EXCLUDED.spec, version = EXCLUDED.version, \
             source = EXCLUDED.source, generation = EXCLUDED.generation, updated_at = now()",
    )
    .bind(name)
    .bind(sqlx::types::Json(spec))
    .bind(spec.version as i32)
    .bind(source)
    .bind(generation)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Applied {
        change: if existing.is_some() {
            Change::Updated
        } else {
            Change::Created
        },
        generation,
        ensured: Some(ensured),
    })
}

/// The transport as an error message shows it.
fn transport_text(spec: &ProjectionSpec) -> String {
    match spec.kafka_topic() {
        Some(topic) => format!("kafka, topic {topic}"),
        None => "postgres".to_string(),
    }
}

fn immutable(field: &'static str, current: &str, wanted: &str) -> Result<(), CatalogError> {
    if current == wanted {
        Ok(())
    } else {
        Err(CatalogError::Immutable {
            field,
            current: current.to_string(),
        })
    }
}

/// Refuses a table that another projection declares or that exists without
/// being this projection's: the event store's own tables, anything an
/// application made, another projection's versions.
async fn check_table(
    conn: &mut PgConnection,
    name: &str,
    spec: &ProjectionSpec,
) -> Result<(), CatalogError> {
    let table = &spec.table;
    let taken = |by: String| CatalogError::TableTaken {
        table: table.clone(),
        by,
    };
    let other: Option<String> = sqlx::query_scalar(
        "SELECT name FROM projection_catalog WHERE spec->>'table' = $1 AND name <> $2 \
         UNION ALL SELECT projection FROM projection_versions WHERE spec->>'table' = $1 AND projection <> $2 \
         LIMIT 1",
    )
    .bind(table)
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(other) = other {
        return Err(taken(format!("projection {other:?}")));
    }
    let versioned: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM projection_versions WHERE projection = $1)",
    )
    .bind(name)
    .fetch_one(&mut *conn)
    .await?;
    match relkind(conn, table).await?.as_deref() {
        None => {}
        // The stable name of this projection's versions.
        Some("v") if versioned => {}
        // A table this projection's projector filled before versions
        // existed (it has a checkpoint): it becomes the first version.
        Some("r") if !versioned && has_checkpoint(conn, name).await? => {}
        Some(_) => return Err(taken("an existing relation of that name".into())),
    }
    let physical = version_table(table, spec.version);
    let registered: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM projection_versions WHERE projection = $1 AND table_name = $2)",
    )
    .bind(name)
    .bind(&physical)
    .fetch_one(&mut *conn)
    .await?;
    if !registered && relkind(conn, &physical).await?.is_some() {
        return Err(CatalogError::TableTaken {
            table: physical,
            by: "an existing relation of that name".into(),
        });
    }
    Ok(())
}

async fn has_checkpoint(conn: &mut PgConnection, name: &str) -> sqlx::Result<bool> {
    Ok(crate::checkpoints::get(conn, name).await?.is_some())
}

/// What [`remove`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Removed {
    pub generation: i64,
    /// The tables dropped (with `drop_tables`).
    pub dropped: Vec<String>,
}

/// Stops serving projection `name`; with `drop_tables` its view, every
/// version's table, checkpoints and dead letters go too, in the same
/// transaction. `source`, when given, must be the entry's owner.
pub async fn remove(
    pool: &PgPool,
    name: &str,
    source: Option<&str>,
    drop_tables: bool,
) -> Result<Removed, CatalogError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT generation FROM projection_catalog_generation FOR UPDATE")
        .execute(&mut *tx)
        .await?;
    let entry: Option<(String, Value)> =
        sqlx::query_as("SELECT source, spec FROM projection_catalog WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    let (owner, spec) = match entry {
        Some(found) => found,
        None => return Err(CatalogError::NotFound(name.to_string())),
    };
    if let Some(source) = source
        && !may_change(&owner, source)
    {
        return Err(CatalogError::Owned {
            name: name.to_string(),
            owner,
        });
    }
    sqlx::query("DELETE FROM projection_catalog WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    let generation = bump(&mut tx).await?;
    let dropped = if drop_tables {
        let base = spec
            .get("table")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        versions::drop_all_in(&mut tx, name, &base).await?
    } else {
        Vec::new()
    };
    tx.commit().await?;
    Ok(Removed {
        generation,
        dropped,
    })
}

/// Moves the catalog generation and notifies the followers, inside the
/// caller's transaction (the notification goes out at commit).
pub async fn bump(conn: &mut PgConnection) -> sqlx::Result<i64> {
    let generation: i64 = sqlx::query_scalar(
        "UPDATE projection_catalog_generation SET generation = generation + 1 RETURNING generation",
    )
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(generation.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(generation)
}

/// The current catalog generation.
pub async fn generation(conn: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT generation FROM projection_catalog_generation")
        .fetch_one(conn)
        .await
}

#[derive(sqlx::FromRow)]
struct Row {
    catalog_generation: i64,
    name: Option<String>,
    spec: Option<Value>,
    source: Option<String>,
    generation: Option<i64>,
    updated_at: Option<DateTime<Utc>>,
    active_version: Option<i32>,
    active_spec: Option<Value>,
}

/// The whole catalog, read in one statement (one snapshot). An entry whose
/// stored spec this build cannot read is logged and left out rather than
/// failing every other projection.
pub async fn load(conn: impl PgExecutor<'_>) -> sqlx::Result<Snapshot> {
    let rows: Vec<Row> = sqlx::query_as(AssertSqlSafe(
        "SELECT g.generation AS catalog_generation, c.name, c.spec, c.source, c.generation, c.updated_at, \
                v.version AS active_version, v.spec AS active_spec \
         FROM projection_catalog_generation g \
         LEFT JOIN projection_catalog c ON true \
         LEFT JOIN projection_versions v ON v.projection = c.name AND v.state = 'active' \
         ORDER BY c.name",
    ))
    .fetch_all(conn)
    .await?;
    let mut snapshot = Snapshot {
        generation: rows.first().map_or(0, |r| r.catalog_generation),
        entries: Vec::with_capacity(rows.len()),
    };
    for row in rows {
        let (Some(name), Some(spec), Some(source), Some(generation), Some(updated_at)) = (
            row.name,
            row.spec,
            row.source,
            row.generation,
            row.updated_at,
        ) else {
            continue;
        };
        let desired = match serde_json::from_value::<ProjectionSpec>(spec) {
            Ok(spec) => spec,
            Err(err) => {
                tracing::warn!(projection = %name, error = %err, "catalog entry unreadable; not served");
                continue;
            }
        };
        let active = match (row.active_version, row.active_spec) {
            (Some(version), Some(spec)) => match serde_json::from_value::<ProjectionSpec>(spec) {
                Ok(spec) => Some((version as u32, spec)),
                Err(err) => {
                    tracing::warn!(projection = %name, error = %err, "active version's spec unreadable; not served");
                    None
                }
            },
            _ => None,
        };
        snapshot.entries.push(Entry {
            name,
            desired,
            source,
            generation,
            updated_at,
            active,
        });
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_owns_its_entry_and_local_declarations_share() {
        assert!(may_change("cli", "dev"));
        assert!(may_change("files", "cli"));
        assert!(may_change("operator:ns/a", "operator:ns/a"));
        assert!(!may_change("operator:ns/a", "operator:other/a"));
        assert!(!may_change("operator:ns/a", "cli"));
        assert!(!may_change("cli", "operator:ns/a"));
        assert!(may_change(MIGRATED, "operator:ns/a"));
    }
}
