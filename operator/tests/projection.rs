//! The Projection controller against a mocked API server (every request
//! asserted) and a real Postgres: the finalizer, the declaration in the
//! catalog and the first version, rebuild Jobs (created, failed, replaced),
//! deletion with each reclaim policy, a missing Secret and a refused
//! declaration.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use common::{ApiServer, Seen, context};
use eventplane_api::{Projection, ProjectionSpec};
use eventplane_operator::projection::reconcile::{FINALIZER, reconcile};
use eventplane_operator::projection::{JobConfig, State, job};
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::{Value, json};

const NS: &str = "shop";
use eventplane_api::examples::ORDERS;
const PROJECTION_PATH: &str = "/apis/eventplane.io/v1alpha1/namespaces/shop/projections/orders";
const STATUS_PATH: &str = "/apis/eventplane.io/v1alpha1/namespaces/shop/projections/orders/status";
const SECRET_PATH: &str = "/api/v1/namespaces/shop/secrets/orders-db";
const JOBS_PATH: &str = "/apis/batch/v1/namespaces/shop/jobs";
const DEPLOYMENT_PATH: &str = "/apis/apps/v1/namespaces/shop/deployments/orders-query";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
/// Who the operator declares this resource as in the catalog.
const SOURCE: &str = "operator:shop/orders";

/// The catalog entries: name, declared version, source, generation.
async fn catalog_rows(db: &Db) -> Vec<(String, i32, String, i64)> {
    sqlx::query_as("SELECT name, version, source, generation FROM projection_catalog ORDER BY name")
        .fetch_all(&db.pool().await)
        .await
        .unwrap()
}

fn fixed_now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

type Db = common::TestDb;

/// What these tests need of their database beyond creating it.
trait ProjectionDb: Sized {
    async fn with_version_1(self) -> Self;
    async fn relations(&self) -> Vec<(String, String)>;
}

impl ProjectionDb for Db {
    /// The projection declared at version 1, as an earlier reconcile of
    /// this resource left it.
    async fn with_version_1(self) -> Self {
        let pool = self.pool().await;
        eventplane_store::db::migrate(&pool).await.unwrap();
        eventplane_store::catalog::apply(&pool, "orders", &spec(1, json!({})), SOURCE)
            .await
            .unwrap();
        self
    }

    /// Kind of each relation, by name (`r` table, `v` view).
    async fn relations(&self) -> Vec<(String, String)> {
        sqlx::query_as(
            "SELECT relname::text, relkind::text FROM pg_class \
             WHERE relnamespace = 'public'::regnamespace AND relname LIKE 'orders%' \
             AND relkind IN ('r', 'v') ORDER BY 1",
        )
        .fetch_all(&self.pool().await)
        .await
        .unwrap()
    }
}

fn spec(version: u32, extra: Value) -> ProjectionSpec {
    let mut spec = serde_json::to_value(
        eventplane_api::load_manifests(ORDERS)
            .unwrap()
            .remove(0)
            .spec,
    )
    .unwrap();
    spec["version"] = json!(version);
    spec["database"] = json!({"secretName": "orders-db"});
    // Without the index that serves `recent`, so one declared query scans
    // the whole table and the warning path is exercised.
    spec["indexes"]
        .as_array_mut()
        .unwrap()
        .retain(|index| index["name"] != "by_created");
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    serde_json::from_value(spec).unwrap()
}

struct Setup {
    version: u32,
    extra: Value,
    finalizer: bool,
    status: Option<Value>,
    deleted_minutes_ago: Option<i64>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            version: 1,
            extra: json!({}),
            finalizer: true,
            status: None,
            deleted_minutes_ago: None,
        }
    }
}

fn projection(setup: Setup) -> Arc<Projection> {
    let mut p = Projection::new("orders", spec(setup.version, setup.extra));
    p.metadata.namespace = Some(NS.into());
    p.metadata.uid = Some("4f1c-uid".into());
    p.metadata.generation = Some(7);
    if setup.finalizer {
        p.metadata.finalizers = Some(vec![FINALIZER.into()]);
    }
    if let Some(minutes) = setup.deleted_minutes_ago {
        let at = fixed_now() - chrono::Duration::minutes(minutes);
        p.metadata.deletion_timestamp = Some(eventplane_operator::conditions::time(at));
    }
    p.status = setup.status.map(|s| serde_json::from_value(s).unwrap());
    Arc::new(p)
}

