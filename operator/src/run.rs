//! The operator process: optional leader election, the controllers and a
//! small HTTP server for `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

use crate::context::Context;
use crate::leader::{self, LeaseConfig};
use crate::metrics::Metrics;
use crate::projection::JobConfig;

#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "eventplane-operator",
    version = eventplane_telemetry::VERSION,
    about = "Reconciles Projection and PartitionPolicy resources"
)]
pub struct Args {
    /// Address of the metrics and health endpoint.
    #[arg(
        long,
        env = "EVENTPLANE_OPERATOR_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: SocketAddr,
    /// Namespace of the leader-election Lease (normally the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "EVENTPLANE_LEASE_NAME",
        default_value = "eventplane-operator"
    )]
    pub lease_name: String,
    /// This replica's identity in the Lease (normally the pod name).
    #[arg(long, env = "POD_NAME", default_value = "eventplane-operator")]
    pub identity: String,
    /// Act without a Lease (a single replica, or local runs).
    #[arg(long, env = "EVENTPLANE_NO_LEADER_ELECTION")]
    pub no_leader_election: bool,
    /// Log as JSON lines.
    #[arg(long, env = "EVENTPLANE_LOG_JSON")]
    pub log_json: bool,
    /// Image of rebuild Jobs: it runs `eventplane rebuild`.
    #[arg(long, env = "EVENTPLANE_IMAGE")]
    pub image: String,
    /// Secret, in each Projection's namespace, whose `--redis-secret-key`
    /// holds the Redis URL given to rebuild Jobs (so a swap invalidates the
    /// caches). Optional: without it a Job runs without Redis.
    #[arg(
        long,
        env = "EVENTPLANE_REDIS_SECRET",
        default_value = "eventplane-redis"
    )]
    pub redis_secret: String,
    /// Key of the Redis URL in `--redis-secret`.
    #[arg(long, env = "EVENTPLANE_REDIS_SECRET_KEY", default_value = "url")]
    pub redis_secret_key: String,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let metrics = Metrics::new();
    let ctx = Context::new(client.clone(), metrics.clone());

    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { metrics.encode() }
            }),
        );
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let leases: Api<Lease> = Api::namespaced(client.clone(), &args.lease_namespace);
    let lease = LeaseConfig {
        name: args.lease_name.clone(),
        identity: args.identity.clone(),
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
    };
    if !args.no_leader_election {
        leader::acquire(&leases, &lease).await?;
    }
    ctx.metrics.leader.set(1);
    let jobs = JobConfig {
        image: args.image.clone(),
        redis_secret: args.redis_secret.clone(),
        redis_key: args.redis_secret_key.clone(),
    };
    let controllers = controllers(ctx, jobs);
    if args.no_leader_election {
        controllers.await;
        return Ok(());
    }
    tokio::select! {
        _ = controllers => Ok(()),
        _ = leader::hold(&leases, &lease) => anyhow::bail!("leadership lost; exiting so a new leader can act alone"),
    }
}

/// Both controllers, side by side; returns when both have shut down.
async fn controllers(ctx: Arc<Context>, jobs: JobConfig) {
    tokio::join!(
        crate::partitionpolicy::run(ctx.clone()),
        crate::projection::run(ctx, jobs),
    );
}
