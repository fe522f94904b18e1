//! Projection manifests from files, and `eventplane projections
//! apply|get|delete`: the catalog on a machine without Kubernetes.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use eventplane_api::{ProjectionManifest, VersionState, load_manifests};
use eventplane_store::batch::{TailEvent, replay_dead_letters};
use eventplane_store::catalog::{self, Change, Entry};
use eventplane_store::versions::{self, VersionRow};
use eventplane_store::{checkpoints, db, processes, status};

use crate::invalidation::{Invalidator, Scope};
use crate::query::dead_letters::MAX_REPLAY;
use serde::Serialize;
use sqlx::PgPool;

use crate::cli::{DbArgs, ProjectionsArgs, ProjectionsCommand};

/// Who the CLI declares projections as.
pub const CLI_SOURCE: &str = "cli";

/// A process counts as running for `get` if it reported within this long.
const LIVE_WINDOW: Duration = Duration::from_secs(30);

/// Loads every manifest from a file, or from each `.yaml`/`.yml` file of a
/// directory. Names must be unique.
pub fn load(path: &Path) -> anyhow::Result<Vec<ProjectionManifest>> {
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let p = entry?.path();
            if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut manifests: Vec<ProjectionManifest> = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let loaded =
            load_manifests(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        for manifest in loaded {
            if manifests
                .iter()
                .any(|m| m.metadata.name == manifest.metadata.name)
            {
                anyhow::bail!(
                    "{}: projection {:?} is declared twice",
                    file.display(),
                    manifest.metadata.name
                );
            }
            manifests.push(manifest);
        }
    }
    Ok(manifests)
}

pub async fn run(args: ProjectionsArgs) -> anyhow::Result<()> {
    match args.command {
        ProjectionsCommand::Apply { file, db } => apply(&file, &db).await,
        ProjectionsCommand::Get { name, json, db } => get(name.as_deref(), json, &db).await,
        ProjectionsCommand::Delete {
            name,
            drop_tables,
            db,
        } => delete(&name, drop_tables, &db).await,
        ProjectionsCommand::DeadLetters {
            name,
            limit,
            json,
            db,
        } => dead_letters(&name, limit, json, &db).await,
        ProjectionsCommand::Replay {
            name,
            limit,
            redis_url,
            db,
        } => replay(&name, limit, redis_url.as_deref(), &db).await,
    }
}

async fn connect(db: &DbArgs) -> anyhow::Result<PgPool> {
    let pool = db::connect(&db.database_url, 2, "cli")
        .await
        .with_context(|| "connecting to --database-url")?;
    db::migrate(&pool).await?;
    Ok(pool)
}

/// Every manifest is checked before any is declared, so a bad file changes
/// nothing.
async fn apply(file: &Path, db: &DbArgs) -> anyhow::Result<()> {
    let manifests = load(file)?;
    for manifest in &manifests {
        manifest
            .validate()
            .with_context(|| format!("projection {}", manifest.metadata.name))?;
    }
    let pool = connect(db).await?;
    for manifest in &manifests {
        let name = &manifest.metadata.name;
        let applied = catalog::apply(&pool, name, &manifest.spec, CLI_SOURCE)
            .await
            .with_context(|| format!("projection {name}"))?;
        let what = match applied.change {
            Change::Created => "created",
            Change::Updated => "configured",
            Change::Unchanged => "unchanged",
        };
        println!("projection/{name} {what}");
    }
    Ok(())
}

async fn delete(name: &str, drop_tables: bool, db: &DbArgs) -> anyhow::Result<()> {
    let pool = connect(db).await?;
    let removed = catalog::remove(&pool, name, Some(CLI_SOURCE), drop_tables).await?;
    if removed.dropped.is_empty() {
        println!("projection/{name} deleted (tables kept)");
    } else {
        println!(
            "projection/{name} deleted; dropped {}",
            removed.dropped.join(", ")
        );
    }
    Ok(())
}

async fn dead_letters(name: &str, limit: i64, json: bool, db: &DbArgs) -> anyhow::Result<()> {
    let pool = connect(db).await?;
    let letters = checkpoints::dead_letters(&pool, name, None, limit.max(1)).await?;
    if json {
        let items: Vec<serde_json::Value> = letters
            .iter()
            .map(|l| {
                serde_json::json!({"id": l.id, "reason": l.reason, "deadAt": l.dead_at,
                                   "event": TailEvent::from(l).envelope()})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    let mut out = tabwriter::TabWriter::new(Vec::new()).padding(3);
    writeln!(out, "ID\tPOSITION\tSTREAM\tTYPE\tDEAD SINCE\tREASON")?;
    for l in &letters {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}",
            l.id,
            l.position,
            l.stream_id,
            l.event_type,
            l.dead_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            l.reason
        )?;
    }
    print!("{}", String::from_utf8(out.into_inner()?)?);
    Ok(())
}

async fn replay(
    name: &str,
    limit: i64,
    redis_url: Option<&str>,
    db: &DbArgs,
) -> anyhow::Result<()> {
    let pool = connect(db).await?;
    let replayed = replay_dead_letters(&pool, name, limit.clamp(1, MAX_REPLAY))
        .await
        .with_context(|| format!("replaying the dead letters of {name}"))?;
    if replayed.applied > 0
        && let Some(url) = redis_url
    {
        let scope = Scope::new(&db::instance_id(&pool).await?);
        let redis = crate::redis_conn::open(url).await?;
        Invalidator::new(scope, name, redis, crate::metrics::Metrics::new())
            .invalidate_all()
            .await;
    }
    println!(
        "projection/{name}: {} dead letters applied to version {}, {} still failing",
        replayed.applied, replayed.version, replayed.still_dead
    );
    Ok(())
}

/// One line of `projections get`.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Listed {
    pub name: String,
    pub version: u32,
    pub active: Option<u32>,
    pub phase: String,
    pub lag_seconds: Option<f64>,
    pub dead_letters: Option<i64>,
    pub applied_by: Option<String>,
    /// Query processes serving this entry's generation, of those running.
    pub query_processes: (usize, usize),
    pub source: String,
}

