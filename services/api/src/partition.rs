//! The `PartitionPolicy` spec: which table is kept range-partitioned by time,
//! at which interval, how far ahead and for how long. Doc comments on fields
//! are user-facing (they become `kubectl explain` text).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::types::{API_VERSION, ManifestMetadata};

/// The manifest `kind` of a partition policy.
pub const PARTITION_POLICY_KIND: &str = "PartitionPolicy";

/// Ten years of monthly partitions: beyond that, premade partitions only
/// slow down planning and catalog reads without ever receiving rows soon.
pub const MAX_PREMAKE: u32 = 120;

/// Retention beyond this many intervals (27 years of days) is almost
/// certainly a typo; it also bounds the calendar arithmetic.
pub const MAX_KEEP: u32 = 10_000;

/// Longest table name: the partition suffix (`_p2026_11_23`, 12 bytes) must
/// still fit Postgres's 63-byte identifier limit.
const MAX_IDENT_LEN: usize = 48;

fn default_key() -> String {
    "url".into()
}

fn default_premake() -> u32 {
    3
}

fn default_time_zone() -> String {
    "UTC".into()
}

/// Keeps a table range-partitioned by a timestamp column: one partition per
/// interval, made ahead of time, with optional retention of old partitions.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "eventplane.io",
    version = "v1alpha1",
    kind = "PartitionPolicy",
    namespaced,
    status = "crate::resource::PartitionPolicyStatus",
    shortname = "pp",
    category = "eventplane",
    doc = "Keeps a Postgres table partitioned by time: partitions made ahead, old ones retired.",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Table","type":"string","jsonPath":".spec.table"}"#,
    printcolumn = r#"{"name":"Interval","type":"string","jsonPath":".spec.interval"}"#,
    printcolumn = r#"{"name":"Premade Until","type":"string","jsonPath":".status.premadeUntil"}"#,
    printcolumn = r#"{"name":"Oldest Kept","type":"string","jsonPath":".status.oldestKept"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartitionPolicySpec {
    /// Where the table lives: a Secret in the policy's namespace holding a
    /// Postgres URL. The `eventplane partitions` command ignores it and
    /// takes `--database-url` instead.
    pub database: DatabaseRef,
    /// The partitioned table, optionally schema-qualified (`audit.events`).
    /// Each part: lowercase letters, digits and underscores, not starting
    /// with a digit, at most 48 characters. The table must already exist,
    /// declared `PARTITION BY RANGE (<column>)`. Cannot be changed.
    #[schemars(regex(pattern = r"^([a-z_][a-z0-9_]{0,47}\.)?[a-z_][a-z0-9_]{0,47}$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("table is immutable; create a new policy"))]
    pub table: String,
    /// The `timestamptz` column the table is partitioned by. Cannot be changed.
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("column is immutable"))]
    pub column: String,
    /// Length of one partition: `monthly` (the default), `weekly` (weeks
    /// start on Monday) or `daily`. Boundaries fall on local midnight in
    /// `timeZone`.
    #[serde(default)]
    pub interval: Interval,
    /// How many intervals after the current one get a partition ahead of
    /// time, from 0 to 120 (default 3).
    #[serde(default = "default_premake")]
    #[schemars(range(max = 120))]
    pub premake: u32,
    /// IANA time zone in which partition boundaries fall on midnight, for
    /// example `Europe/Paris` (default `UTC`). Where midnight does not exist
    /// or happens twice because of a clock change, the boundary is the
    /// earliest instant at or after it.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    /// What happens to old partitions. Without it, partitions are kept
    /// forever.
    #[serde(default)]
    pub retention: Option<Retention>,
    /// Keep a default partition that catches rows outside every partition.
    /// Rows found in it are moved into their own partition when that
    /// partition is made.
    #[serde(default)]
    pub default_partition: bool,
    /// Stop changing the table until set back to false.
    #[serde(default)]
    pub suspend: bool,
    /// Compute and report the plan without changing the table.
    #[serde(default)]
    pub dry_run: bool,
}

