//! Assembles the roles into a running process: pools, migrations, the HTTP
//! routers and the background tasks. `Stack` is what `main`, `dev`, the
//! tests and the benchmark start.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use sqlx::PgPool;
use tokio::task::JoinHandle;

use eventplane_store::events::Appender;
use eventplane_store::events::notify::CommitSignal;
use eventplane_store::{Projection, db, jobs};

use crate::command::{self, CommandConfig, CommandState};
use crate::invalidation::redis_manager;
use crate::metrics::{Metrics, metrics_handler};
use crate::projector::{self, ProjectorConfig};
use crate::query::{self, QueryConfig, QueryService};

#[derive(Clone, Debug)]
pub struct Roles {
    pub command: bool,
    pub projector: bool,
    pub query: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        command: true,
        projector: true,
        query: true,
    };
}

#[derive(Clone, Debug)]
pub struct StackConfig {
    pub database_url: String,
    pub read_database_url: Option<String>,
    pub db_max_connections: u32,
    pub read_max_connections: u32,
    pub redis_url: Option<String>,
    pub projections: Vec<Arc<Projection>>,
    pub listen: SocketAddr,
    pub roles: Roles,
    pub command: CommandConfig,
    pub projector: ProjectorConfig,
    pub query: QueryConfig,
}

impl StackConfig {
    /// Every role, default tuning, on an ephemeral loopback port.
    pub fn local(
        database_url: &str,
        redis_url: Option<&str>,
        projections: Vec<Arc<Projection>>,
    ) -> Self {
        StackConfig {
            database_url: database_url.to_string(),
            read_database_url: None,
            db_max_connections: 16,
            read_max_connections: 16,
            redis_url: redis_url.map(str::to_string),
            projections,
            listen: "127.0.0.1:0".parse().expect("a valid address"),
            roles: Roles::ALL,
            command: CommandConfig::default(),
            projector: ProjectorConfig::default(),
            query: QueryConfig::default(),
        }
    }
}

/// A running process: its address and tasks. Dropping it stops every task,
/// as a crash would (open transactions roll back).
pub struct Stack {
    pub addr: SocketAddr,
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    tasks: Vec<JoinHandle<()>>,
    subscription: Option<Arc<JoinHandle<()>>>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for task in self.tasks.iter().chain(self.subscription.as_deref()) {
            task.abort();
        }
    }
}

impl Stack {
    pub async fn start(config: StackConfig) -> anyhow::Result<Stack> {
        let pool = db::connect(&config.database_url, config.db_max_connections, "primary").await?;
        db::migrate(&pool).await?;
        let metrics = Metrics::new();
        metrics.watch_pool("primary", &pool);
        let mut tasks = Vec::new();
        let mut app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/metrics", get(metrics_handler).with_state(metrics.clone()));

        let redis = match &config.redis_url {
            Some(url) => match redis_manager(url).await {
                Ok(manager) => Some((manager, url.clone())),
                Err(err) => {
                    tracing::warn!(error = %err, "redis unreachable at start; caching and invalidation disabled");
                    None
                }
            },
            None => None,
        };

        if config.roles.command {
            let (signal, notifier) = CommitSignal::start(pool.clone());
            tasks.push(notifier);
            let (appender, committers) = Appender::start(
                pool.clone(),
                config.command.group_commit.clone(),
                metrics.command_batch_size.clone(),
                signal.clone(),
            );
            tasks.extend(committers);
            tasks.extend(jobs::start_workers(
                pool.clone(),
                config.command.job_workers,
                metrics.jobs_processed.clone(),
                signal,
            ));
            let state = CommandState {
                pool: pool.clone(),
                appender,
                metrics: metrics.clone(),
            };
            app = app.merge(command::router(state, config.command.max_body_bytes));
        }
        if config.roles.projector {
            let handles = projector::start(
                pool.clone(),
                &config.projections,
                redis.as_ref().map(|(m, _)| m.clone()),
                metrics.clone(),
                config.projector.clone(),
            )
            .await?;
            tasks.extend(handles);
        }
        let mut subscription = None;
        if config.roles.query {
            let read_pool = match &config.read_database_url {
                Some(url) => {
                    let read = db::connect(url, config.read_max_connections, "read").await?;
                    metrics.watch_pool("read", &read);
                    read
                }
                None => pool.clone(),
            };
            let service = QueryService::new(
                &config.projections,
                read_pool,
                redis.clone(),
                metrics.clone(),
                config.query.clone(),
            );
            subscription = service.subscription.clone();
            app = app.merge(query::router(service));
        }

        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        tasks.push(tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(error = %err, "http server stopped");
            }
        }));
        tracing::info!(%addr, roles = ?config.roles, "eventplane serving");
        Ok(Stack {
            addr,
            pool,
            metrics,
            tasks,
            subscription,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}