fn setup() -> (Arc<State>, ApiServer) {
    let (mut ctx, server) = context();
    Arc::get_mut(&mut ctx).expect("only reference").now = fixed_now;
    let jobs = JobConfig {
        image: "ghcr.io/eventplane/eventplane:test".into(),
        redis_secret: "eventplane-redis".into(),
        redis_key: "url".into(),
    };
    (State::new(ctx, jobs), server)
}

fn secret(url: &str) -> Value {
    let encoded = base64::engine::general_purpose::STANDARD.encode(url);
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "orders-db", "namespace": NS}, "data": {"url": encoded}})
}

fn job_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": items})
}

fn rebuild_job(version: u32, spec: &ProjectionSpec, status: Value) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": format!("orders-rebuild-v{version}"),
            "namespace": NS,
            "labels": {
                "app.kubernetes.io/managed-by": "eventplane-operator",
                "eventplane.io/projection": "orders",
                "eventplane.io/version": version.to_string(),
            },
            "annotations": {"eventplane.io/spec-hash": job::spec_hash(spec)},
        },
        "spec": {"template": {}},
        "status": status,
    })
}

async fn expect_secret(server: &mut ApiServer, db: &Db) {
    server
        .expect(Method::GET, SECRET_PATH)
        .await
        .reply(StatusCode::OK, secret(&db.url));
}

async fn expect_job_list(server: &mut ApiServer, items: Vec<Value>) {
    let seen = server.expect(Method::GET, JOBS_PATH).await;
    let selector = query_param(&seen, "labelSelector");
    assert_eq!(
        selector,
        "app.kubernetes.io/managed-by=eventplane-operator,eventplane.io/projection=orders"
    );
    seen.reply(StatusCode::OK, job_list(items));
}

/// The query Deployment does not exist: scaling is skipped. It is looked
/// up with everything else a reconcile observes, before any action.
async fn expect_no_deployment(server: &mut ApiServer) {
    server
        .expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .not_found();
}

