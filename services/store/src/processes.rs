//! The running projector and query processes of a database
//! (`eventplane_processes`): each heartbeats with its roles and the catalog
//! generation it has loaded, so projectors can share projections among the
//! live ones and anyone can see whether a catalog change reached every
//! process.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Process {
    pub member: String,
    pub roles: Vec<String>,
    pub catalog_generation: i64,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
}

/// Records that `member` is alive, with its roles and loaded generation.
pub async fn heartbeat(
    conn: impl PgExecutor<'_>,
    member: &str,
    roles: &[&str],
    catalog_generation: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO eventplane_processes (member, roles, catalog_generation) VALUES ($1, $2, $3) \
         ON CONFLICT (member) DO UPDATE SET roles = EXCLUDED.roles, \
             catalog_generation = EXCLUDED.catalog_generation, heartbeat_at = now()",
    )
    .bind(member)
    .bind(roles)
    .bind(catalog_generation)
    .execute(conn)
    .await?;
    Ok(())
}

/// The processes whose last heartbeat is younger than `ttl`, by member;
/// with `role`, only those running it.
pub async fn live(
    conn: impl PgExecutor<'_>,
    role: Option<&str>,
    ttl: Duration,
) -> sqlx::Result<Vec<Process>> {
    sqlx::query_as(
        "SELECT member, roles, catalog_generation, started_at, heartbeat_at FROM eventplane_processes \
         WHERE heartbeat_at > now() - $1 * interval '1 millisecond' AND ($2::text IS NULL OR $2 = ANY(roles)) \
         ORDER BY member",
    )
    .bind(ttl.as_millis() as f64)
    .bind(role)
    .fetch_all(conn)
    .await
}

/// Removes `member` and gives up its leases (a clean shutdown: the others
/// take over at once instead of after the lease expires).
pub async fn leave(conn: &mut sqlx::PgConnection, member: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM projection_leases WHERE member = $1")
        .bind(member)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM eventplane_processes WHERE member = $1")
        .bind(member)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Forgets processes silent for longer than `age` (crashed without
/// leaving); they no longer count anywhere once their heartbeat is older
/// than the lease time, this only keeps the table small.
pub async fn forget_silent(conn: impl PgExecutor<'_>, age: Duration) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "DELETE FROM eventplane_processes WHERE heartbeat_at < now() - $1 * interval '1 millisecond'",
    )
    .bind(age.as_millis() as f64)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
