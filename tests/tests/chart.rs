//! The Helm chart as `helm template` renders it (tests/ensure-services.sh
//! installs Helm): every metric the dashboard and the alert rules use is
//! one the code exports; the services get no Kubernetes API access; every
//! container is locked down and probed on the admin listener; the query
//! Deployment's replicas are left to the operator; leader election follows
//! the operator's replica count.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const RELEASE: &str = "ep";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/eventplane")
}

/// The chart's manifests with the given extra `helm template` arguments.
fn render(args: &[&str]) -> Vec<Value> {
    let out = Command::new("helm")
        .args(["template", RELEASE])
        .arg(chart())
        .args(["--namespace", "shop"])
        .args(args)
        .output()
        .expect("helm runs (tests/ensure-services.sh installs it)");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .expect("helm's output is YAML")
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

fn all_options() -> Vec<Value> {
    let values = chart().join("ci/all-options-values.yaml");
    render(&["-f", values.to_str().unwrap()])
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn deployment<'a>(docs: &'a [Value], role: &str) -> &'a Value {
    find(docs, "Deployment", &format!("{RELEASE}-{role}"))
        .unwrap_or_else(|| panic!("no Deployment {RELEASE}-{role}"))
}

/// Every series name the services and the operator export.
fn exported() -> BTreeSet<String> {
    let services = eventplane::metrics::Metrics::new();
    let operator = eventplane_operator::metrics::Metrics::new();
    services
        .series
        .iter()
        .chain(&operator.series)
        .cloned()
        .collect()
}

const PROMQL_KEYWORDS: [&str; 24] = [
    // Aggregations may be followed by `by (...)` rather than `(`.
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
];

/// The metric names a PromQL expression reads: identifiers that are not
/// functions, keywords, label names or label values.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Drop what holds label names and values: strings, matchers, ranges
    // and grouping clauses.
    let mut text = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut in_string = false;
    for c in expr.chars() {
        match c {
            '"' if depth_brace == 0 => in_string = !in_string,
            _ if in_string => {}
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            _ => text.push(c),
        }
    }
    let chars: Vec<char> = text.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let grouping = [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&word.as_str());
            if grouping {
                skip_group = next == Some(&'(');
            } else if next == Some(&'(') || PROMQL_KEYWORDS.contains(&word.as_str()) {
                // A function call.
            } else if !skip_group {
                names.insert(word);
            }
            continue;
        }
        if c == ')' {
            skip_group = false;
        }
        if c.is_ascii_digit() || c == '.' {
            // A number, with an exponent or a unit (1e9, 5m).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    names
}

fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    // Template variables: `label_values(metric, label)` reads the metric.
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str()
            && let Some(inner) = query.strip_prefix("label_values(")
        {
            exprs.push(inner.split(',').next().unwrap().to_string());
        }
    }
    exprs
}

#[test]
fn the_promql_reader_finds_metrics_and_skips_labels_and_functions() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(command_latency_bucket{job=\"a-b\", x=~\"y|z\"}[5m]))) > 0.1 \
         and on (pod, projection) (projection_lease_held == 1) or absent(eventplane_operator_leader{}) - time() < 6.048e5",
    );
    let want: BTreeSet<String> = [
        "command_latency_bucket",
        "projection_lease_held",
        "eventplane_operator_leader",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, want);
}