fn query_param(seen: &Seen, key: &str) -> String {
    url::form_urlencoded::parse(seen.query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

async fn expect_event(server: &mut ApiServer, kind: &str, reason: &str) -> Value {
    let seen = server.expect(Method::POST, EVENTS_PATH).await;
    assert_eq!(seen.body["type"], kind, "{}", seen.body);
    assert_eq!(seen.body["reason"], reason, "{}", seen.body);
    assert_eq!(seen.body["regarding"]["kind"], "Projection");
    assert_eq!(seen.body["regarding"]["name"], "orders");
    let body = seen.body.clone();
    seen.echo();
    body
}

/// Expects the status patch (server-side apply by our field manager) and
/// returns the `status`.
async fn expect_status(server: &mut ApiServer) -> Value {
    let seen = server.expect(Method::PATCH, STATUS_PATH).await;
    assert_eq!(query_param(&seen, "fieldManager"), "eventplane-operator");
    assert_eq!(query_param(&seen, "force"), "true");
    assert_eq!(seen.body["kind"], "Projection");
    let status = seen.body["status"].clone();
    let mut object = serde_json::to_value(&*projection(Setup::default())).unwrap();
    object["status"] = status.clone();
    seen.reply(StatusCode::OK, object);
    status
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn ready_v1() -> Value {
    json!({"phase": "Ready", "activeVersion": 1, "activeTable": "orders_v1",
           "queries": [{"name": "recent", "fullScan": true, "cost": 1.0, "plan": "Seq Scan"}]})
}

#[tokio::test]
async fn a_new_projection_gets_a_finalizer_then_its_first_version_and_a_ready_status() {
    let db = Db::new().await;
    let (state, mut server) = setup();
    let run = tokio::spawn(reconcile(
        projection(Setup {
            finalizer: false,
            ..Setup::default()
        }),
        state.clone(),
    ));
    let seen = server.expect(Method::PATCH, PROJECTION_PATH).await;
    assert_eq!(
        seen.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["eventplane.io/cleanup"]},
        ])
    );
    let mut object = serde_json::to_value(&*projection(Setup::default())).unwrap();
    object["metadata"]["finalizers"] = json!([FINALIZER]);
    seen.reply(StatusCode::OK, object);
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    server.expect_nothing(Duration::from_millis(100)).await;

    // With the finalizer in place: the first version and the status.
    let run = tokio::spawn(reconcile(projection(Setup::default()), state));
    expect_secret(&mut server, &db).await;
    expect_job_list(&mut server, vec![]).await;
    expect_no_deployment(&mut server).await;
    let ready = expect_event(&mut server, "Normal", "Ready").await;
    assert_eq!(ready["action"], "Ready/v1");
    assert_eq!(ready["note"], "version 1 is active");
    // No index serves `recent`'s order.
    let event = expect_event(&mut server, "Warning", "QueryScansWholeTable").await;
    assert_eq!(event["action"], "Explain/recent", "{event}");
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("Seq Scan on orders_v1"),
        "{event}"
    );
    let status = expect_status(&mut server).await;
    let action = run.await.unwrap().unwrap();

    assert_eq!(
        db.relations().await,
        vec![
            ("orders".to_string(), "v".to_string()),
            ("orders_v1".to_string(), "r".to_string()),
        ]
    );
    assert_eq!(status["observedGeneration"], 7);
    assert_eq!(status["phase"], "Ready");
    assert_eq!(status["activeVersion"], 1);
    assert_eq!(status["activeTable"], "orders_v1");
    assert_eq!(status["lagEvents"], 0);
    assert!(status.get("building").is_none(), "{status}");
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(condition(&status, "Ready")["reason"], "VersionCurrent");
    assert_eq!(condition(&status, "Reconciling")["status"], "False");
    assert_eq!(condition(&status, "Stalled")["status"], "False");
    assert_eq!(condition(&status, "Degraded")["status"], "False");
    let queries = status["queries"].as_array().unwrap();
    assert_eq!(queries.len(), 3);
    let by_customer = &queries[0];
    assert_eq!(by_customer["name"], "by_customer");
    assert_eq!(by_customer["fullScan"], false, "{by_customer}");
    assert!(
        by_customer["plan"]
            .as_str()
            .unwrap()
            .contains("Index Scan using orders_v1_by_customer"),
        "{by_customer}"
    );
    assert!(by_customer["cost"].as_f64().unwrap() > 0.0);
    assert_eq!(queries[1]["name"], "by_status");
    assert_eq!(queries[1]["fullScan"], false, "{}", queries[1]);
    assert_eq!(queries[2]["name"], "recent");
    assert_eq!(queries[2]["fullScan"], true);
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));

    // The resource is what the services serve: its spec is in the catalog.
    let rows = catalog_rows(&db).await;
    assert_eq!(rows.len(), 1);
    let (name, version, source, generation) = &rows[0];
    assert_eq!(
        (name.as_str(), *version, source.as_str()),
        ("orders", 1, SOURCE)
    );
    assert_eq!(status["catalogGeneration"], json!(generation));
    assert_eq!(
        status["served"], "query 0/0, projector 0/0",
        "no service runs yet"
    );
}

