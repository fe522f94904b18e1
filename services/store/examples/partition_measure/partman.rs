//! The same plans run by pg_partman 4.x on an identical table, when the
//! extension is installed: `create_parent` for the premake plan, and
//! `create_partition_time` for the holes plus `run_maintenance` for premake
//! and retention on the loaded table (pg_partman 4 does not fill holes by
//! itself).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// Whether `CREATE EXTENSION pg_partman` can succeed here.
pub async fn available(pool: &PgPool) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_partman')",
    )
    .fetch_one(pool)
    .await?)
}

pub async fn install(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS partman;
         CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA partman;",
    )
    .execute(pool)
    .await?;
    let version: String = sqlx::query_scalar(
        "SELECT extversion::text FROM pg_extension WHERE extname = 'pg_partman'",
    )
    .fetch_one(pool)
    .await?;
    println!("pg_partman {version} installed in the scratch database");
    Ok(())
}

/// Monthly partitions of `table` from the month of `start` up to `premake`
/// months after the current one, and pg_partman's default partition.
pub async fn create_parent(
    pool: &PgPool,
    table: &str,
    start: DateTime<Utc>,
    premake: i32,
) -> anyhow::Result<()> {
    sqlx::query(
        "SELECT partman.create_parent(p_parent_table => $1, p_control => 'recorded_at',
                p_type => 'native', p_interval => 'monthly', p_premake => $2,
                p_start_partition => $3)",
    )
    .bind(format!("public.{table}"))
    .bind(premake)
    .bind(start.format("%Y-%m-%d %H:%M:%S+00").to_string())
    .execute(pool)
    .await?;
    Ok(())
}

/// Sets the loaded table's maintenance to the policy the executor runs:
/// `premake` months ahead, months older than `keep` dropped.
pub async fn configure(pool: &PgPool, table: &str, premake: i32, keep: u32) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE partman.part_config
            SET premake = $2, retention = $3, retention_keep_table = false
          WHERE parent_table = $1",
    )
    .bind(format!("public.{table}"))
    .bind(premake)
    .bind(format!("{keep} months"))
    .execute(pool)
    .await?;
    Ok(())
}

/// Makes the partitions holding `months` (the holes). Without the ANALYZE
/// of the parent pg_partman would run by default, which the executor does
/// not do either.
pub async fn create_partitions(
    pool: &PgPool,
    table: &str,
    months: &[DateTime<Utc>],
) -> anyhow::Result<()> {
    sqlx::query("SELECT partman.create_partition_time($1, $2, p_analyze => false)")
        .bind(format!("public.{table}"))
        .bind(months)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn run_maintenance(pool: &PgPool, table: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT partman.run_maintenance(p_parent_table => $1, p_analyze => false)")
        .bind(format!("public.{table}"))
        .execute(pool)
        .await?;
    Ok(())
}
