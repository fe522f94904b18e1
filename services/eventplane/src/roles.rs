//! Entry points of the single-role subcommands: each builds a `Stack` with
//! one role enabled and serves until it is stopped.

use crate::cli::{CommandRole, DbArgs, ProjectorRole, QueryRole};
use crate::server::{Roles, Stack, StackConfig};

pub async fn migrate(db: DbArgs) -> anyhow::Result<()> {
    let pool = crate::db::connect(&db.database_url, 1, "migrate").await?;
    crate::db::migrate(&pool).await?;
    tracing::info!("migrations applied");
    Ok(())
}

fn base(db: &DbArgs, listen: std::net::SocketAddr, roles: Roles) -> StackConfig {
    let mut config = StackConfig::local(&db.database_url, None, Vec::new());
    config.db_max_connections = db.db_max_connections;
    config.listen = listen;
    config.roles = roles;
    config
}

pub async fn command(role: CommandRole) -> anyhow::Result<()> {
    let mut config = base(
        &role.db,
        role.listen.listen,
        Roles {
            command: true,
            projector: false,
            query: false,
        },
    );
    config.command = role.command;
    serve(config).await
}

pub async fn projector(role: ProjectorRole) -> anyhow::Result<()> {
    let mut config = base(
        &role.db,
        role.listen.listen,
        Roles {
            command: false,
            projector: true,
            query: false,
        },
    );
    config.redis_url = role.redis.redis_url;
    config.projections = crate::projections::load(&role.projections.projections)?;
    config.projector = role.projector.config();
    serve(config).await
}

pub async fn query(role: QueryRole) -> anyhow::Result<()> {
    let mut config = base(
        &role.db,
        role.listen.listen,
        Roles {
            command: false,
            projector: false,
            query: true,
        },
    );
    config.redis_url = role.redis.redis_url;
    config.projections = crate::projections::load(&role.projections.projections)?;
    config.read_database_url = role.query.read_database_url.clone();
    config.read_max_connections = role.query.read_max_connections;
    config.query = role.query.config();
    serve(config).await
}

async fn serve(config: StackConfig) -> anyhow::Result<()> {
    let _stack = Stack::start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
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
