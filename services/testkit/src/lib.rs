//! Test support shared by Eventplane's crates: the real Postgres and Redis
//! the test script started (`DATABASE_URL`, `REDIS_URL`), a fresh database
//! per test, and polling for a condition with a deadline.

use std::time::{Duration, Instant};

use sqlx::PgPool;

pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The streaming replica of the server at `DATABASE_URL` that
/// `tests/ensure-replica.sh` keeps (its databases are the primary's).
pub fn replica_url() -> String {
    std::env::var("EVENTPLANE_REPLICA_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5433/postgres".into())
}

/// A database of the test's own, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let _ = eventplane_telemetry::init(false);
        let name = format!("ep_test_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPool::connect(&admin_url())
            .await
            .expect("postgres reachable at DATABASE_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let mut url = url::Url::parse(&admin_url()).expect("DATABASE_URL is a URL");
        url.set_path(&name);
        TestDb {
            name,
            url: url.to_string(),
        }
    }

    /// This database as the replica serves it, once the replica has
    /// replayed its creation.
    pub async fn on_replica(&self) -> String {
        let mut url = url::Url::parse(&replica_url()).expect("EVENTPLANE_REPLICA_URL is a URL");
        url.set_path(&self.name);
        let url = url.to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match PgPool::connect(&url).await {
                Ok(pool) => {
                    pool.close().await;
                    return url;
                }
                Err(err) if Instant::now() > deadline => panic!(
                    "the replica at {} has no database {} ({err}); tests/ensure-replica.sh starts one",
                    replica_url(),
                    self.name
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee: use a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(admin) = PgPool::connect(&admin_url()).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&admin)
                    .await;
                }
            });
        })
        .join();
    }
}

/// Polls `check` every 10 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