#[test]
fn the_dashboard_and_the_alerts_use_only_exported_metrics() {
    let exported = exported();
    for name in [
        "command_latency_bucket",
        "commands_total",
        "projection_halted",
        "eventplane_operator_last_success_timestamp_seconds",
    ] {
        assert!(exported.contains(name), "{name} not in {exported:?}");
    }

    let docs = all_options();
    let rule = find(&docs, "PrometheusRule", RELEASE).expect("the PrometheusRule renders");
    let mut alerts = BTreeSet::new();
    let mut used = BTreeSet::new();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            let alert = r["alert"].as_str().unwrap();
            let names = metric_names(r["expr"].as_str().unwrap());
            assert!(!names.is_empty(), "{alert} reads no metric");
            for name in &names {
                assert!(
                    exported.contains(name),
                    "alert {alert} uses {name}, which the code does not export"
                );
            }
            used.extend(names);
            alerts.insert(alert.to_string());
        }
    }
    for wanted in [
        "EventplaneCommandLatencyHigh",
        "EventplaneQueryLatencyHigh",
        "EventplaneProjectionLagHigh",
        "EventplaneDeadLettersGrowing",
        "EventplanePartitionsRunningOut",
        "EventplaneProjectionHalted",
        "EventplaneRebuildFailed",
        "EventplaneOperatorNotReconciling",
    ] {
        assert!(alerts.contains(wanted), "no alert {wanted}: {alerts:?}");
    }

    let file = std::fs::read_to_string(chart().join("files/dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&file).expect("the dashboard is JSON");
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() > 20, "{} dashboard queries", exprs.len());
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "a dashboard query reads no metric: {expr}"
        );
        for name in &names {
            assert!(
                exported.contains(name),
                "the dashboard uses {name}, which the code does not export: {expr}"
            );
        }
        used.extend(names);
    }
    // The ConfigMap the Grafana sidecar loads carries the file as it is.
    let config_map = find(&docs, "ConfigMap", &format!("{RELEASE}-dashboard")).unwrap();
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value =
        serde_json::from_str(config_map["data"]["eventplane.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dashboard);
    assert!(used.len() > 20, "{used:?}");
}

fn containers(deployment: &Value) -> &Vec<Value> {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
}

#[test]
fn services_get_no_kubernetes_api_access_and_every_container_is_locked_down() {
    for docs in [render(&[]), all_options()] {
        let bindings: Vec<&Value> = docs
            .iter()
            .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
            .collect();
        for role in ["command", "projector", "query"] {
            let account = format!("{RELEASE}-{role}");
            let d = deployment(&docs, role);
            let pod = &d["spec"]["template"]["spec"];
            assert_eq!(pod["serviceAccountName"], account.as_str());
            assert_eq!(pod["automountServiceAccountToken"], false, "{role}");
            let sa = find(&docs, "ServiceAccount", &account).expect("its own ServiceAccount");
            assert_eq!(sa["automountServiceAccountToken"], false);
            for b in &bindings {
                for s in b["subjects"].as_array().unwrap() {
                    assert_ne!(s["name"], account.as_str(), "{account} is bound to a role");
                }
            }
            let c = &containers(d)[0];
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
            assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
            assert!(
                c["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == "admin" && p["containerPort"] == 9090)
            );
            // Connection strings come from Secrets, never from values.
            let secrets: &[&str] = match role {
                "command" => &["DATABASE_URL"],
                _ => &["DATABASE_URL", "REDIS_URL"],
            };
            for &env in secrets {
                let var = c["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| e["name"] == env)
                    .unwrap_or_else(|| panic!("{role} has no {env}"));
                assert!(var["valueFrom"]["secretKeyRef"]["name"].is_string());
            }
        }
        for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
            let pod = &d["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
            for c in containers(d) {
                let sc = &c["securityContext"];
                assert_eq!(
                    sc["readOnlyRootFilesystem"], true,
                    "{}",
                    d["metadata"]["name"]
                );
                assert_eq!(sc["allowPrivilegeEscalation"], false);
                assert_eq!(sc["capabilities"]["drop"][0], "ALL");
                assert!(c["resources"]["requests"].is_object());
            }
        }
        for role in ["operator", "command", "projector", "query"] {
            assert!(
                find(&docs, "PodDisruptionBudget", &format!("{RELEASE}-{role}")).is_some(),
                "no PodDisruptionBudget for {role}"
            );
        }
    }
}

#[test]
fn the_query_deployment_leaves_replicas_to_the_operator_unless_told() {
    let default = render(&[]);
    assert!(
        deployment(&default, "query")["spec"]
            .get("replicas")
            .is_none(),
        "Helm would own spec.replicas and the operator could not scale"
    );
    assert_eq!(deployment(&default, "command")["spec"]["replicas"], 2);
    let told = all_options();
    assert_eq!(deployment(&told, "query")["spec"]["replicas"], 3);
}

#[test]
fn leader_election_follows_the_operator_replica_count() {
    let env_of = |docs: &[Value]| -> Vec<String> {
        containers(deployment(docs, "operator"))[0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    };
    let two = render(&[]);
    assert!(find(&two, "Role", &format!("{RELEASE}-operator-lease")).is_some());
    assert!(!env_of(&two).contains(&"EVENTPLANE_NO_LEADER_ELECTION".to_string()));
    let one = render(&["--set", "operator.replicas=1"]);
    assert!(find(&one, "Role", &format!("{RELEASE}-operator-lease")).is_none());
    assert!(env_of(&one).contains(&"EVENTPLANE_NO_LEADER_ELECTION".to_string()));
    assert_eq!(
        deployment(&one, "operator")["spec"]["strategy"]["type"],
        "Recreate"
    );
}

#[test]
fn kafka_consuming_projectors_take_the_brokers_from_the_relay_secret() {
    let env = |docs: &[Value]| -> Vec<Value> {
        containers(deployment(docs, "projector"))[0]["env"]
            .as_array()
            .unwrap()
            .clone()
    };
    let named = |env: &[Value], name: &str| env.iter().find(|e| e["name"] == name).cloned();
    let default = env(&render(&[]));
    assert!(named(&default, "EVENTPLANE_SOURCE").is_none());
    assert!(named(&default, "KAFKA_BROKERS").is_none());

    let docs = all_options();
    let kafka = env(&docs);
    assert_eq!(
        named(&kafka, "EVENTPLANE_SOURCE").unwrap()["value"],
        "kafka"
    );
    let brokers = named(&kafka, "KAFKA_BROKERS").unwrap();
    assert_eq!(
        brokers["valueFrom"]["secretKeyRef"]["name"],
        "eventplane-kafka"
    );
    assert!(brokers.get("value").is_none(), "brokers never inline");
    assert_eq!(deployment(&docs, "projector")["spec"]["replicas"], 3);
}
