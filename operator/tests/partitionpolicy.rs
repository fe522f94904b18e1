//! The PartitionPolicy controller against a mocked API server (every request
//! asserted) and a real Postgres: the exact status patch and Events of a
//! reconcile, the requeue interval, and the error paths.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use common::{ApiServer, Seen, context};
use eventplane_api::{PartitionPolicy, PartitionPolicySpec};
use eventplane_operator::context::Context;
use eventplane_operator::partitionpolicy::reconcile::reconcile;
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use sqlx::PgPool;

const NS: &str = "shop";
const SECRET_PATH: &str = "/api/v1/namespaces/shop/secrets/orders-db";
const STATUS_PATH: &str =
    "/apis/eventplane.io/v1alpha1/namespaces/shop/partitionpolicies/events/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

/// Two minutes before a month boundary: the requeue is due at the boundary.
fn fixed_now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-30T23:58:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// A database of the test's own with `ddl` run in it.
async fn database(ddl: &str) -> common::TestDb {
    let db = common::TestDb::new().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl.to_string()))
        .execute(&db.pool().await)
        .await
        .unwrap();
    db
}

/// The tables attached as partitions, by name.
async fn partitions(db: &common::TestDb) -> Vec<String> {
    let pool = PgPool::connect(&db.url).await.unwrap();
    sqlx::query_scalar("SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE c.relkind = 'r' ORDER BY 1")
        .fetch_all(&pool)
        .await
        .unwrap()
}

const PARTITIONED: &str = "CREATE TABLE events (id bigint NOT NULL, at timestamptz NOT NULL, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)";

fn policy(extra: Value) -> Arc<PartitionPolicy> {
    let mut spec = json!({
        "database": {"secretName": "orders-db"},
        "table": "events",
        "column": "at",
        "premake": 2,
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let spec: PartitionPolicySpec = serde_json::from_value(spec).unwrap();
    let mut policy = PartitionPolicy::new("events", spec);
    policy.metadata.namespace = Some(NS.into());
    policy.metadata.generation = Some(3);
    Arc::new(policy)
}

fn secret(url: &str) -> Value {
    let encoded = base64::engine::general_purpose::STANDARD.encode(url);
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "orders-db", "namespace": NS}, "data": {"url": encoded}})
}

