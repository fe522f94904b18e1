//! End-to-end against a real Kubernetes cluster, run when `KUBECONFIG` is
//! set (no API server can run on the build machines; there the suite says
//! it was skipped and why).
//!
//! It applies the generated CRDs, a Secret and a PartitionPolicy, runs the
//! PartitionPolicy controller in this process against the cluster, and
//! waits for the policy to be Ready with its partitions in the status. The
//! database must be reachable from this process: `E2E_DATABASE_URL`
//! (default: DATABASE_URL, then the local Postgres).

use std::time::Duration;

use eventplane_api::PartitionPolicy;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use serde_json::json;

fn cluster_configured() -> bool {
    match std::env::var_os("KUBECONFIG") {
        Some(path) if !path.is_empty() => true,
        _ => {
            eprintln!(
                "SKIPPED end-to-end cluster suite: KUBECONFIG is not set, and no Kubernetes API server can run on this machine"
            );
            false
        }
    }
}

async fn apply_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("eventplane-e2e").force();
    for (_, yaml) in eventplane_operator::crds::all()? {
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&yaml)?;
        let name = crd.metadata.name.clone().expect("CRDs are named");
        crds.patch(&name, &params, &Patch::Apply(&crd)).await?;
        let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(30), established).await??;
    }
    Ok(())
}

#[tokio::test]
async fn a_partition_policy_becomes_ready_on_a_real_cluster() -> anyhow::Result<()> {
    if !cluster_configured() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    apply_crds(&client).await?;

    let namespace = format!("eventplane-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": namespace}}))?,
        )
        .await?;

    let database_url = std::env::var("E2E_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let table = format!("e2e_events_{}", std::process::id());
    let pool = sqlx::PgPool::connect(&database_url).await?;
    let ddl = format!(
        "CREATE TABLE {table} (id bigint NOT NULL, at timestamptz NOT NULL) PARTITION BY RANGE (at)"
    );
    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&pool).await?;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let secret = json!({"metadata": {"name": "e2e-db"}, "stringData": {"url": database_url}});
    secrets
        .create(&PostParams::default(), &serde_json::from_value(secret)?)
        .await?;
    let policies: Api<PartitionPolicy> = Api::namespaced(client.clone(), &namespace);
    let policy = json!({
        "apiVersion": "eventplane.io/v1alpha1", "kind": "PartitionPolicy",
        "metadata": {"name": "e2e"},
        "spec": {"database": {"secretName": "e2e-db"}, "table": table, "column": "at", "premake": 2}
    });
    policies
        .create(&PostParams::default(), &serde_json::from_value(policy)?)
        .await?;

    let ctx = eventplane_operator::context::Context::new(
        client.clone(),
        eventplane_operator::metrics::Metrics::new(),
    );
    let controller = tokio::spawn(eventplane_operator::partitionpolicy::run(ctx));
    let ready = await_condition(policies.clone(), "e2e", |p: Option<&PartitionPolicy>| {
        p.and_then(|p| p.status.as_ref()).is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    });
    let outcome = tokio::time::timeout(Duration::from_secs(60), ready).await;
    controller.abort();

    let status = policies.get("e2e").await?.status.unwrap_or_default();
    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&pool)
        .await?;
    outcome.map_err(|_| anyhow::anyhow!("policy not Ready within 60 s; status: {status:?}"))??;
    assert_eq!(status.partitions.len(), 3, "current month and two premade");
    Ok(())
}
