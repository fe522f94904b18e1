//! Connection pools and migrations. Every connection gets a statement
//! timeout guard for idle transactions: the tail horizon waits for every
//! running write transaction, so none of ours may stay open for long.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a transaction may sit idle before Postgres ends it; longer than
/// any of our transactions wait between statements.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";

pub async fn connect(url: &str, max_connections: u32, name: &str) -> sqlx::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()?
        .application_name(&format!("eventplane-{name}"))
        .options([(
            "idle_in_transaction_session_timeout",
            IDLE_IN_TRANSACTION_TIMEOUT,
        )]);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Applies pending migrations and makes sure this month's and next month's
/// event partitions exist.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await?;
    sqlx::query("SELECT eventplane_ensure_event_partitions(1)")
        .execute(pool)
        .await?;
    Ok(())
}

/// Calls `wake` for every `NOTIFY` on `channel`, and once each time the
/// listening connection is (re)established, since anything notified while
/// it was down was missed. Reconnects after a second when the connection
/// drops; runs until the task is aborted.
pub async fn forward_notifications(pool: PgPool, channel: &'static str, wake: impl Fn()) {
    loop {
        let result: sqlx::Result<()> = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(channel).await?;
            wake();
            loop {
                listener.recv().await?;
                wake();
            }
        }
        .await;
        if let Err(err) = result {
            tracing::warn!(channel, error = %err, "notification listener lost its connection");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
