//! Connection pools and migrations. Every connection gets a statement
//! timeout guard for idle transactions: the tail horizon waits for every
//! running write transaction, so none of ours may stay open for long.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a transaction may sit idle before Postgres ends it; longer than
/// any of our transactions wait between statements.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";

/// How a pool connects and how long its work may wait.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_connections: u32,
    /// Longest a caller waits for a free connection.
    pub acquire_timeout: Duration,
    /// `statement_timeout` of every connection, if any: the longest one
    /// statement (lock waits included) may run before Postgres cancels it.
    pub statement_timeout: Option<Duration>,
    /// `lock_timeout` of every connection, if any: the longest one statement
    /// waits for a lock before Postgres fails it with `lock_not_available`.
    pub lock_timeout: Option<Duration>,
    /// Connect on first use instead of at start: a process whose read
    /// replica is down still starts (and falls back, or answers 503).
    pub lazy: bool,
    /// Check a connection before handing it out only when it has been idle
    /// at least this long; `None` checks every one (sqlx's default). Each
    /// check is a round trip: for short reads, as costly as the read.
    pub check_idle_after: Option<Duration>,
}

impl PoolConfig {
    pub fn new(max_connections: u32) -> Self {
        PoolConfig {
            max_connections,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            statement_timeout: None,
            lock_timeout: None,
            lazy: false,
            check_idle_after: None,
        }
    }
}

/// Long enough to ride out a burst, short enough that a saturated pool
/// answers 503 instead of holding clients.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn connect(url: &str, max_connections: u32, name: &str) -> sqlx::Result<PgPool> {
    connect_with(url, name, &PoolConfig::new(max_connections)).await
}

pub async fn connect_with(url: &str, name: &str, config: &PoolConfig) -> sqlx::Result<PgPool> {
    let mut settings = vec![(
        "idle_in_transaction_session_timeout",
        IDLE_IN_TRANSACTION_TIMEOUT.to_string(),
    )];
    for (name, timeout) in [
        ("statement_timeout", config.statement_timeout),
        ("lock_timeout", config.lock_timeout),
    ] {
        if let Some(timeout) = timeout {
            settings.push((name, format!("{}ms", timeout.as_millis().max(1))));
        }
    }
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()?
        .application_name(&format!("eventplane-{name}"))
        .options(settings);
    let mut pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout);
    if let Some(idle) = config.check_idle_after {
        pool = pool
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= idle {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            });
    }
    if config.lazy {
        Ok(pool.connect_lazy_with(options))
    } else {
        pool.connect_with(options).await
    }
}

/// Errors that say the database is busy or out of reach rather than that
/// it refused the work: no connection came free, a statement ran past its
/// timeout or waited past `lock_timeout`, too many connections, the
/// connection broke. Retrying later may succeed.
pub fn is_busy(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| matches!(code.as_ref(), "57014" | "55P03" | "53300" | "57P01")),
        _ => false,
    }
}

/// Runs an idempotent read once more when its connection turned out to be
/// dead (the server restarted since the pool last used it): sqlx drops
/// such a connection, so the second try gets another.
pub async fn read_retrying<T, F, Fut>(read: F) -> sqlx::Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = sqlx::Result<T>>,
{
    match read().await {
        Err(sqlx::Error::Io(err)) => {
            tracing::debug!(error = %err, "a read's connection was dead; reading again");
            read().await
        }
        other => other,
    }
}

/// Errors that say a value cannot be stored (SQLSTATE class 22, data
/// exception: a NUL in a string, a number out of range): the request that
/// carries it fails, and nothing else.
pub fn is_data_error(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code.starts_with("22"))
}

/// This database's name among all others (`eventplane_instance`), made by
/// the migrations.
pub async fn instance_id(conn: impl sqlx::PgExecutor<'_>) -> sqlx::Result<String> {
    sqlx::query_scalar("SELECT id FROM eventplane_instance")
        .fetch_one(conn)
        .await
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
