//! A throw-away database per benchmark run, so figures never depend on
//! what an earlier run left behind.

use anyhow::Context;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

pub struct BenchDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl BenchDatabase {
    /// Creates `eventplane_bench_<timestamp>` on the server `admin_url`
    /// points at.
    pub async fn create(admin_url: &str) -> anyhow::Result<BenchDatabase> {
        let name = format!(
            "eventplane_bench_{}",
            chrono::Utc::now().format("%Y%m%d%H%M%S%3f")
        );
        let mut url = reqwest::Url::parse(admin_url).context("DATABASE_URL is not a URL")?;
        url.set_path(&format!("/{name}"));
        let mut conn = PgConnection::connect(admin_url)
            .await
            .context("connecting to DATABASE_URL")?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            eventplane_api::quote_ident(&name)
        )))
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating database {name}"))?;
        conn.close().await.ok();
        Ok(BenchDatabase {
            admin_url: admin_url.to_string(),
            name,
            url: url.to_string(),
        })
    }

    /// This database on another server with the same databases (a
    /// streaming replica): `server`'s URL with this database's name.
    pub fn on(&self, server: &str) -> anyhow::Result<String> {
        let mut url = reqwest::Url::parse(server).context("the replica URL is not a URL")?;
        url.set_path(&format!("/{}", self.name));
        Ok(url.to_string())
    }

    /// Drops the database, ending any connection a stopped task left open.
    pub async fn drop_database(&self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            eventplane_api::quote_ident(&self.name)
        )))
        .execute(&mut conn)
        .await?;
        conn.close().await.ok();
        Ok(())
    }
}
