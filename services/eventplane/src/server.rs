//! Assembles the roles into a running process: pools, migrations, the HTTP
//! routers and the background tasks. `Stack` is what `main`, `dev`, the
//! tests and the benchmark start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::{Router, ServiceExt as _};
use sqlx::PgPool;
use tokio::task::JoinHandle;

use eventplane_api::ProjectionManifest;
use eventplane_store::db::PoolConfig;
use eventplane_store::events::Appender;
use eventplane_store::events::notify::CommitSignal;
use eventplane_store::{catalog, db, jobs};

use crate::auth::{AuthConfig, Authenticator};
use crate::catalog::{FollowConfig, Follower, member_name};
use crate::command::{self, CommandConfig, CommandState};
use crate::invalidation::Scope;
use crate::metrics::Metrics;
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
    /// Longest any caller waits for a free database connection.
    pub acquire_timeout: Duration,
    pub redis_url: Option<String>,
    /// Declared in the catalog at start (`--projections`, the dev stack's
    /// sample), under `declared_by`; the roles then serve whatever the
    /// catalog holds.
    pub declare: Vec<ProjectionManifest>,
    pub declared_by: String,
    pub listen: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub admin_listen: SocketAddr,
    /// Bearer-token checks of the API; `None` lets every request through.
    pub auth: Option<AuthConfig>,
    pub roles: Roles,
    pub command: CommandConfig,
    pub projector: ProjectorConfig,
    pub query: QueryConfig,
    /// Longest a missed catalog notification leaves this process behind.
    pub catalog_resync: Duration,
    /// This process's name among the database's processes (default: the
    /// host name and a random suffix).
    pub member: Option<String>,
}

impl StackConfig {
    /// Every role, default tuning, on an ephemeral loopback port.
    pub fn local(
        database_url: &str,
        redis_url: Option<&str>,
        declare: Vec<ProjectionManifest>,
    ) -> Self {
        StackConfig {
            database_url: database_url.to_string(),
            read_database_url: None,
            db_max_connections: 16,
            read_max_connections: 16,
            acquire_timeout: db::DEFAULT_ACQUIRE_TIMEOUT,
            redis_url: redis_url.map(str::to_string),
            declare,
            declared_by: "files".into(),
            listen: "127.0.0.1:0".parse().expect("a valid address"),
            admin_listen: "127.0.0.1:0".parse().expect("a valid address"),
            auth: None,
            roles: Roles::ALL,
            command: CommandConfig::default(),
            projector: ProjectorConfig::default(),
            query: QueryConfig::default(),
            catalog_resync: Duration::from_secs(2),
            member: None,
        }
    }
}

/// A running process: its address and tasks. Dropping it stops every task,
/// as a crash would (open transactions roll back).
pub struct Stack {
    /// The API listener.
    pub addr: SocketAddr,
    /// The admin listener: `/metrics`, `/healthz`, `/readyz`, no token.
    pub admin_addr: SocketAddr,
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    /// The catalog this process follows (projector and query roles).
    pub follower: Option<Follower>,
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
        let pool = db::connect_with(
            &config.database_url,
            "primary",
            &PoolConfig {
                acquire_timeout: config.acquire_timeout,
                ..PoolConfig::new(config.db_max_connections)
            },
        )
        .await?;
        db::migrate(&pool).await?;
        let metrics = Metrics::new();
        metrics.watch_pool("primary", &pool);
        let mut tasks = Vec::new();
        let mut app = Router::new();

        for manifest in &config.declare {
            catalog::apply(
                &pool,
                &manifest.metadata.name,
                &manifest.spec,
                &config.declared_by,
            )
            .await
            .map_err(|err| anyhow::anyhow!("projection {}: {err}", manifest.metadata.name))?;
        }

        let scope = Scope::new(&db::instance_id(&pool).await?);
        let redis = match &config.redis_url {
            Some(url) => match crate::redis_conn::open(url).await {
                Ok(manager) => Some((manager, url.clone())),
                Err(err) => {
                    tracing::warn!(error = %err, "redis unreachable at start; caching and invalidation disabled");
                    None
                }
            },
            None => None,
        };

