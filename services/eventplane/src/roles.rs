//! Entry points of the single-role subcommands: each builds a `Stack` with
//! one role enabled and serves until it is stopped.

use axum::ServiceExt as _;
use eventplane_store::{Projection, catalog};

use crate::projections::CLI_SOURCE;

use crate::cli::{
    CatalogArgs, CommandRole, DbArgs, ListenArgs, ProjectorRole, QueryRole, RebuildArgs, RelayRole,
};
use crate::metrics::Metrics;
use crate::projector::rebuild::{self, RebuildOptions};
use crate::server::{Roles, Stack, StackConfig};

pub async fn migrate(db: DbArgs) -> anyhow::Result<()> {
    let pool = eventplane_store::db::connect(&db.database_url, 1, "migrate").await?;
    eventplane_store::db::migrate(&pool).await?;
    tracing::info!("migrations applied");
    Ok(())
}

/// The manifests given at start are declared in the catalog; the process
/// serves whatever the catalog holds.
fn declare(config: &mut StackConfig, catalog: &CatalogArgs) -> anyhow::Result<()> {
    if let Some(path) = &catalog.projections {
        config.declare = crate::projections::load(path)?;
    }
    config.catalog_resync = catalog.resync();
    Ok(())
}

fn base(db: &DbArgs, listen: &ListenArgs, roles: Roles) -> StackConfig {
    let mut config = StackConfig::local(&db.database_url, None, Vec::new());
    config.db_max_connections = db.db_max_connections;
    config.acquire_timeout = db.acquire_timeout();
    config.listen = listen.listen;
    config.admin_listen = listen.admin_listen;
    config.roles = roles;
    config
}

pub async fn command(role: CommandRole) -> anyhow::Result<()> {
    let mut config = base(
        &role.db,
        &role.listen,
        Roles {
            command: true,
            projector: false,
            query: false,
        },
    );
    config.command = role.command.config();
    config.auth = role.auth.config();
    serve(config).await
}

pub async fn projector(role: ProjectorRole) -> anyhow::Result<()> {
    let mut config = base(
        &role.db,
        &role.listen,
        Roles {
            command: false,
            projector: true,
            query: false,
        },
    );
    config.redis_url = role.redis.redis_url;
    declare(&mut config, &role.catalog)?;
    config.projector = role.projector.config();
    config.projector.kafka = role.source.kafka();
    serve(config).await
}

pub async fn query(role: QueryRole) -> anyhow::Result<()> {
    let mut config = base(
        &role.db,
        &role.listen,
        Roles {
            command: false,
            projector: false,
            query: true,
        },
    );
    config.redis_url = role.redis.redis_url;
    declare(&mut config, &role.catalog)?;
    config.read_database_url = role.query.read_database_url.clone();
    config.read_max_connections = role.query.read_max_connections;
    config.query = role.query.config();
    config.auth = role.auth.config();
    serve(config).await
}

/// `eventplane relay`: the outbox relay, with its admin listener
/// (`/relay/status` beside the usual health and metrics routes).
pub async fn relay(role: RelayRole) -> anyhow::Result<()> {
    let pool = eventplane_store::db::connect(&role.db.database_url, 4, "relay").await?;
    eventplane_store::db::migrate(&pool).await?;
    let metrics = Metrics::new();
    metrics.watch_pool("primary", &pool);
    let config = role.config();
    tracing::info!(topic = %config.topic, relay = %config.name, holder = %config.holder, "relay starting");
    let relay = crate::relay::Relay::start(pool.clone(), config, metrics.clone()).await?;
    let admin = crate::admin::router(crate::admin::Admin {
        pool,
        metrics,
        follower: None,
    })
    .merge(crate::relay::status_router(relay.status.clone()));
    let listener = tokio::net::TcpListener::bind(role.admin_listen).await?;
    let server = tokio::spawn(async move {
        if let Err(err) =
            axum::serve(listener, crate::edge::around(admin).into_make_service()).await
        {
            tracing::error!(error = %err, "admin server stopped");
        }
    });
    shutdown_signal().await;
    tracing::info!("shutting down");
    relay.stop().await;
    server.abort();
    Ok(())
}

/// `eventplane rebuild`: what a rebuild Job runs. Prints the report as JSON.
pub async fn rebuild(args: RebuildArgs) -> anyhow::Result<()> {
    let text = match (&args.manifest, &args.projection) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)?,
        (None, None) => anyhow::bail!(
            "give --projection FILE or --manifest TEXT (EVENTPLANE_PROJECTION_MANIFEST)"
        ),
    };
    let manifest = eventplane_api::load_manifests(&text)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the manifest holds no Projection"))?;
    let projection = Projection::from_manifest(manifest);
    let pool = eventplane_store::db::connect(&args.db.database_url, 4, "rebuild").await?;
    eventplane_store::db::migrate(&pool).await?;
    // What is built is what is declared: a spec the catalog does not hold
    // yet is declared first (a rebuild Job's spec is declared already, by
    // the operator), so no projector undoes the swap.
    catalog::apply(&pool, &projection.name, &projection.spec, CLI_SOURCE)
        .await
        .map_err(|err| anyhow::anyhow!("projection {}: {err}", projection.name))?;
    let redis = match &args.redis_url {
        Some(url) => Some(crate::redis_conn::open(url).await?),
        None => None,
    };
    let options = RebuildOptions::from_spec(&projection.spec);
    let report = rebuild::run(&pool, &projection, redis, Metrics::new(), &options).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

async fn serve(config: StackConfig) -> anyhow::Result<()> {
    let stack = Stack::start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    stack.shutdown().await;
    Ok(())
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
