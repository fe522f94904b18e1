//! Leader election against a mocked API server: the Lease requests a
//! replica makes to take, renew or respect leadership.

mod common;

use chrono::{DateTime, Utc};
use eventplane_operator::leader::{LeaseConfig, try_acquire};
use http::{Method, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use std::time::Duration;

const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/eventplane/leases/eventplane-operator";
const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/eventplane/leases";

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        name: "eventplane-operator".into(),
        identity: identity.into(),
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
    }
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-26T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn lease(holder: &str, renewed: &str, version: &str) -> serde_json::Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "eventplane-operator", "namespace": "eventplane", "resourceVersion": version},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renewed, "leaseTransitions": 0}
    })
}

#[tokio::test]
async fn the_first_replica_creates_the_lease() {
    let (ctx, mut server) = common::context();
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), "eventplane");
    let attempt = tokio::spawn(async move { try_acquire(&api, &config("pod-a"), now()).await });
    server.expect(Method::GET, LEASE_PATH).await.not_found();
    let create = server.expect(Method::POST, LEASES_PATH).await;
    assert_eq!(create.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(create.body["spec"]["leaseDurationSeconds"], 15);
    create.echo();
    assert!(attempt.await.unwrap().unwrap());
}

#[tokio::test]
async fn a_replica_respects_a_fresh_lease_and_writes_nothing() {
    let (ctx, mut server) = common::context();
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), "eventplane");
    let attempt = tokio::spawn(async move { try_acquire(&api, &config("pod-b"), now()).await });
    server.expect(Method::GET, LEASE_PATH).await.reply(
        StatusCode::OK,
        lease("pod-a", "2026-11-26T09:59:55.000000Z", "7"),
    );
    assert!(!attempt.await.unwrap().unwrap());
    server.expect_nothing(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_with_its_resource_version() {
    let (ctx, mut server) = common::context();
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), "eventplane");
    let attempt = tokio::spawn(async move { try_acquire(&api, &config("pod-b"), now()).await });
    server.expect(Method::GET, LEASE_PATH).await.reply(
        StatusCode::OK,
        lease("pod-a", "2026-11-26T09:59:00.000000Z", "7"),
    );
    let replace = server.expect(Method::PUT, LEASE_PATH).await;
    assert_eq!(
        replace.body["metadata"]["resourceVersion"], "7",
        "optimistic concurrency on the takeover"
    );
    assert_eq!(replace.body["spec"]["holderIdentity"], "pod-b");
    assert_eq!(replace.body["spec"]["leaseTransitions"], 1);
    replace.echo();
    assert!(attempt.await.unwrap().unwrap());
}

#[tokio::test]
async fn losing_the_takeover_race_is_not_an_error() {
    let (ctx, mut server) = common::context();
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), "eventplane");
    let attempt = tokio::spawn(async move { try_acquire(&api, &config("pod-b"), now()).await });
    server.expect(Method::GET, LEASE_PATH).await.reply(
        StatusCode::OK,
        lease("pod-a", "2026-11-26T09:59:00.000000Z", "7"),
    );
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"});
    server
        .expect(Method::PUT, LEASE_PATH)
        .await
        .reply(StatusCode::CONFLICT, conflict);
    assert!(!attempt.await.unwrap().unwrap());
}