/// A reference to a Secret key that holds a Postgres connection URL.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabaseRef {
    /// Name of the Secret, in the policy's namespace.
    pub secret_name: String,
    /// Key within the Secret whose value is the Postgres URL (default `url`).
    #[serde(default = "default_key")]
    pub key: String,
}

/// Length of one partition.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    /// From the 1st of a month, 00:00, to the 1st of the next.
    #[default]
    Monthly,
    /// From Monday 00:00 to the next Monday.
    Weekly,
    /// From 00:00 to the next day's 00:00.
    Daily,
}

/// Which old partitions are retired, and how.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.action) && self.action == 'archive' ? has(self.archiveSchema) : !has(self.archiveSchema)").message("archiveSchema is required with action archive and allowed only with it"))]
pub struct Retention {
    /// How many whole intervals before the current one are kept. A partition
    /// whose end is at or before the start of the current interval minus
    /// `keep` intervals is retired; 0 retires every partition before the
    /// current interval.
    #[schemars(range(max = 10000))]
    pub keep: u32,
    /// `detach` (the default) takes retired partitions out of the table but
    /// keeps them as plain tables, for archiving; `archive` detaches them
    /// and moves them into `archiveSchema`; `drop` deletes them and their
    /// rows.
    #[serde(default)]
    pub action: RetentionAction,
    /// With `action: archive`: the schema retired partitions move to, where
    /// they stay queryable with their rows until dumped or dropped. Made if
    /// missing. Lowercase letters, digits and underscores, not starting with
    /// a digit, not starting with `pg_`, and not the table's own schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub archive_schema: Option<String>,
}

/// What is done with a retired partition.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum RetentionAction {
    /// Detach it: its rows leave the table but stay in a table of their own.
    #[default]
    Detach,
    /// Detach it and move its table into `archiveSchema`.
    Archive,
    /// Detach and drop it: its rows are deleted.
    Drop,
}

impl Retention {
    /// Retention that keeps `keep` intervals and detaches, archives (into
    /// no schema yet) or drops the rest.
    pub fn new(keep: u32, action: RetentionAction) -> Retention {
        Retention {
            keep,
            action,
            archive_schema: None,
        }
    }

    /// Retention that moves retired partitions into `schema`.
    pub fn archive(keep: u32, schema: impl Into<String>) -> Retention {
        Retention {
            keep,
            action: RetentionAction::Archive,
            archive_schema: Some(schema.into()),
        }
    }
}

impl PartitionPolicySpec {
    /// The schema part of `table`, if it is qualified.
    pub fn schema(&self) -> Option<&str> {
        self.table.split_once('.').map(|(schema, _)| schema)
    }

    /// The table name without its schema; partition names derive from it.
    pub fn table_name(&self) -> &str {
        self.table
            .split_once('.')
            .map_or(self.table.as_str(), |(_, name)| name)
    }

    /// The table as a quoted, possibly schema-qualified SQL name.
    pub fn quoted_table(&self) -> String {
        match self.schema() {
            Some(schema) => format!(
                "{}.{}",
                crate::quote_ident(schema),
                crate::quote_ident(self.table_name())
            ),
            None => crate::quote_ident(self.table_name()),
        }
    }