#[tokio::test]
async fn a_version_bump_creates_an_owned_rebuild_job_and_reports_building() {
    let db = Db::new().await.with_version_1().await;
    let (state, mut server) = setup();
    let run = tokio::spawn(reconcile(
        projection(Setup {
            version: 2,
            extra: json!({"rebuild": {"backoffLimit": 4}}),
            status: Some(ready_v1()),
            ..Setup::default()
        }),
        state,
    ));
    expect_secret(&mut server, &db).await;
    expect_job_list(&mut server, vec![]).await;
    expect_no_deployment(&mut server).await;

    let created = server
        .expect(Method::PATCH, &format!("{JOBS_PATH}/orders-rebuild-v2"))
        .await;
    assert_eq!(query_param(&created, "fieldManager"), "eventplane-operator");
    let body = created.body.clone();
    assert_eq!(body["kind"], "Job");
    assert_eq!(
        body["metadata"]["ownerReferences"],
        json!([{"apiVersion": "eventplane.io/v1alpha1", "kind": "Projection", "name": "orders",
                "uid": "4f1c-uid", "controller": true, "blockOwnerDeletion": true}])
    );
    let labels = &body["metadata"]["labels"];
    assert_eq!(
        labels["app.kubernetes.io/managed-by"],
        "eventplane-operator"
    );
    assert_eq!(labels["eventplane.io/projection"], "orders");
    assert_eq!(labels["eventplane.io/version"], "2");
    assert_eq!(body["spec"]["backoffLimit"], 4);
    assert_eq!(body["spec"]["template"]["spec"]["restartPolicy"], "Never");
    let container = &body["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "ghcr.io/eventplane/eventplane:test");
    assert_eq!(container["args"], json!(["rebuild"]));
    let env = container["env"].as_array().unwrap();
    let manifest: Value = serde_json::from_str(env[0]["value"].as_str().unwrap()).unwrap();
    assert_eq!(manifest["metadata"]["name"], "orders");
    assert_eq!(manifest["spec"]["version"], 2);
    assert_eq!(
        env[1]["valueFrom"]["secretKeyRef"],
        json!({"name": "orders-db", "key": "url"})
    );
    assert_eq!(env[2]["valueFrom"]["secretKeyRef"]["optional"], true);
    created.echo();

    let event = expect_event(&mut server, "Normal", "Building").await;
    assert_eq!(event["action"], "Building/v2");
    let status = expect_status(&mut server).await;
    let action = run.await.unwrap().unwrap();
    assert_eq!(status["phase"], "Building");
    assert_eq!(status["activeVersion"], 1);
    assert_eq!(status["building"]["version"], 2);
    assert_eq!(status["building"]["table"], "orders_v2");
    assert_eq!(status["building"]["job"], "orders-rebuild-v2");
    assert_eq!(condition(&status, "Ready")["status"], "False");
    assert_eq!(condition(&status, "Reconciling")["status"], "True");
    assert_eq!(condition(&status, "Reconciling")["reason"], "Rebuilding");
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn a_failed_rebuild_job_reports_failed_and_degraded_with_a_warning() {
    let db = Db::new().await.with_version_1().await;
    let (state, mut server) = setup();
    let wanted = spec(2, json!({}));
    let failed = rebuild_job(
        2,
        &wanted,
        json!({"failed": 3, "startTime": "2026-03-01T11:50:00Z", "conditions": [{
            "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
            "message": "Job has reached the specified backoff limit",
            "lastTransitionTime": "2026-03-01T11:58:00Z"}]}),
    );
    let building = json!({"phase": "Building", "activeVersion": 1, "building": {"version": 2, "table": "orders_v2"}});
    let run = tokio::spawn(reconcile(
        projection(Setup {
            version: 2,
            status: Some(building),
            ..Setup::default()
        }),
        state,
    ));
    expect_secret(&mut server, &db).await;
    expect_job_list(&mut server, vec![failed]).await;
    expect_no_deployment(&mut server).await;
    let event = expect_event(&mut server, "Warning", "RebuildFailed").await;
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("version 1 keeps serving"),
        "{event}"
    );
    // The previous status had no query checks yet.
    expect_event(&mut server, "Warning", "QueryScansWholeTable").await;
    let status = expect_status(&mut server).await;
    let action = run.await.unwrap().unwrap();
    assert_eq!(status["phase"], "Failed");
    assert_eq!(status["activeVersion"], 1);
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "BackoffLimitExceeded");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("orders-rebuild-v2")
    );
    assert_eq!(condition(&status, "Ready")["status"], "False");
    assert_eq!(condition(&status, "Stalled")["status"], "True");
    assert_eq!(action, Action::requeue(Duration::from_secs(120)));
}