        if config.roles.command {
            // Appends run on a pool of their own whose statement timeout
            // bounds every append transaction (lock waits included).
            let commands = db::connect_with(
                &config.database_url,
                "command",
                &PoolConfig {
                    statement_timeout: Some(config.command.append_timeout),
                    acquire_timeout: config.acquire_timeout,
                    ..PoolConfig::new(config.db_max_connections)
                },
            )
            .await?;
            metrics.watch_pool("command", &commands);
            let pool = commands;
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
        let follower = if config.roles.projector || config.roles.query {
            let mut roles = Vec::new();
            if config.roles.projector {
                roles.push(projector::supervisor::ROLE);
            }
            if config.roles.query {
                roles.push(query::ROLE);
            }
            let follow = FollowConfig {
                member: config.member.clone().unwrap_or_else(member_name),
                roles,
                resync: config.catalog_resync,
            };
            let (follower, handles) =
                Follower::start(pool.clone(), follow, metrics.clone()).await?;
            tasks.extend(handles);
            Some(follower)
        } else {
            None
        };
        if let (true, Some(follower)) = (config.roles.projector, &follower) {
            tasks.extend(projector::start(
                pool.clone(),
                follower.clone(),
                redis.as_ref().map(|(m, _)| (m.clone(), scope.clone())),
                metrics.clone(),
                config.projector.clone(),
            ));
        }
        let mut subscription = None;
        if let (true, Some(follower)) = (config.roles.query, &follower) {
            // Reads run on a pool of their own (on a replica when one is
            // given) whose statement timeout bounds every read.
            let read_pool = db::connect_with(
                config
                    .read_database_url
                    .as_deref()
                    .unwrap_or(&config.database_url),
                "read",
                &PoolConfig {
                    statement_timeout: Some(config.query.read_timeout),
                    lock_timeout: Some(query::replica::READ_LOCK_TIMEOUT),
                    check_idle_after: Some(query::replica::READ_CHECK_IDLE_AFTER),
                    acquire_timeout: config.acquire_timeout,
                    lazy: config.read_database_url.is_some(),
                    ..PoolConfig::new(config.read_max_connections)
                },
            )
            .await?;
            metrics.watch_pool("read", &read_pool);
            let reads = query::replica::Reads::new(
                read_pool,
                pool.clone(),
                config.read_database_url.is_some(),
                config.query.replica.clone(),
                metrics.clone(),
            );
            tasks.push(tokio::spawn(reads.clone().monitor()));
            let (service, follow) = QueryService::new(
                follower.clone(),
                reads,
                pool.clone(),
                redis.clone(),
                scope.clone(),
                metrics.clone(),
                config.query.clone(),
            );
            tasks.push(follow);
            subscription = service.subscription.clone();
            app = app.merge(query::router(service));
        }

        let authenticator = match &config.auth {
            Some(auth) => Some(Authenticator::new(auth.clone())?),
            None => None,
        };
        // The API's description needs no token.
        let document = crate::openapi::text();
        let app = app.layer(crate::auth::gate(authenticator)).route(
            "/openapi.json",
            axum::routing::get(move || async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    document,
                )
            }),
        );
        let app = crate::edge::around(app)
            .into_make_service_with_connect_info::<crate::conn::Connection>();
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        // Each connection carries a handle a streaming response can use to
        // drop it when its client stops reading.
        let listener = crate::conn::Droppable(listener);
        tasks.push(tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(error = %err, "http server stopped");
            }
        }));
        let admin = crate::edge::around(crate::admin::router(crate::admin::Admin {
            pool: pool.clone(),
            metrics: metrics.clone(),
            follower: follower.clone(),
        }));
        let admin_listener = tokio::net::TcpListener::bind(config.admin_listen).await?;
        let admin_addr = admin_listener.local_addr()?;
        tasks.push(tokio::spawn(async move {
            if let Err(err) = axum::serve(admin_listener, admin.into_make_service()).await {
                tracing::error!(error = %err, "admin server stopped");
            }
        }));
        tracing::info!(%addr, %admin_addr, roles = ?config.roles, "eventplane serving");
        Ok(Stack {
            addr,
            admin_addr,
            pool,
            metrics,
            follower,
            tasks,
            subscription,
        })
    }

    /// Stops the process cleanly: it leaves the database's process list
    /// and gives up its projection leases, so other projectors take over at
    /// once rather than when the leases expire.
    pub async fn shutdown(mut self) {
        let follower = self.follower.take();
        // Every task stops first, so nothing renews a lease after leaving.
        drop(self);
        if let Some(follower) = follower
            && let Err(err) = follower.leave().await
        {
            tracing::warn!(error = %err, "could not leave the process list; leases expire by themselves");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }
}
