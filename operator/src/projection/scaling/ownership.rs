//! Who owns a query Deployment's `spec.replicas`, and setting it with a
//! server-side apply of that field alone, without fighting another owner
//! (an HPA, `kubectl scale`, a GitOps tool).

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::context::MANAGER;
use crate::projection::job::MANAGED_BY_LABEL;

/// Field manager of the replicas patch. It differs from [`MANAGER`] because
/// a server-side apply releases every field its manager applied before and
/// left out this time: under the operator's own manager, a patch carrying
/// only `spec.replicas` would drop the rest of a Deployment the operator
/// built.
pub const SCALING_MANAGER: &str = "eventplane-operator-scaling";

/// Field managers Kubernetes records for the client that created an object;
/// on a Deployment the operator manages, their claim on `spec.replicas` is
/// only the creation-time value, safe to take over.
const CREATION_MANAGERS: [&str; 3] = [
    "kubectl-create",
    "kubectl-client-side-apply",
    "before-first-apply",
];

/// What [`apply_replicas`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The replica count was changed.
    Applied { from: i32, to: i32 },
    /// The Deployment already runs that many replicas.
    Unchanged,
    /// Another field manager owns the Deployment's replicas; nothing was
    /// changed.
    OwnedBy(String),
    /// The Deployment does not exist.
    Missing,
}

/// What to do with a Deployment, decided from its current state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyPlan {
    OwnedBy(String),
    Unchanged,
    /// Apply; `force` takes `spec.replicas` over from managers that may be
    /// overridden (see [`replicas_blocker`]).
    Apply {
        from: i32,
        force: bool,
    },
}

/// Every field manager that owns the Deployment's `spec.replicas`.
pub fn replicas_owners(deployment: &Deployment) -> Vec<String> {
    let mut owners: Vec<String> = deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| {
            entry
                .fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|spec| spec.get("f:replicas"))
                .is_some()
        })
        .filter_map(|entry| entry.manager.clone())
        .collect();
    owners.sort();
    owners.dedup();
    owners
}

/// The manager whose claim on `spec.replicas` the operator must respect, if
/// any. On a Deployment labelled as managed by the operator, the managers
/// that merely created it do not count; on any other Deployment every
/// other manager does.
pub fn replicas_blocker(deployment: &Deployment) -> Option<String> {
    let ours = deployment
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGER);
    replicas_owners(deployment).into_iter().find(|m| {
        m != MANAGER && m != SCALING_MANAGER && !(ours && CREATION_MANAGERS.contains(&m.as_str()))
    })
}

pub fn plan_apply(deployment: &Deployment, replicas: i32) -> ApplyPlan {
    if let Some(owner) = replicas_blocker(deployment) {
        return ApplyPlan::OwnedBy(owner);
    }
    // The API server defaults an unset count to 1.
    let from = deployment.spec.replicas.unwrap_or(1);
    if from == replicas {
        return ApplyPlan::Unchanged;
    }
    ApplyPlan::Apply {
        from,
        // Force only to take the field over from the managers allowed above
        // (the operator's own Deployment apply among them); otherwise a
        // conflict must surface: someone claimed the field since it was read.
        force: replicas_owners(deployment)
            .iter()
            .any(|m| m != SCALING_MANAGER),
    }
}