#[tokio::test]
async fn a_job_for_a_version_no_longer_wanted_is_deleted_then_the_new_one_created() {
    let db = Db::new().await.with_version_1().await;
    let (state, mut server) = setup();
    let running = rebuild_job(
        2,
        &spec(2, json!({})),
        json!({"active": 1, "startTime": "2026-03-01T11:55:00Z"}),
    );
    let building_v2 = json!({"phase": "Building", "activeVersion": 1, "activeTable": "orders_v1",
        "building": {"version": 2, "table": "orders_v2"}, "queries": ready_v1()["queries"]});
    let run = tokio::spawn(reconcile(
        projection(Setup {
            version: 3,
            status: Some(building_v2),
            ..Setup::default()
        }),
        state.clone(),
    ));
    expect_secret(&mut server, &db).await;
    expect_job_list(&mut server, vec![running.clone()]).await;
    expect_no_deployment(&mut server).await;
    let deleted = server
        .expect(Method::DELETE, &format!("{JOBS_PATH}/orders-rebuild-v2"))
        .await;
    assert_eq!(deleted.body["propagationPolicy"], "Foreground");
    let mut terminating = running.clone();
    terminating["metadata"]["deletionTimestamp"] = json!("2026-03-01T12:00:00Z");
    deleted.reply(StatusCode::OK, terminating.clone());
    let cancelled = expect_event(&mut server, "Normal", "RebuildCancelled").await;
    assert_eq!(cancelled["action"], "Cancel/orders-rebuild-v2");
    assert!(
        cancelled["note"]
            .as_str()
            .unwrap()
            .contains("spec.version is 3")
    );
    expect_event(&mut server, "Normal", "Building").await;
    let status = expect_status(&mut server).await;
    let action = run.await.unwrap().unwrap();
    assert_eq!(status["phase"], "Building");
    assert_eq!(status["building"]["version"], 3);
    assert_eq!(
        condition(&status, "Reconciling")["reason"],
        "PreviousRebuildStopping"
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));

    // The old Job is gone: the new one is created.
    let run = tokio::spawn(reconcile(
        projection(Setup {
            version: 3,
            status: Some(status),
            ..Setup::default()
        }),
        state,
    ));
    expect_secret(&mut server, &db).await;
    expect_job_list(&mut server, vec![]).await;
    expect_no_deployment(&mut server).await;
    let created = server
        .expect(Method::PATCH, &format!("{JOBS_PATH}/orders-rebuild-v3"))
        .await;
    assert_eq!(
        created.body["metadata"]["labels"]["eventplane.io/version"],
        "3"
    );
    created.echo();
    let status = expect_status(&mut server).await;
    run.await.unwrap().unwrap();
    assert_eq!(status["phase"], "Building");
    assert_eq!(condition(&status, "Reconciling")["reason"], "Rebuilding");
    server.expect_nothing(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_query_deployment_outside_the_bounds_is_scaled_into_them_and_reported() {
    let db = Db::new().await;
    let (state, mut server) = setup();
    let run = tokio::spawn(reconcile(
        projection(Setup {
            extra: json!({"scaling": {"maxReplicas": 3}}),
            status: Some(ready_v1()),
            ..Setup::default()
        }),
        state,
    ));
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "orders-query", "namespace": NS},
        "spec": {
            "replicas": 5,
            "selector": {"matchLabels": {"app": "orders-query"}},
            "template": {"metadata": {"labels": {"app": "orders-query"}}},
        },
    });
    expect_secret(&mut server, &db).await;
    expect_job_list(&mut server, vec![]).await;
    // Observed: the Deployment and its pods (none ready to scrape).
    server
        .expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(StatusCode::OK, deployment.clone());
    let pods = server
        .expect(Method::GET, "/api/v1/namespaces/shop/pods")
        .await;
    assert_eq!(query_param(&pods, "labelSelector"), "app=orders-query");
    pods.reply(
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
    );
    // Applied: read again right before the write, then only spec.replicas.
    server
        .expect(Method::GET, DEPLOYMENT_PATH)
        .await
        .reply(StatusCode::OK, deployment);
    let patch = server.expect(Method::PATCH, DEPLOYMENT_PATH).await;
    assert_eq!(
        query_param(&patch, "fieldManager"),
        "eventplane-operator-scaling"
    );
    assert_eq!(patch.body["spec"], json!({"replicas": 3}));
    patch.echo();
    // Still Ready on version 1: the only Event is the scaling.
    let scaled = expect_event(&mut server, "Normal", "Scaled").await;
    assert_eq!(scaled["action"], "Scale/orders-query");
    assert_eq!(
        scaled["note"],
        "orders-query: 5 → 3 replicas (Bounds: 5 replicas wanted (query rate not measured), bounded to [1, 3])"
    );
    let status = expect_status(&mut server).await;
    let action = run.await.unwrap().unwrap();
    assert_eq!(status["replicas"], 3);
    assert_eq!(status["selector"], "app=orders-query");
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    server.expect_nothing(Duration::from_millis(100)).await;
}

/// Expects the JSON patch that removes our finalizer.
async fn expect_finalizer_removed(server: &mut ApiServer) {
    let seen = server.expect(Method::PATCH, PROJECTION_PATH).await;
    assert_eq!(
        seen.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ])
    );
    let object = serde_json::to_value(&*projection(Setup::default())).unwrap();
    seen.reply(StatusCode::OK, object);
}

