//! The rebuild Job of a projection version: its name, labels and the pure
//! builder of its manifest, and how a Job seen in the cluster is read back
//! into what `decide` needs.

use chrono::{DateTime, Utc};
use eventplane_api::{API_VERSION, KIND, Projection, ProjectionSpec};
use eventplane_plan::{content, stable_hash};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::context::MANAGER;

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const PROJECTION_LABEL: &str = "eventplane.io/projection";
pub const VERSION_LABEL: &str = "eventplane.io/version";
/// The spec a Job was built from: a Job for the wanted version but an
/// older spec is stale and is replaced.
pub const SPEC_HASH_ANNOTATION: &str = "eventplane.io/spec-hash";

/// Finished Jobs are removed after an hour: long enough to read a failed
/// rebuild's logs, and a failed rebuild is retried once its Job is gone.
pub const TTL_AFTER_FINISHED: i32 = 3600;

/// Kubernetes object names (and Job names, which become a pod label) are at
/// most 63 characters.
const MAX_NAME: usize = 63;

/// The image's unprivileged user, as in the Helm chart.
const RUN_AS_USER: i64 = 65532;

/// Where rebuild Jobs get what the spec does not say.
#[derive(Clone, Debug, PartialEq)]
pub struct JobConfig {
    /// Image holding the `eventplane` binary.
    pub image: String,
    /// Secret (in the Projection's namespace) with the Redis URL; optional.
    pub redis_secret: String,
    pub redis_key: String,
}

/// A short, stable digest of what a rebuild Job builds (the spec's rows
/// and build fields, `eventplane_plan::content`): a Job for the wanted
/// version but another digest is stale and is replaced. Serving fields
/// are left out, so an autoscaler writing `scaling.replicas` never restarts
/// a rebuild.
pub fn spec_hash(spec: &ProjectionSpec) -> String {
    let built = content::build(spec).to_string();
    format!("{:016x}", stable_hash(built.as_bytes()))
}

/// `<projection>-rebuild-v<version>`; a name too long for Kubernetes keeps
/// the suffix and replaces the end of the projection name by a hash of it.
pub fn job_name(projection: &str, version: u32) -> String {
    let suffix = format!("-rebuild-v{version}");
    let name = format!("{projection}{suffix}");
    if name.len() <= MAX_NAME {
        return name;
    }
    let hash = format!("{:08x}", stable_hash(projection.as_bytes()) as u32);
    let keep = MAX_NAME - suffix.len() - hash.len() - 1;
    let prefix: String = projection.chars().take(keep).collect();
    format!("{}-{hash}{suffix}", prefix.trim_end_matches('-'))
}

/// The label selector of every rebuild Job of a projection.
pub fn selector(projection: &str) -> String {
    format!("{MANAGED_BY_LABEL}={MANAGER},{PROJECTION_LABEL}={projection}")
}

/// The manifest `eventplane rebuild` reads, as JSON.
pub fn manifest(name: &str, spec: &ProjectionSpec) -> String {
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": spec,
    })
    .to_string()
}

/// The rebuild Job of `projection`'s wanted version, as applied with
/// server-side apply. `None` when the projection names no database (the
/// caller reports that before asking for a Job) or has no uid.
pub fn build(projection: &Projection, config: &JobConfig) -> Option<Value> {
    let name = projection.name_any();
    let spec = &projection.spec;
    let database = spec.database.as_ref()?;
    let mut owner = projection.controller_owner_ref(&())?;
    // Foreground deletion of the Projection waits for its rebuild.
    owner.block_owner_deletion = Some(true);
    let version = spec.version;
    let labels = json!({
        MANAGED_BY_LABEL: MANAGER,
        PROJECTION_LABEL: name,
        VERSION_LABEL: version.to_string(),
        "app.kubernetes.io/component": "rebuild",
    });
    let mut container = json!({
        "name": "rebuild",
        "image": config.image,
        "args": ["rebuild"],
        "env": [
            {"name": "EVENTPLANE_PROJECTION_MANIFEST", "value": manifest(&name, spec)},
            {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {
                "name": database.secret_name, "key": database.key}}},
            {"name": "REDIS_URL", "valueFrom": {"secretKeyRef": {
                "name": config.redis_secret, "key": config.redis_key, "optional": true}}},
        ],
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": RUN_AS_USER,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    if let Some(resources) = &spec.rebuild.resources {
        container["resources"] = serde_json::to_value(resources).expect("resources serialize");
    }
    Some(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(&name, version),
            "namespace": projection.namespace(),
            "labels": labels,
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash(spec)},
            "ownerReferences": [owner],
        },
        "spec": {
            "backoffLimit": spec.rebuild.backoff_limit,
            "activeDeadlineSeconds": spec.rebuild.active_deadline_seconds,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    // The rebuild talks to Postgres and Redis only.
                    "automountServiceAccountToken": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                },
            },
        },
    }))
}