/// The manager named in a server-side apply conflict message, e.g.
/// `Apply failed with 1 conflict: conflict with "kubectl-edit" using apps/v1: .spec.replicas`.
fn conflict_manager(message: &str) -> String {
    message
        .split_once("conflict with \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or_else(|| "unknown".to_string(), |(m, _)| m.to_string())
}

/// Sets the Deployment's replica count with a server-side apply of
/// `spec.replicas` alone, unless another field manager owns it (for example
/// an HPA scaling the Deployment directly): that owner is reported and the
/// Deployment left alone.
pub async fn apply_replicas(
    client: &Client,
    namespace: &str,
    deployment: &str,
    replicas: i32,
) -> kube::Result<ApplyOutcome> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let Some(current) = api.get_opt(deployment).await? else {
        return Ok(ApplyOutcome::Missing);
    };
    let (from, force) = match plan_apply(&current, replicas) {
        ApplyPlan::OwnedBy(owner) => return Ok(ApplyOutcome::OwnedBy(owner)),
        ApplyPlan::Unchanged => return Ok(ApplyOutcome::Unchanged),
        ApplyPlan::Apply { from, force } => (from, force),
    };
    let patch: Value = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "spec": {"replicas": replicas},
    });
    let mut params = PatchParams::apply(SCALING_MANAGER);
    if force {
        params = params.force();
    }
    match api.patch(deployment, &params, &Patch::Apply(&patch)).await {
        Ok(_) => Ok(ApplyOutcome::Applied { from, to: replicas }),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Ok(ApplyOutcome::OwnedBy(conflict_manager(&status.message)))
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn deployment(labels: Value, replicas: i32, owners: &[(&str, Option<&str>)]) -> Deployment {
        let mut d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "orders-query", "labels": labels},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
        }))
        .unwrap();
        d.metadata.managed_fields = Some(
            owners
                .iter()
                .map(|(manager, subresource)| ManagedFieldsEntry {
                    manager: Some(manager.to_string()),
                    operation: Some("Update".into()),
                    subresource: subresource.map(str::to_string),
                    fields_v1: Some(FieldsV1(json!({"f:spec": {"f:replicas": {}}}))),
                    ..ManagedFieldsEntry::default()
                })
                .collect(),
        );
        d
    }

    #[test]
    fn a_replicas_owner_other_than_the_operator_blocks_scaling() {
        let hpa = deployment(
            json!({MANAGED_BY_LABEL: MANAGER}),
            2,
            &[("kube-controller-manager", Some("scale"))],
        );
        assert_eq!(
            plan_apply(&hpa, 3),
            ApplyPlan::OwnedBy("kube-controller-manager".into())
        );
    }

    #[test]
    fn creation_managers_are_taken_over_only_on_operator_deployments() {
        let ours = deployment(
            json!({MANAGED_BY_LABEL: MANAGER}),
            2,
            &[("kubectl-create", None)],
        );
        assert_eq!(
            plan_apply(&ours, 3),
            ApplyPlan::Apply {
                from: 2,
                force: true
            }
        );
        let theirs = deployment(json!({}), 2, &[("kubectl-create", None)]);
        assert_eq!(
            plan_apply(&theirs, 3),
            ApplyPlan::OwnedBy("kubectl-create".into())
        );
    }

    #[test]
    fn unowned_replicas_are_applied_without_force() {
        let free = deployment(json!({}), 2, &[]);
        assert_eq!(
            plan_apply(&free, 5),
            ApplyPlan::Apply {
                from: 2,
                force: false
            }
        );
        let again = deployment(json!({}), 2, &[(SCALING_MANAGER, None)]);
        assert_eq!(
            plan_apply(&again, 4),
            ApplyPlan::Apply {
                from: 2,
                force: false
            }
        );
        assert_eq!(plan_apply(&again, 2), ApplyPlan::Unchanged);
    }

    #[test]
    fn replicas_the_operator_applied_with_the_deployment_are_taken_over() {
        let built = deployment(json!({}), 2, &[(MANAGER, None), (SCALING_MANAGER, None)]);
        assert_eq!(
            plan_apply(&built, 3),
            ApplyPlan::Apply {
                from: 2,
                force: true
            }
        );
    }

    #[test]
    fn the_conflicting_manager_is_read_from_the_conflict_message() {
        assert_eq!(
            conflict_manager(
                "Apply failed with 1 conflict: conflict with \"kubectl-edit\" using apps/v1: .spec.replicas"
            ),
            "kubectl-edit"
        );
        assert_eq!(conflict_manager("Conflict"), "unknown");
    }
}