#[tokio::test]
async fn deleting_with_reclaim_policy_delete_drops_every_table_then_releases_the_finalizer() {
    let db = Db::new().await.with_version_1().await;
    assert_eq!(db.relations().await.len(), 2);
    let (state, mut server) = setup();
    let run = tokio::spawn(reconcile(
        projection(Setup {
            extra: json!({"reclaimPolicy": "Delete"}),
            deleted_minutes_ago: Some(1),
            ..Setup::default()
        }),
        state,
    ));
    expect_job_list(&mut server, vec![]).await;
    expect_secret(&mut server, &db).await;
    let event = expect_event(&mut server, "Normal", "TablesDropped").await;
    assert!(
        event["note"].as_str().unwrap().contains("orders_v1"),
        "{event}"
    );
    expect_finalizer_removed(&mut server).await;
    run.await.unwrap().unwrap();
    assert!(db.relations().await.is_empty());
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_versions")
        .fetch_one(&db.pool().await)
        .await
        .unwrap();
    assert_eq!(versions, 0);
}

#[tokio::test]
async fn deleting_with_reclaim_policy_retain_stops_serving_and_keeps_the_tables() {
    let db = Db::new().await.with_version_1().await;
    assert_eq!(catalog_rows(&db).await.len(), 1);
    let (state, mut server) = setup();
    let run = tokio::spawn(reconcile(
        projection(Setup {
            deleted_minutes_ago: Some(1),
            ..Setup::default()
        }),
        state,
    ));
    expect_job_list(&mut server, vec![]).await;
    expect_secret(&mut server, &db).await;
    let event = expect_event(&mut server, "Normal", "NoLongerServed").await;
    assert!(
        event["note"].as_str().unwrap().contains("tables stay"),
        "{event}"
    );
    expect_finalizer_removed(&mut server).await;
    run.await.unwrap().unwrap();
    assert!(
        catalog_rows(&db).await.is_empty(),
        "the services stop serving it"
    );
    assert_eq!(db.relations().await.len(), 2, "the tables stay");
}

#[tokio::test]
async fn a_spec_change_moves_the_catalog_generation_and_the_same_spec_does_not() {
    let db = Db::new().await.with_version_1().await;
    let before = catalog_rows(&db).await[0].3;
    let (state, mut server) = setup();
    let changed = json!({"cache": {"enabled": false}});
    let run = tokio::spawn(reconcile(
        projection(Setup {
            extra: changed.clone(),
            status: Some(ready_v1()),
            ..Setup::default()
        }),
        state.clone(),
    ));
    expect_secret(&mut server, &db).await;
    expect_job_list(&mut server, vec![]).await;
    expect_no_deployment(&mut server).await;
    let status = expect_status(&mut server).await;
    run.await.unwrap().unwrap();
    let after = catalog_rows(&db).await[0].3;
    assert!(after > before, "the change is a new catalog generation");
    assert_eq!(status["catalogGeneration"], json!(after));

    let run = tokio::spawn(reconcile(
        projection(Setup {
            extra: changed,
            status: Some(status),
            ..Setup::default()
        }),
        state,
    ));
    expect_secret(&mut server, &db).await;
    expect_job_list(&mut server, vec![]).await;
    expect_no_deployment(&mut server).await;
    expect_status(&mut server).await;
    run.await.unwrap().unwrap();
    assert_eq!(
        catalog_rows(&db).await[0].3,
        after,
        "the same spec changes nothing"
    );
}

#[tokio::test]
async fn a_declaration_the_catalog_refuses_stalls_with_its_reason_and_changes_nothing() {
    let db = Db::new().await.with_version_1().await;
    let (state, mut server) = setup();
    // Another resource declaring the event store's own table.
    let mut p = (*projection(Setup::default())).clone();
    p.metadata.name = Some("intruder".into());
    p.spec.table = "events".into();
    let run = tokio::spawn(reconcile(Arc::new(p), state));
    expect_secret(&mut server, &db).await;
    let seen = server.expect(Method::POST, EVENTS_PATH).await;
    assert_eq!(seen.body["reason"], "DeclarationRefused", "{}", seen.body);
    assert!(
        seen.body["note"]
            .as_str()
            .unwrap()
            .contains("\"events\" is taken"),
        "{}",
        seen.body
    );
    seen.echo();
    let seen = server
        .expect(
            Method::PATCH,
            "/apis/eventplane.io/v1alpha1/namespaces/shop/projections/intruder/status",
        )
        .await;
    let status = seen.body["status"].clone();
    let mut object = serde_json::to_value(&*projection(Setup::default())).unwrap();
    object["metadata"]["name"] = json!("intruder");
    object["status"] = status.clone();
    seen.reply(StatusCode::OK, object);
    run.await.unwrap().unwrap();
    assert_eq!(condition(&status, "Stalled")["status"], "True");
    assert_eq!(
        condition(&status, "Stalled")["reason"],
        "DeclarationRefused"
    );
    assert_eq!(catalog_rows(&db).await.len(), 1, "nothing declared");
    let events_kind: String =
        sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE relname = 'events'")
            .fetch_one(&db.pool().await)
            .await
            .unwrap();
    assert_eq!(events_kind, "p", "the event store's table is untouched");
}