/// Where a rebuild Job stands.
#[derive(Clone, Debug, PartialEq)]
pub enum JobState {
    Running,
    Succeeded,
    Failed { reason: String, message: String },
}

/// A rebuild Job as `decide` sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct RebuildJob {
    pub name: String,
    pub version: Option<u32>,
    pub spec_hash: Option<String>,
    pub state: JobState,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Being deleted: its pods may still run.
    pub deleting: bool,
}

impl RebuildJob {
    pub fn finished(&self) -> bool {
        self.state != JobState::Running
    }
}

fn chrono_time(t: &Time) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.0.as_second(), 0)
}

/// Reads a Job back. The conditions say how it ended; `FailureTarget` and
/// `SuccessCriteriaMet` come before `Failed` and `Complete` while the last
/// pods terminate, and already settle the outcome.
pub fn observe(job: &Job) -> RebuildJob {
    let status = job.status.clone().unwrap_or_default();
    let conditions = status.conditions.unwrap_or_default();
    let holds = |type_: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == "True")
    };
    let (state, finished_at) =
        if let Some(failed) = holds("Failed").or_else(|| holds("FailureTarget")) {
            (
                JobState::Failed {
                    reason: failed
                        .reason
                        .clone()
                        .unwrap_or_else(|| "JobFailed".to_string()),
                    message: failed.message.clone().unwrap_or_default(),
                },
                failed.last_transition_time.as_ref().and_then(chrono_time),
            )
        } else if holds("Complete").is_some()
            || holds("SuccessCriteriaMet").is_some()
            || status.succeeded.unwrap_or(0) > 0
        {
            (
                JobState::Succeeded,
                status.completion_time.as_ref().and_then(chrono_time),
            )
        } else {
            (JobState::Running, None)
        };
    RebuildJob {
        name: job.name_any(),
        version: job.labels().get(VERSION_LABEL).and_then(|v| v.parse().ok()),
        spec_hash: job.annotations().get(SPEC_HASH_ANNOTATION).cloned(),
        state,
        started_at: status.start_time.as_ref().and_then(chrono_time),
        finished_at,
        deleting: job.metadata.deletion_timestamp.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use eventplane_api::examples::ORDERS;

    fn projection() -> Projection {
        let manifest = eventplane_api::load_manifests(ORDERS).unwrap().remove(0);
        let mut spec = manifest.spec;
        spec.version = 2;
        spec.database = Some(serde_json::from_value(json!({"secretName": "orders-db"})).unwrap());
        spec.rebuild.resources = Some(
            serde_json::from_value(
                json!({"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}}),
            )
            .unwrap(),
        );
        let mut p = Projection::new("orders", spec);
        p.metadata.namespace = Some("shop".into());
        p.metadata.uid = Some("uid-1".into());
        p
    }

    fn config() -> JobConfig {
        JobConfig {
            image: "ghcr.io/eventplane/eventplane:1.0".into(),
            redis_secret: "eventplane-redis".into(),
            redis_key: "url".into(),
        }
    }

    #[test]
    fn the_job_runs_the_rebuild_of_the_wanted_version_as_its_owners_child() {
        let p = projection();
        let job = build(&p, &config()).unwrap();
        assert_eq!(job["metadata"]["name"], "orders-rebuild-v2");
        assert_eq!(job["metadata"]["namespace"], "shop");
        assert_eq!(
            job["metadata"]["labels"],
            json!({
                "app.kubernetes.io/managed-by": "eventplane-operator",
                "eventplane.io/projection": "orders",
                "eventplane.io/version": "2",
                "app.kubernetes.io/component": "rebuild",
            })
        );
        assert_eq!(
            job["metadata"]["annotations"][SPEC_HASH_ANNOTATION],
            spec_hash(&p.spec)
        );
        assert_eq!(
            job["metadata"]["ownerReferences"],
            json!([{
                "apiVersion": "eventplane.io/v1alpha1",
                "kind": "Projection",
                "name": "orders",
                "uid": "uid-1",
                "controller": true,
                "blockOwnerDeletion": true,
            }])
        );
        let spec = &job["spec"];
        assert_eq!(spec["backoffLimit"], 2);
        assert_eq!(spec["activeDeadlineSeconds"], 3600);
        assert_eq!(spec["ttlSecondsAfterFinished"], 3600);
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(
            spec["template"]["metadata"]["labels"],
            job["metadata"]["labels"]
        );
        let container = &pod["containers"][0];
        assert_eq!(container["image"], "ghcr.io/eventplane/eventplane:1.0");
        assert_eq!(container["args"], json!(["rebuild"]));
        assert_eq!(
            container["resources"],
            json!({"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}})
        );
        assert_eq!(
            container["securityContext"],
            json!({
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            })
        );
        let env = container["env"].as_array().unwrap();
        assert_eq!(
            env[1],
            json!({"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "orders-db", "key": "url"}}})
        );
        assert_eq!(
            env[2],
            json!({"name": "REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "eventplane-redis", "key": "url", "optional": true}}})
        );
        // The manifest is what the CLI loads: it must validate as one.
        assert_eq!(env[0]["name"], "EVENTPLANE_PROJECTION_MANIFEST");
        let text = env[0]["value"].as_str().unwrap();
        let loaded = eventplane_api::load_manifests(text).unwrap().remove(0);
        assert_eq!(loaded.metadata.name, "orders");
        assert_eq!(loaded.spec, p.spec);
        // The whole object is a valid Job.
        let typed: Job = serde_json::from_value(job).unwrap();
        assert_eq!(typed.spec.unwrap().backoff_limit, Some(2));
    }

    #[test]
    fn a_projection_without_a_database_gets_no_job() {
        let mut p = projection();
        p.spec.database = None;
        assert_eq!(build(&p, &config()), None);
    }

    #[test]
    fn long_names_are_shortened_with_a_hash_and_keep_the_version() {
        assert_eq!(job_name("orders", 12), "orders-rebuild-v12");
        let long = "a-very-long-projection-name-that-goes-on-and-on-x";
        let name = job_name(long, 4_000_000_000);
        assert!(name.len() <= 63, "{name}");
        assert!(name.ends_with("-rebuild-v4000000000"), "{name}");
        assert!(name.starts_with("a-very-long"), "{name}");
        let other = job_name(
            "a-very-long-projection-name-that-goes-on-and-on-y",
            4_000_000_000,
        );
        assert_ne!(name, other);
    }

    #[test]
    fn the_spec_hash_changes_with_what_is_built() {
        let p = projection();
        let mut changed = p.spec.clone();
        changed.handlers.pop();
        assert_eq!(spec_hash(&p.spec), spec_hash(&p.spec.clone()));
        assert_ne!(spec_hash(&p.spec), spec_hash(&changed));
        let mut scaled = p.spec.clone();
        scaled.scaling.replicas = Some(7);
        assert_eq!(spec_hash(&p.spec), spec_hash(&scaled));
    }

    fn job(status: Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": "orders-rebuild-v2", "labels": {VERSION_LABEL: "2"},
                         "annotations": {SPEC_HASH_ANNOTATION: "abc"}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn job_conditions_say_how_it_ended() {
        let running = observe(&job(
            json!({"active": 1, "startTime": "2026-01-01T00:00:00Z"}),
        ));
        assert_eq!(running.state, JobState::Running);
        assert_eq!(running.version, Some(2));
        assert_eq!(running.spec_hash.as_deref(), Some("abc"));
        assert_eq!(
            running.started_at,
            DateTime::from_timestamp(1_767_225_600, 0)
        );
        let failed = observe(&job(json!({"failed": 3, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "Job has reached the specified backoff limit",
             "lastTransitionTime": "2026-01-01T00:10:00Z"}]})));
        assert_eq!(
            failed.state,
            JobState::Failed {
                reason: "BackoffLimitExceeded".into(),
                message: "Job has reached the specified backoff limit".into()
            }
        );
        assert!(failed.finished_at.is_some());
        let done = observe(&job(json!({"succeeded": 1, "conditions": [
            {"type": "Complete", "status": "True"}]})));
        assert_eq!(done.state, JobState::Succeeded);
    }
}
