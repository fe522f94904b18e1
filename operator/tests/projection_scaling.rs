//! Applying a replica count to a query Deployment against a mocked API
//! server: the exact requests, and that a Deployment whose replicas another
//! manager owns is left alone; listing the query pods to scrape.

mod common;

use std::time::Duration;

use common::context;
use eventplane_operator::projection::scaling::Signals;
use eventplane_operator::projection::scaling::ownership::{
    ApplyOutcome, SCALING_MANAGER, apply_replicas,
};
use eventplane_operator::projection::scaling::scrape::observe;
use http::{Method, StatusCode};
use serde_json::{Value, json};

const NS: &str = "shop";
const DEPLOYMENT_PATH: &str = "/apis/apps/v1/namespaces/shop/deployments/orders-query";

fn deployment(labels: Value, replicas: i32, managed_fields: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "orders-query",
            "namespace": NS,
            "labels": labels,
            "managedFields": managed_fields,
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "orders-query"}},
            "template": {"metadata": {"labels": {"app": "orders-query"}}},
        },
    })
}

fn replicas_owner(manager: &str, subresource: Option<&str>) -> Value {
    let mut entry = json!({
        "manager": manager,
        "operation": "Update",
        "apiVersion": "apps/v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:replicas": {}}},
    });
    if let Some(subresource) = subresource {
        entry["subresource"] = json!(subresource);
    }
    entry
}

fn query_params(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

#[tokio::test]
async fn free_replicas_are_applied_with_the_scaling_field_manager() {
    let (ctx, mut server) = context();
    let client = ctx.client.clone();
    let call = tokio::spawn(async move { apply_replicas(&client, NS, "orders-query", 4).await });

    server
        .expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(StatusCode::OK, deployment(json!({}), 2, json!([])));
    let patch = server.expect(Method::PATCH, DEPLOYMENT_PATH).await;
    let params = query_params(&patch.query);
    assert!(
        params.contains(&("fieldManager".into(), SCALING_MANAGER.into())),
        "{params:?}"
    );
    assert!(!params.iter().any(|(k, _)| k == "force"), "{params:?}");
    assert_eq!(
        patch.body,
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"replicas": 4}})
    );
    patch.reply(StatusCode::OK, deployment(json!({}), 4, json!([])));

    let outcome = call.await.unwrap().unwrap();
    assert_eq!(outcome, ApplyOutcome::Applied { from: 2, to: 4 });
}

#[tokio::test]
async fn replicas_owned_by_an_hpa_are_left_alone() {
    let (ctx, mut server) = context();
    let client = ctx.client.clone();
    let call = tokio::spawn(async move { apply_replicas(&client, NS, "orders-query", 4).await });

    let owned = deployment(
        json!({"app.kubernetes.io/managed-by": "eventplane-operator"}),
        2,
        json!([replicas_owner("kube-controller-manager", Some("scale"))]),
    );
    server
        .expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(StatusCode::OK, owned);

    let outcome = call.await.unwrap().unwrap();
    assert_eq!(
        outcome,
        ApplyOutcome::OwnedBy("kube-controller-manager".into())
    );
    server.expect_nothing(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn operator_deployment_created_by_kubectl_is_taken_over_with_force() {
    let (ctx, mut server) = context();
    let client = ctx.client.clone();
    let call = tokio::spawn(async move { apply_replicas(&client, NS, "orders-query", 3).await });

    let created = deployment(
        json!({"app.kubernetes.io/managed-by": "eventplane-operator"}),
        1,
        json!([replicas_owner("kubectl-create", None)]),
    );
    server
        .expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(StatusCode::OK, created);
    let patch = server.expect(Method::PATCH, DEPLOYMENT_PATH).await;
    let params = query_params(&patch.query);
    assert!(params.contains(&("fieldManager".into(), SCALING_MANAGER.into())));
    assert!(
        params.contains(&("force".into(), "true".into())),
        "{params:?}"
    );
    assert_eq!(patch.body["spec"], json!({"replicas": 3}));
    patch.echo();

    let outcome = call.await.unwrap().unwrap();
    assert_eq!(outcome, ApplyOutcome::Applied { from: 1, to: 3 });
}

#[tokio::test]
async fn equal_replicas_send_no_patch() {
    let (ctx, mut server) = context();
    let client = ctx.client.clone();
    let call = tokio::spawn(async move { apply_replicas(&client, NS, "orders-query", 2).await });

    server
        .expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(StatusCode::OK, deployment(json!({}), 2, json!([])));

    assert_eq!(call.await.unwrap().unwrap(), ApplyOutcome::Unchanged);
    server.expect_nothing(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_conflict_on_apply_reports_the_other_owner() {
    let (ctx, mut server) = context();
    let client = ctx.client.clone();
    let call = tokio::spawn(async move { apply_replicas(&client, NS, "orders-query", 5).await });

    server
        .expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(StatusCode::OK, deployment(json!({}), 2, json!([])));
    server.expect(Method::PATCH, DEPLOYMENT_PATH).await.reply(
        StatusCode::CONFLICT,
        json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
            "message": "Apply failed with 1 conflict: conflict with \"kubectl-edit\" using apps/v1: .spec.replicas",
        }),
    );

    assert_eq!(
        call.await.unwrap().unwrap(),
        ApplyOutcome::OwnedBy("kubectl-edit".into())
    );
}

#[tokio::test]
async fn a_missing_deployment_is_reported_not_created() {
    let (ctx, mut server) = context();
    let client = ctx.client.clone();
    let call = tokio::spawn(async move { apply_replicas(&client, NS, "orders-query", 2).await });

    server
        .expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .not_found();

    assert_eq!(call.await.unwrap().unwrap(), ApplyOutcome::Missing);
    server.expect_nothing(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn observe_lists_pods_by_selector_and_skips_those_not_ready() {
    let (ctx, mut server) = context();
    let client = ctx.client.clone();
    let call = tokio::spawn(async move { observe(&client, NS, "app=orders-query", None).await });

    let list = server
        .expect(Method::GET, "/api/v1/namespaces/shop/pods")
        .await;
    assert!(
        query_params(&list.query).contains(&("labelSelector".into(), "app=orders-query".into())),
        "{}",
        list.query
    );
    list.reply(
        StatusCode::OK,
        json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {},
            "items": [
                {"metadata": {"name": "starting", "uid": "u1"}, "status": {"phase": "Pending"}},
                {"metadata": {"name": "unready", "uid": "u2"}, "status": {"phase": "Running", "podIP": "10.0.0.2",
                    "conditions": [{"type": "Ready", "status": "False"}]}},
            ],
        }),
    );

    let (signals, scrape) = call.await.unwrap();
    assert_eq!(signals, Signals::default());
    assert!(scrape.pods.is_empty());
}

#[tokio::test]
async fn observe_survives_a_failed_pod_list() {
    let (ctx, mut server) = context();
    let client = ctx.client.clone();
    let call = tokio::spawn(async move { observe(&client, NS, "app=orders-query", None).await });

    server
        .expect(Method::GET, "/api/v1/namespaces/shop/pods")
        .await
        .reply(
            StatusCode::FORBIDDEN,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "forbidden"}),
        );

    let (signals, scrape) = call.await.unwrap();
    assert_eq!(signals, Signals::default());
    assert!(scrape.pods.is_empty());
}