fn fixed_context() -> (Arc<Context>, ApiServer) {
    let (mut ctx, server) = context();
    Arc::get_mut(&mut ctx).expect("only reference").now = fixed_now;
    (ctx, server)
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

/// Expects the status patch, checks it is server-side apply by our field
/// manager, answers with the patched object and returns the `status`.
async fn expect_status(server: &mut ApiServer) -> Value {
    let seen: Seen = server.expect(Method::PATCH, STATUS_PATH).await;
    assert!(
        seen.query.contains("fieldManager=eventplane-operator"),
        "{}",
        seen.query
    );
    assert!(seen.query.contains("force=true"));
    assert_eq!(seen.body["kind"], "PartitionPolicy");
    let status = seen.body["status"].clone();
    let mut object = serde_json::to_value(&*policy(json!({}))).unwrap();
    object["status"] = status.clone();
    seen.reply(StatusCode::OK, object);
    status
}

async fn expect_event(server: &mut ApiServer, kind: &str, reason: &str) -> Value {
    let seen = server.expect(Method::POST, EVENTS_PATH).await;
    assert_eq!(seen.body["type"], kind, "{}", seen.body);
    assert_eq!(seen.body["reason"], reason, "{}", seen.body);
    assert_eq!(seen.body["regarding"]["kind"], "PartitionPolicy");
    assert_eq!(seen.body["regarding"]["name"], "events");
    let body = seen.body.clone();
    seen.echo();
    body
}

#[tokio::test]
async fn a_policy_gets_its_partitions_one_event_per_ddl_step_and_a_ready_status() {
    let db = database(PARTITIONED).await;
    let (ctx, mut server) = fixed_context();
    let run = tokio::spawn(reconcile(policy(json!({})), ctx));

    server
        .expect(Method::GET, SECRET_PATH)
        .await
        .reply(StatusCode::OK, secret(&db.url));
    // November (current) plus two premade months.
    for month in ["2026_11", "2026_12", "2027_01"] {
        let event = expect_event(&mut server, "Normal", "PartitionCreated").await;
        assert!(
            event["note"]
                .as_str()
                .unwrap()
                .contains(&format!("events_p{month}")),
            "{event}"
        );
    }
    let status = expect_status(&mut server).await;
    let action = run.await.unwrap().expect("reconcile succeeds");

    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(condition(&status, "Ready")["reason"], "PartitionsCurrent");
    assert_eq!(condition(&status, "Stalled")["status"], "False");
    assert_eq!(condition(&status, "Reconciling")["status"], "False");
    assert_eq!(status["partitions"].as_array().unwrap().len(), 3);
    assert_eq!(status["premadeUntil"], "2027-02-01T00:00:00Z");
    assert_eq!(status["oldestKept"], "2026-11-01T00:00:00Z");
    assert_eq!(status["lastPlan"].as_array().unwrap().len(), 3);
    // Due again at the month boundary (two minutes away) plus slack.
    assert_eq!(action, Action::requeue(Duration::from_secs(125)));
    assert_eq!(
        partitions(&db).await,
        vec!["events_p2026_11", "events_p2026_12", "events_p2027_01"]
    );

    // A second reconcile changes nothing: no DDL Events, the same status.
    let (ctx, mut server) = fixed_context();
    let mut again = (*policy(json!({}))).clone();
    again.status = serde_json::from_value(status.clone()).unwrap();
    let run = tokio::spawn(reconcile(Arc::new(again), ctx));
    server
        .expect(Method::GET, SECRET_PATH)
        .await
        .reply(StatusCode::OK, secret(&db.url));
    let second = expect_status(&mut server).await;
    run.await.unwrap().unwrap();
    assert_eq!(
        condition(&second, "Ready")["lastTransitionTime"],
        condition(&status, "Ready")["lastTransitionTime"]
    );
    assert_eq!(second["partitions"], status["partitions"]);
    server.expect_nothing(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_dry_run_reports_the_plan_and_changes_nothing() {
    let db = database(PARTITIONED).await;
    let (ctx, mut server) = fixed_context();
    let run = tokio::spawn(reconcile(
        policy(json!({"dryRun": true, "retention": {"keep": 0, "action": "drop"}})),
        ctx,
    ));
    server
        .expect(Method::GET, SECRET_PATH)
        .await
        .reply(StatusCode::OK, secret(&db.url));
    let event = expect_event(&mut server, "Normal", "DryRunPlanned").await;
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("create events_p2026_11")
    );
    let status = expect_status(&mut server).await;
    run.await.unwrap().unwrap();
    assert_eq!(status["dryRunPlan"].as_array().unwrap().len(), 3);
    assert_eq!(condition(&status, "Ready")["reason"], "DryRun");
    assert!(partitions(&db).await.is_empty(), "a dry run makes no DDL");
}

#[tokio::test]
async fn a_missing_secret_stalls_the_policy_with_a_warning() {
    let (ctx, mut server) = fixed_context();
    let run = tokio::spawn(reconcile(policy(json!({})), ctx));
    server.expect(Method::GET, SECRET_PATH).await.not_found();
    let event = expect_event(&mut server, "Warning", "SecretNotFound").await;
    assert!(event["note"].as_str().unwrap().contains("orders-db"));
    let status = expect_status(&mut server).await;
    let action = run.await.unwrap().unwrap();
    assert_eq!(condition(&status, "Stalled")["status"], "True");
    assert_eq!(condition(&status, "Stalled")["reason"], "SecretNotFound");
    assert_eq!(condition(&status, "Ready")["status"], "False");
    assert_eq!(action, Action::requeue(Duration::from_secs(120)));
}

#[tokio::test]
async fn a_secret_without_the_key_stalls_the_policy() {
    let (ctx, mut server) = fixed_context();
    let run = tokio::spawn(reconcile(
        policy(json!({"database": {"secretName": "orders-db", "key": "dsn"}})),
        ctx,
    ));
    server
        .expect(Method::GET, SECRET_PATH)
        .await
        .reply(StatusCode::OK, secret("postgres://x"));
    expect_event(&mut server, "Warning", "SecretKeyMissing").await;
    let status = expect_status(&mut server).await;
    run.await.unwrap().unwrap();
    assert!(
        condition(&status, "Stalled")["message"]
            .as_str()
            .unwrap()
            .contains("\"dsn\"")
    );
}

#[tokio::test]
async fn an_unreachable_database_stalls_and_is_retried_soon() {
    let (ctx, mut server) = fixed_context();
    let run = tokio::spawn(reconcile(policy(json!({})), ctx));
    server.expect(Method::GET, SECRET_PATH).await.reply(
        StatusCode::OK,
        secret("postgres://postgres@127.0.0.1:1/nothing"),
    );
    expect_event(&mut server, "Warning", "DatabaseUnreachable").await;
    let status = expect_status(&mut server).await;
    let action = run.await.unwrap().unwrap();
    let stalled = condition(&status, "Stalled");
    assert_eq!(stalled["reason"], "DatabaseUnreachable");
    assert!(
        stalled["message"]
            .as_str()
            .unwrap()
            .starts_with("cannot connect to the database")
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn an_unpartitioned_table_stalls_with_the_fix_in_the_message() {
    let db = database("CREATE TABLE events (id bigint, at timestamptz)").await;
    let (ctx, mut server) = fixed_context();
    let run = tokio::spawn(reconcile(policy(json!({})), ctx));
    server
        .expect(Method::GET, SECRET_PATH)
        .await
        .reply(StatusCode::OK, secret(&db.url));
    expect_event(&mut server, "Warning", "TableNotPartitioned").await;
    let status = expect_status(&mut server).await;
    run.await.unwrap().unwrap();
    let stalled = condition(&status, "Stalled");
    assert_eq!(stalled["reason"], "TableNotPartitioned");
    assert!(
        stalled["message"]
            .as_str()
            .unwrap()
            .contains("PARTITION BY RANGE"),
        "{stalled}"
    );
}

#[tokio::test]
async fn a_suspended_policy_reads_nothing_and_waits_for_a_change() {
    let (ctx, mut server) = fixed_context();
    let run = tokio::spawn(reconcile(policy(json!({"suspend": true})), ctx));
    let status = expect_status(&mut server).await;
    let action = run.await.unwrap().unwrap();
    assert_eq!(condition(&status, "Ready")["reason"], "Suspended");
    assert_eq!(condition(&status, "Stalled")["status"], "False");
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn archive_retention_moves_old_months_to_the_archive_schema_and_lists_them_in_the_status() {
    let db = database(&format!(
        "{PARTITIONED};
         CREATE TABLE events_p2026_08 PARTITION OF events FOR VALUES FROM ('2026-08-01 00:00+00') TO ('2026-09-01 00:00+00');
         CREATE TABLE events_p2026_09 PARTITION OF events FOR VALUES FROM ('2026-09-01 00:00+00') TO ('2026-10-01 00:00+00');
         INSERT INTO events VALUES (1, '2026-08-15 12:00+00'), (2, '2026-08-16 12:00+00');"
    ))
    .await;
    let (ctx, mut server) = fixed_context();
    let run = tokio::spawn(reconcile(
        policy(json!({"retention": {"keep": 2, "action": "archive", "archiveSchema": "cold"}})),
        ctx,
    ));
    server
        .expect(Method::GET, SECRET_PATH)
        .await
        .reply(StatusCode::OK, secret(&db.url));
    // The hole in October, November (current), two premade months, then
    // August, past retention.
    for _ in 0..4 {
        expect_event(&mut server, "Normal", "PartitionCreated").await;
    }
    let event = expect_event(&mut server, "Normal", "PartitionArchived").await;
    assert_eq!(
        event["note"],
        "detach events_p2026_08 into archive schema cold"
    );
    assert_eq!(event["action"], "Archive/events_p2026_08");
    let status = expect_status(&mut server).await;
    run.await.unwrap().expect("reconcile succeeds");

    assert_eq!(condition(&status, "Ready")["status"], "True");
    let archived = status["archived"].as_array().expect("archived listed");
    assert_eq!(archived.len(), 1, "{status}");
    assert_eq!(archived[0]["name"], "cold.events_p2026_08");
    assert_eq!(archived[0]["from"], "2026-08-01T00:00:00Z");
    assert_eq!(archived[0]["to"], "2026-09-01T00:00:00Z");
    assert_eq!(status["oldestKept"], "2026-09-01T00:00:00Z");
    assert!(
        !partitions(&db)
            .await
            .contains(&"events_p2026_08".to_string())
    );
    let pool = PgPool::connect(&db.url).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM cold.events_p2026_08")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}