    /// Checks every field; errors name the field as it appears in YAML.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.database.secret_name.is_empty() {
            return Err(SpecError::invalid(
                "spec.database.secretName",
                "must name the Secret that holds the database URL",
            ));
        }
        if self.database.key.is_empty() {
            return Err(SpecError::invalid(
                "spec.database.key",
                "must name a key of the Secret",
            ));
        }
        match self.table.split_once('.') {
            Some((schema, name)) => {
                check_ident("spec.table", schema)?;
                if schema.starts_with("pg_") {
                    return Err(SpecError::invalid(
                        "spec.table",
                        format!("schema {schema:?} is reserved by Postgres"),
                    ));
                }
                check_ident("spec.table", name)?;
            }
            None => check_ident("spec.table", &self.table)?,
        }
        check_ident("spec.column", &self.column)?;
        if self.premake > MAX_PREMAKE {
            return Err(SpecError::invalid(
                "spec.premake",
                format!("{} is too many: use 0 to {MAX_PREMAKE}", self.premake),
            ));
        }
        if self.time_zone.parse::<chrono_tz::Tz>().is_err() {
            return Err(SpecError::invalid(
                "spec.timeZone",
                format!(
                    "{:?} is not an IANA time zone name such as UTC or Europe/Paris",
                    self.time_zone
                ),
            ));
        }
        if let Some(retention) = &self.retention {
            if retention.keep > MAX_KEEP {
                return Err(SpecError::invalid(
                    "spec.retention.keep",
                    format!("{} is too many: use 0 to {MAX_KEEP}", retention.keep),
                ));
            }
            self.check_archive_schema(retention)?;
        }
        Ok(())
    }
}

impl PartitionPolicySpec {
    fn check_archive_schema(&self, retention: &Retention) -> Result<(), SpecError> {
        const FIELD: &str = "spec.retention.archiveSchema";
        match (retention.action, retention.archive_schema.as_deref()) {
            (RetentionAction::Archive, None) => Err(SpecError::invalid(
                FIELD,
                "action archive needs the schema retired partitions move to",
            )),
            (RetentionAction::Archive, Some(schema)) => {
                check_ident_len(FIELD, schema, MAX_SCHEMA_LEN)?;
                if schema.starts_with("pg_") || schema == "information_schema" {
                    return Err(SpecError::invalid(
                        FIELD,
                        format!("schema {schema:?} is reserved by Postgres"),
                    ));
                }
                if schema == self.schema().unwrap_or("public") {
                    return Err(SpecError::invalid(
                        FIELD,
                        format!(
                            "{schema:?} is the table's own schema; archived partitions must leave it"
                        ),
                    ));
                }
                Ok(())
            }
            (_, Some(_)) => Err(SpecError::invalid(
                FIELD,
                "is only used with action archive",
            )),
            (_, None) => Ok(()),
        }
    }
}

/// Postgres's identifier limit, for names that get no suffix.
const MAX_SCHEMA_LEN: usize = 63;

/// `^[a-z_][a-z0-9_]{0,47}$`: safe unquoted, and short enough for the
/// partition suffix to fit in 63 bytes.
fn check_ident(field: &str, s: &str) -> Result<(), SpecError> {
    check_ident_len(field, s, MAX_IDENT_LEN)
}

fn check_ident_len(field: &str, s: &str, max: usize) -> Result<(), SpecError> {
    let mut chars = s.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && s.len() <= max {
        Ok(())
    } else {
        Err(SpecError::invalid(
            field,
            format!(
                "{s:?} is not a valid identifier: use 1 to {max} lowercase letters, digits and '_', not starting with a digit"
            ),
        ))
    }
}

/// A partition policy file: a Kubernetes-style manifest, so the same file
/// can be applied to a cluster.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartitionPolicyManifest {
    /// Must be `eventplane.io/v1alpha1`.
    pub api_version: String,
    /// Must be `PartitionPolicy`.
    pub kind: String,
    /// Name and namespace of the policy.
    pub metadata: ManifestMetadata,
    /// The policy itself.
    pub spec: PartitionPolicySpec,
}

impl PartitionPolicyManifest {
    /// Checks the manifest header, the name and the spec.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.api_version != API_VERSION {
            return Err(SpecError::invalid(
                "apiVersion",
                format!("expected {API_VERSION}, got {:?}", self.api_version),
            ));
        }
        if self.kind != PARTITION_POLICY_KIND {
            return Err(SpecError::invalid(
                "kind",
                format!("expected {PARTITION_POLICY_KIND}, got {:?}", self.kind),
            ));
        }
        crate::validate::validate_name(&self.metadata.name)?;
        self.spec.validate()
    }
}

