//! Which projector process applies which projection
//! (`projection_leases`). A lease is held while it is renewed; one that
//! expires may be taken by another live projector. Leases share the work;
//! they are not what keeps it exactly-once: every batch locks its
//! checkpoint row, so even two holders for a moment could never apply an
//! event twice.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Lease {
    pub projection: String,
    pub member: String,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Renews `member`'s leases on `projections` and takes those that are free
/// or expired, for `ttl` from now; returns the projections it holds now.
pub async fn hold(
    conn: impl PgExecutor<'_>,
    member: &str,
    projections: &[String],
    ttl: Duration,
) -> sqlx::Result<Vec<String>> {
    if projections.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "INSERT INTO projection_leases AS l (projection, member, expires_at) \
         SELECT p, $1, now() + $3 * interval '1 millisecond' FROM unnest($2::text[]) AS p \
         ON CONFLICT (projection) DO UPDATE SET member = EXCLUDED.member, expires_at = EXCLUDED.expires_at, \
             acquired_at = CASE WHEN l.member = EXCLUDED.member THEN l.acquired_at ELSE now() END \
         WHERE l.member = EXCLUDED.member OR l.expires_at < now() \
         RETURNING projection",
    )
    .bind(member)
    .bind(projections)
    .bind(ttl.as_millis() as f64)
    .fetch_all(conn)
    .await
}

/// Gives up `member`'s lease on `projection`.
pub async fn release(
    conn: impl PgExecutor<'_>,
    member: &str,
    projection: &str,
) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM projection_leases WHERE member = $1 AND projection = $2")
        .bind(member)
        .bind(projection)
        .execute(conn)
        .await?;
    Ok(())
}

/// The unexpired leases, by projection.
pub async fn current(conn: impl PgExecutor<'_>) -> sqlx::Result<Vec<Lease>> {
    sqlx::query_as(
        "SELECT projection, member, acquired_at, expires_at FROM projection_leases \
         WHERE expires_at > now() ORDER BY projection",
    )
    .fetch_all(conn)
    .await
}

/// Who holds the unexpired lease on `projection`, if anyone.
pub async fn holder(conn: impl PgExecutor<'_>, projection: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT member FROM projection_leases WHERE projection = $1 AND expires_at > now()",
    )
    .bind(projection)
    .fetch_optional(conn)
    .await
}