/// What a local stack's projection is doing, from the version registry.
pub fn phase(desired: u32, versions: &[VersionRow], halted: bool) -> String {
    let active = versions.iter().find(|v| v.state == VersionState::Active);
    let building = versions
        .iter()
        .find(|v| v.state == VersionState::Building && v.version as u32 == desired);
    match (active, building) {
        (None, _) => "Pending".into(),
        (Some(_), _) if halted => "Halted".into(),
        (Some(a), _) if a.version as u32 == desired => "Ready".into(),
        (Some(_), Some(b)) => format!("Building {}/{}", b.events_done, b.events_total),
        (Some(_), None) => "Pending".into(),
    }
}

async fn listed(pool: &PgPool, entry: &Entry) -> anyhow::Result<Listed> {
    let versions = versions::list(pool, &entry.name).await?;
    let progress = match entry.active_projection() {
        Some(active) => status::status(pool, &active).await?,
        None => None,
    };
    let queries = processes::live(pool, Some(crate::query::ROLE), LIVE_WINDOW).await?;
    let current = queries
        .iter()
        .filter(|p| p.catalog_generation >= entry.generation)
        .count();
    Ok(Listed {
        name: entry.name.clone(),
        version: entry.desired.version,
        active: entry.active.as_ref().map(|(v, _)| *v),
        phase: phase(
            entry.desired.version,
            &versions,
            progress.as_ref().is_some_and(|p| p.halted_reason.is_some()),
        ),
        lag_seconds: progress.as_ref().map(|p| p.lag_seconds),
        dead_letters: progress.as_ref().map(|p| p.dead_letters),
        applied_by: progress.and_then(|p| p.applied_by),
        query_processes: (current, queries.len()),
        source: entry.source.clone(),
    })
}

async fn get(name: Option<&str>, json: bool, db: &DbArgs) -> anyhow::Result<()> {
    let pool = connect(db).await?;
    let snapshot = catalog::load(&pool).await?;
    let entries: Vec<&Entry> = match name {
        Some(name) => vec![
            snapshot
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("no projection named {name:?} is declared"))?,
        ],
        None => snapshot.entries.iter().collect(),
    };
    let mut rows = Vec::with_capacity(entries.len());
    for entry in entries {
        rows.push(listed(&pool, entry).await?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    print!("{}", table(&rows)?);
    Ok(())
}

/// The rows as aligned columns, the way `kubectl get` prints them.
pub fn table(rows: &[Listed]) -> anyhow::Result<String> {
    let dash = || "-".to_string();
    let mut out = tabwriter::TabWriter::new(Vec::new()).padding(3);
    writeln!(
        out,
        "NAME\tVERSION\tACTIVE\tPHASE\tLAG\tDEAD LETTERS\tQUERY\tAPPLIED BY"
    )?;
    for row in rows {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}/{}\t{}",
            row.name,
            row.version,
            row.active.map_or_else(dash, |v| v.to_string()),
            row.phase,
            row.lag_seconds.map_or_else(dash, |s| format!("{s:.1}s")),
            row.dead_letters.map_or_else(dash, |d| d.to_string()),
            row.query_processes.0,
            row.query_processes.1,
            row.applied_by.clone().unwrap_or_else(dash),
        )?;
    }
    Ok(String::from_utf8(out.into_inner()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: i32, state: VersionState, done: i64, total: i64) -> VersionRow {
        VersionRow {
            projection: "orders".into(),
            version,
            table_name: format!("orders_v{version}"),
            spec: serde_json::json!({}),
            state,
            events_done: done,
            events_total: total,
            created_at: chrono::Utc::now(),
            activated_at: None,
            retired_at: None,
        }
    }

    #[test]
    fn the_phase_comes_from_the_version_registry() {
        assert_eq!(phase(1, &[], false), "Pending");
        assert_eq!(
            phase(1, &[row(1, VersionState::Active, 0, 0)], false),
            "Ready"
        );
        assert_eq!(
            phase(1, &[row(1, VersionState::Active, 0, 0)], true),
            "Halted"
        );
        let building = [
            row(1, VersionState::Active, 0, 0),
            row(2, VersionState::Building, 40, 100),
        ];
        assert_eq!(phase(2, &building, false), "Building 40/100");
        assert_eq!(
            phase(3, &building, false),
            "Pending",
            "a version no rebuild has started"
        );
    }

    #[test]
    fn the_table_aligns_columns_and_shows_dashes_for_unknowns() {
        let text = table(&[Listed {
            name: "orders".into(),
            version: 2,
            active: Some(1),
            phase: "Building 40/100".into(),
            lag_seconds: None,
            dead_letters: Some(3),
            applied_by: None,
            query_processes: (1, 2),
            source: "cli".into(),
        }])
        .unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME"));
        assert!(lines[1].starts_with("orders"));
        let columns = |line: &str| line.split_whitespace().count();
        assert_eq!(lines[1].find("2 "), lines[0].find("VERSION"));
        assert!(lines[1].contains("1/2"));
        assert!(columns(lines[1]) >= 8);
    }
}