impl crate::types::Manifest for PartitionPolicyManifest {
    const NOUN: &'static str = "partition policy";
    fn metadata(&self) -> &ManifestMetadata {
        &self.metadata
    }
    fn check(&self) -> Result<(), SpecError> {
        self.validate()
    }
}

/// Parses one or more `PartitionPolicy` manifests (separated by `---`) and
/// validates each one.
pub fn load_partition_policies(yaml: &str) -> Result<Vec<PartitionPolicyManifest>, SpecError> {
    let mut tables = std::collections::BTreeSet::new();
    crate::types::load_documents(yaml, |manifest: &PartitionPolicyManifest, prefix| {
        // Two policies on one table would fight over its partitions.
        let namespace = manifest.metadata.namespace.clone();
        if !tables.insert((namespace, manifest.spec.table.clone())) {
            return Err(SpecError::invalid(
                format!("{prefix}spec.table"),
                format!(
                    "table {} already has a partition policy in this file",
                    manifest.spec.table
                ),
            ));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENTS: &str = include_str!("../../../crds/examples/partitionpolicy-events.yaml");

    const MINIMAL: &str = "
apiVersion: eventplane.io/v1alpha1
kind: PartitionPolicy
metadata:
  name: audit
spec:
  database:
    secretName: audit-db
  table: audit.entries
  column: at
";

    fn minimal() -> PartitionPolicySpec {
        load_partition_policies(MINIMAL).unwrap().remove(0).spec
    }

    fn invalid_field(spec: &PartitionPolicySpec) -> String {
        match spec.validate() {
            Err(SpecError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn example_events_policy_loads() {
        let manifests = load_partition_policies(EVENTS).unwrap();
        let spec = &manifests[0].spec;
        assert_eq!(manifests[0].metadata.name, "events");
        assert_eq!(spec.database.secret_name, "eventplane-db");
        assert_eq!(spec.table, "events");
        assert_eq!(spec.column, "recorded_at");
        assert_eq!(spec.interval, Interval::Monthly);
        assert_eq!(spec.premake, 3);
        assert_eq!(spec.time_zone, "UTC");
        assert_eq!(
            spec.retention,
            Some(Retention::new(24, RetentionAction::Detach))
        );
        assert!(!spec.default_partition);
    }

    #[test]
    fn omitted_fields_take_their_defaults() {
        let spec = minimal();
        assert_eq!(spec.database.key, "url");
        assert_eq!(spec.interval, Interval::Monthly);
        assert_eq!(spec.premake, 3);
        assert_eq!(spec.time_zone, "UTC");
        assert_eq!(spec.retention, None);
        assert!(!spec.default_partition && !spec.suspend && !spec.dry_run);
        assert_eq!(spec.schema(), Some("audit"));
        assert_eq!(spec.table_name(), "entries");
        assert_eq!(spec.quoted_table(), "\"audit\".\"entries\"");
    }

    #[test]
    fn intervals_and_actions_are_lowercase_in_yaml() {
        let yaml = MINIMAL.replace(
            "column: at",
            "column: at\n  interval: weekly\n  retention:\n    keep: 2\n    action: drop",
        );
        let spec = load_partition_policies(&yaml).unwrap().remove(0).spec;
        assert_eq!(spec.interval, Interval::Weekly);
        assert_eq!(spec.retention.unwrap().action, RetentionAction::Drop);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let yaml = MINIMAL.replace("column: at", "column: at\n  premakes: 3");
        assert!(matches!(
            load_partition_policies(&yaml),
            Err(SpecError::Yaml(_))
        ));
    }

    #[test]
    fn invalid_values_name_their_field() {
        type Change = Box<dyn Fn(&mut PartitionPolicySpec)>;
        let cases: Vec<(&str, Change)> = vec![
            ("spec.table", Box::new(|s| s.table = "Events".into())),
            ("spec.table", Box::new(|s| s.table = "a.b.c".into())),
            ("spec.table", Box::new(|s| s.table = "pg_catalog.x".into())),
            ("spec.table", Box::new(|s| s.table = "x".repeat(49))),
            ("spec.column", Box::new(|s| s.column = "at; drop".into())),
            ("spec.premake", Box::new(|s| s.premake = 121)),
            (
                "spec.timeZone",
                Box::new(|s| s.time_zone = "Mars/Base".into()),
            ),
            (
                "spec.retention.keep",
                Box::new(|s| {
                    s.retention = Some(Retention::new(MAX_KEEP + 1, RetentionAction::Drop))
                }),
            ),
            (
                "spec.retention.archiveSchema",
                Box::new(|s| s.retention = Some(Retention::new(3, RetentionAction::Archive))),
            ),
            (
                "spec.retention.archiveSchema",
                Box::new(|s| {
                    let mut r = Retention::archive(3, "cold");
                    r.action = RetentionAction::Detach;
                    s.retention = Some(r);
                }),
            ),
            (
                "spec.retention.archiveSchema",
                Box::new(|s| s.retention = Some(Retention::archive(3, "Cold; drop"))),
            ),
            (
                "spec.retention.archiveSchema",
                Box::new(|s| s.retention = Some(Retention::archive(3, "pg_toast"))),
            ),
            (
                "spec.retention.archiveSchema",
                Box::new(|s| s.retention = Some(Retention::archive(3, "information_schema"))),
            ),
            (
                "spec.retention.archiveSchema",
                // MINIMAL's table is audit.entries.
                Box::new(|s| s.retention = Some(Retention::archive(3, "audit"))),
            ),
            (
                "spec.retention.archiveSchema",
                Box::new(|s| {
                    s.table = "entries".into();
                    s.retention = Some(Retention::archive(3, "public"));
                }),
            ),
            (
                "spec.database.secretName",
                Box::new(|s| s.database.secret_name.clear()),
            ),
        ];
        for (field, change) in cases {
            let mut spec = minimal();
            change(&mut spec);
            assert_eq!(invalid_field(&spec), field, "{spec:?}");
        }
    }

    #[test]
    fn archive_retention_reads_its_schema_from_yaml() {
        let yaml = MINIMAL.replace(
            "column: at",
            "column: at\n  retention:\n    keep: 12\n    action: archive\n    archiveSchema: audit_archive",
        );
        let spec = load_partition_policies(&yaml).unwrap().remove(0).spec;
        assert_eq!(
            spec.retention,
            Some(Retention::archive(12, "audit_archive"))
        );
    }

    #[test]
    fn longest_table_name_and_premake_are_accepted() {
        let mut spec = minimal();
        spec.table = "t".repeat(48);
        spec.premake = MAX_PREMAKE;
        spec.time_zone = "America/Santiago".into();
        spec.validate().unwrap();
    }

    #[test]
    fn two_policies_on_one_table_are_rejected() {
        let yaml = format!(
            "{MINIMAL}---{}",
            MINIMAL.replace("name: audit", "name: audit2")
        );
        match load_partition_policies(&yaml) {
            Err(SpecError::Invalid { field, .. }) => assert_eq!(field, "documents[1].spec.table"),
            other => panic!("expected a duplicate-table error, got {other:?}"),
        }
    }

    #[test]
    fn wrong_kind_is_rejected() {
        let yaml = MINIMAL.replace("kind: PartitionPolicy", "kind: Projection");
        match load_partition_policies(&yaml) {
            Err(SpecError::Invalid { field, .. }) => assert_eq!(field, "kind"),
            other => panic!("expected a kind error, got {other:?}"),
        }
    }
}