#[tokio::test]
async fn deleting_with_an_unreachable_database_retries_then_gives_up_after_ten_minutes() {
    let unreachable = "postgres://postgres@127.0.0.1:1/nothing";
    let deleting = |minutes| {
        projection(Setup {
            extra: json!({"reclaimPolicy": "Delete"}),
            deleted_minutes_ago: Some(minutes),
            ..Setup::default()
        })
    };
    let (state, mut server) = setup();
    let run = tokio::spawn(reconcile(deleting(2), state));
    expect_job_list(&mut server, vec![]).await;
    server
        .expect(Method::GET, SECRET_PATH)
        .await
        .reply(StatusCode::OK, secret(unreachable));
    let err = run.await.unwrap().expect_err("the finalizer stays");
    assert!(err.to_string().contains("cannot connect"), "{err}");
    server.expect_nothing(Duration::from_millis(100)).await;

    let (state, mut server) = setup();
    let run = tokio::spawn(reconcile(deleting(11), state));
    expect_job_list(&mut server, vec![]).await;
    server
        .expect(Method::GET, SECRET_PATH)
        .await
        .reply(StatusCode::OK, secret(unreachable));
    let event = expect_event(&mut server, "Warning", "TablesLeftBehind").await;
    assert!(
        event["note"].as_str().unwrap().contains("left behind"),
        "{event}"
    );
    expect_finalizer_removed(&mut server).await;
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn deleting_stops_a_running_rebuild_before_dropping_tables() {
    let (state, mut server) = setup();
    let running = rebuild_job(2, &spec(2, json!({})), json!({"active": 1}));
    let run = tokio::spawn(reconcile(
        projection(Setup {
            extra: json!({"reclaimPolicy": "Delete"}),
            deleted_minutes_ago: Some(1),
            ..Setup::default()
        }),
        state,
    ));
    expect_job_list(&mut server, vec![running.clone()]).await;
    let deleted = server
        .expect(Method::DELETE, &format!("{JOBS_PATH}/orders-rebuild-v2"))
        .await;
    assert_eq!(deleted.body["propagationPolicy"], "Foreground");
    deleted.reply(StatusCode::OK, running);
    let err = run.await.unwrap().expect_err("waits for the Job");
    assert!(err.to_string().contains("orders-rebuild-v2"), "{err}");
    server.expect_nothing(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_missing_secret_stalls_the_projection() {
    let (state, mut server) = setup();
    let run = tokio::spawn(reconcile(projection(Setup::default()), state));
    server.expect(Method::GET, SECRET_PATH).await.not_found();
    let event = expect_event(&mut server, "Warning", "SecretNotFound").await;
    assert!(event["note"].as_str().unwrap().contains("orders-db"));
    let status = expect_status(&mut server).await;
    let action = run.await.unwrap().unwrap();
    assert_eq!(status["phase"], "Pending");
    assert_eq!(condition(&status, "Stalled")["status"], "True");
    assert_eq!(condition(&status, "Stalled")["reason"], "SecretNotFound");
    assert_eq!(condition(&status, "Ready")["status"], "False");
    assert_eq!(action, Action::requeue(Duration::from_secs(120)));
}

#[tokio::test]
async fn a_projection_without_a_database_stalls_without_reading_anything() {
    let (state, mut server) = setup();
    let mut p = (*projection(Setup::default())).clone();
    p.spec.database = None;
    let run = tokio::spawn(reconcile(Arc::new(p), state));
    expect_event(&mut server, "Warning", "DatabaseNotSet").await;
    let status = expect_status(&mut server).await;
    run.await.unwrap().unwrap();
    assert_eq!(condition(&status, "Stalled")["reason"], "DatabaseNotSet");
}
