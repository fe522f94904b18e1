//! The projection spec types: the YAML file format and the `spec` of the
//! `Projection` custom resource. Doc comments on fields are user-facing
//! (they become `kubectl explain` text).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// The only manifest `apiVersion` this crate understands.
pub const API_VERSION: &str = "eventplane.io/v1alpha1";
/// The manifest `kind` of a projection.
pub const KIND: &str = "Projection";

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

fn default_limit() -> u32 {
    50
}

fn max_limit() -> u32 {
    500
}

fn l1_ttl_ms() -> u64 {
    2000
}

fn l2_ttl_seconds() -> u64 {
    300
}

/// A read model built from events: a table, how each event type changes its
/// rows, its indexes and the list queries clients may run against it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "eventplane.io",
    version = "v1alpha1",
    kind = "Projection",
    namespaced,
    status = "crate::resource::ProjectionStatus",
    shortname = "proj",
    category = "eventplane",
    doc = "A read model that Eventplane keeps built from the event log, current and served.",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.scaling.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Spec","type":"integer","jsonPath":".spec.version","description":"version asked for"}"#,
    printcolumn = r#"{"name":"Active","type":"integer","jsonPath":".status.activeVersion","description":"version serving reads"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Lag","type":"number","jsonPath":".status.lagSeconds","description":"seconds behind the log"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Served","type":"string","jsonPath":".status.served","description":"processes that loaded this declaration, of those running, by role"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.key) != has(self.keys)").message("give exactly one of key and keys"))]
#[x_kube(validation = Rule::new("!has(self.key) || self.columns.exists(c, c.name == self.key)").message("key must name one of the columns"))]
#[x_kube(validation = Rule::new("!has(self.keys) || self.keys.all(k, self.columns.exists(c, c.name == k))").message("every entry of keys must name one of the columns"))]
#[x_kube(validation = Rule::new("has(self.key) == has(oldSelf.key)").message("a key of one column cannot become a composite key, nor back: the table's primary key is immutable"))]
#[x_kube(validation = Rule::new("self.scaling.minReplicas <= self.scaling.maxReplicas").message("scaling.minReplicas must not exceed scaling.maxReplicas"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectionSpec {
    /// Name of the table that holds the read model. Lowercase letters, digits
    /// and underscores, starting with a letter or underscore, at most 48
    /// characters; must not start with `ep_` or `pg_`. Cannot be changed:
    /// create a new Projection for a new table.
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,47}$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("table is immutable"))]
    pub table: String,
    /// Version of the read model. Increase it to rebuild the table from the
    /// full event history, for example after changing columns or handlers;
    /// the old version keeps serving reads until the new one has caught up.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub version: u32,
    /// Name of the primary-key column. It must be one of `columns`, must not
    /// be of type jsonb, numeric or double, and is never null. Cannot be
    /// changed: readers and caches address rows by it. Give either this or
    /// `keys`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("key is immutable"))]
    pub key: String,
    /// The columns of a composite primary key, in order, for example
    /// `[tenant, orderId]`: at least two, each one of `columns`, under the
    /// same rules as `key`. Rows are read at
    /// `/v1/projections/{name}/rows/{part1}/{part2}...`, one path segment
    /// per column. Give either this or `key`; cannot be changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 2, max = 8))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("keys is immutable"))]
    pub keys: Vec<String>,
    /// The table's columns.
    #[schemars(length(min = 1, max = 256))]
    pub columns: Vec<ColumnSpec>,
    /// How each event type changes the table. Events of other types are
    /// ignored.
    pub handlers: Vec<HandlerSpec>,
    /// Secondary indexes to create on the table.
    #[serde(default)]
    pub indexes: Vec<IndexSpec>,
    /// Named list queries that clients may run through the query API.
    #[serde(default)]
    pub queries: Vec<QuerySpec>,
    /// Caching of query results.
    #[serde(default)]
    pub cache: CacheSpec,
    /// What to do with an event that cannot be applied (for example a missing
    /// field): `deadLetter` records it and carries on, `halt` stops the
    /// projection until the spec or the data is fixed.
    #[serde(default)]
    pub on_error: ErrorPolicy,
    /// In a cluster: the Secret holding the Postgres URL of the
    /// projection's tables. Local runs take `--database-url` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<crate::DatabaseRef>,
    /// How rebuild Jobs run.
    #[serde(default)]
    pub rebuild: crate::cluster::RebuildSpec,
    /// What deleting the Projection does to its tables: `Retain` (default)
    /// or `Delete`.
    #[serde(default)]
    pub reclaim_policy: crate::cluster::ReclaimPolicy,
    /// How the projection's query Deployment is scaled.
    #[serde(default)]
    pub scaling: crate::cluster::ScalingSpec,
    /// Where the projector reads the events from: the Postgres log
    /// (default) or the relay's Kafka topic, for scaling out by partition.
    /// Cannot be changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("transport is immutable: declare a new projection to change it"))]
    pub transport: Option<crate::transport::TransportSpec>,
}

/// A table column.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ColumnSpec {
    /// Column name: lowercase letters, digits and underscores, starting with a
    /// letter or underscore, at most 48 characters.
    pub name: String,
    /// Column type.
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// Whether the column may be null (default true). An event that would
    /// set a non-nullable column to null is rejected.
    #[serde(default = "yes")]
    pub nullable: bool,
}

/// Column types, named after their Postgres types.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// Any string.
    Text,
    /// 64-bit integer.
    Bigint,
    /// 32-bit integer.
    Integer,
    /// Exact decimal number.
    Numeric,
    /// 64-bit floating-point number.
    Double,
    /// true or false.
    Boolean,
    /// Point in time; written as an RFC 3339 timestamp.
    Timestamptz,
    /// UUID.
    Uuid,
    /// Any JSON value.
    Jsonb,
}

impl ColumnType {
    /// The Postgres type name used in DDL and casts.
    pub fn sql(&self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Bigint => "bigint",
            ColumnType::Integer => "integer",
            ColumnType::Numeric => "numeric",
            ColumnType::Double => "double precision",
            ColumnType::Boolean => "boolean",
            ColumnType::Timestamptz => "timestamptz",
            ColumnType::Uuid => "uuid",
            ColumnType::Jsonb => "jsonb",
        }
    }

    /// The name users write in the spec, for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Bigint => "bigint",
            ColumnType::Integer => "integer",
            ColumnType::Numeric => "numeric",
            ColumnType::Double => "double",
            ColumnType::Boolean => "boolean",
            ColumnType::Timestamptz => "timestamptz",
            ColumnType::Uuid => "uuid",
            ColumnType::Jsonb => "jsonb",
        }
    }
}

/// How events of one type change the table.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HandlerSpec {
    /// The event type this handler applies to, for example `OrderPlaced`.
    /// Give either this or `eventTypes`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub event_type: String,
    /// Several event types this handler applies to alike, for example an
    /// event's old and new name (`[OrderCreated, OrderPlaced]`). Give
    /// either this or `eventType`; an event type belongs to one handler.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<String>,
    /// `upsert` creates the row if it does not exist and sets the listed
    /// columns; `update` sets the listed columns only if the row exists;
    /// `delete` removes the row.
    pub op: Op,
    /// JSON pointer to the row key in the event envelope, for example
    /// `/data/orderId` or `/streamId`. The envelope has the fields `type`,
    /// `streamId`, `streamVersion`, `position`, `recordedAt`, `data` and
    /// `metadata`. Give either this or `keys`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// Where each key column's value comes from, one entry per key column:
    /// needed for a composite key, and for a key whose field was renamed
    /// between event versions (`fromFirst`). For example `[{column:
    /// tenant, from: /metadata/tenant}, {column: id, fromFirst:
    /// [/data/orderId, /data/order_id]}]`. Give either this or `key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub keys: Vec<KeySource>,
    /// A condition on the event: the handler applies only to events for
    /// which it holds, others are skipped. Event fields are written as
    /// `data.total`, `metadata.source` or `event.streamId`; a missing field
    /// reads as null. Allowed: comparisons (`=`, `<>`, `!=`, `<`, `<=`,
    /// `>`, `>=`) with string, number, boolean and NULL constants, AND, OR,
    /// NOT, IS [NOT] NULL, [NOT] IN (...) and parentheses; for example
    /// `data.total > 100 AND data.currency IN ('EUR', 'USD')`. Strings
    /// compare by code point, numbers by value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// A condition on the current row, checked by the database when the
    /// event is applied, for example `status = 'PENDING'`: the change is
    /// made only where it holds. Besides what `when` allows it may name the
    /// table's columns, and compare them with event fields
    /// (`total < data.total`). For `upsert` a missing row reads as all
    /// columns null, so `status IS NULL OR status = 'PENDING'` also
    /// creates it.
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    pub guard: Option<String>,
    /// Columns to change. Not allowed for `delete`.
    #[serde(default)]
    pub set: Vec<Assignment>,
}

/// The value of one key column, read from the event.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.from) != has(self.fromFirst)").message("give exactly one of from and fromFirst"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeySource {
    /// The key column.
    pub column: String,
    /// JSON pointer into the event envelope, for example `/data/orderId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Several JSON pointers, tried in order: the value is the first one
    /// present and not null. Give either this or `from`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_first: Vec<String>,
}

impl KeySource {
    /// The pointers tried in order.
    pub fn pointers(&self) -> impl Iterator<Item = &str> {
        self.from.iter().chain(&self.from_first).map(String::as_str)
    }
}

impl HandlerSpec {
    /// The event types this handler applies to.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.event_type.as_str())
            .filter(|t| !t.is_empty())
            .chain(self.event_types.iter().map(String::as_str))
    }

    /// The pointers tried in order for key column `column`: the handler's
    /// `key`, or that column's entry in `keys` (none if it has no entry).
    pub fn key_pointers(&self, column: &str) -> Vec<&str> {
        if self.keys.is_empty() {
            return vec![self.key.as_str()];
        }
        self.keys
            .iter()
            .find(|k| k.column == column)
            .map(|k| k.pointers().collect())
            .unwrap_or_default()
    }
}

/// The row operation a handler performs.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Insert the row, or update it if it already exists.
    Upsert,
    /// Update the row if it exists; otherwise do nothing.
    Update,
    /// Delete the row if it exists.
    Delete,
}

/// How an assignment changes its column.
#[derive(
    Serialize,
    Deserialize,
    JsonSchema,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
)]
#[serde(rename_all = "camelCase")]
pub enum ColumnOp {
    /// Replace the column's value.
    #[default]
    Set,
    /// Add the value to the column (null counts as 0); a negative value
    /// subtracts. Without `from` or `value` it adds 1, a counter. For
    /// bigint, integer, numeric and double columns.
    Add,
    /// Keep the smaller of the column and the value.
    Min,
    /// Keep the larger of the column and the value.
    Max,
    /// Set the column only while it is null: the first value seen stays.
    SetIfNull,
    /// Append the value to the array in a jsonb column (a column that does
    /// not hold an array becomes a one-element array).
    Append,
    /// Merge the value, a JSON object, into the object in a jsonb column:
    /// its keys replace the column's (a column that does not hold an
    /// object becomes the value).
    Merge,
}

/// One column changed by a handler: give `from`, `fromFirst` or `value`
/// (or, for `op: add`, none of them to count events).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Assignment {
    /// The column to change. Key columns cannot be set here; they come
    /// from the handler's `key` or `keys`.
    pub column: String,
    /// How the column changes: `set` (default), `add`, `min`, `max`,
    /// `setIfNull`, `append` or `merge`. For every operation but `set`, a
    /// null value changes nothing (`append` adds a JSON null).
    #[serde(default, skip_serializing_if = "is_set")]
    pub op: ColumnOp,
    /// JSON pointer into the event envelope, for example `/data/total` or
    /// `/recordedAt`. A missing field rejects the event unless `default` is
    /// given; a JSON null sets the column to null.
    #[serde(default)]
    pub from: Option<String>,
    /// Several JSON pointers, tried in order: the value is the first one
    /// present and not null, for example `[/data/customerId,
    /// /data/customer_id]` for a field renamed between event versions.
    /// When none is present the event is rejected unless `default` is
    /// given; when the present ones are all null the value is null.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_first: Vec<String>,
    /// The value used when `from` or `fromFirst` finds no value, written
    /// like `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// A constant, written as text in the column's format, for example
    /// `PAID`, `42`, `true` or `2024-01-01T00:00:00Z`. For a jsonb column
    /// the text is parsed as JSON, for example `[]` or `{"a": 1}`.
    #[serde(default)]
    pub value: Option<String>,
}

impl Assignment {
    /// The pointers tried in order: `from`, or the entries of `fromFirst`.
    pub fn pointers(&self) -> Vec<&str> {
        self.from
            .iter()
            .chain(&self.from_first)
            .map(String::as_str)
            .collect()
    }
}

fn is_set(op: &ColumnOp) -> bool {
    *op == ColumnOp::Set
}

/// A secondary index.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexSpec {
    /// Index name, unique within the projection (same rules as column names).
    pub name: String,
    /// The indexed columns, in order.
    pub columns: Vec<IndexColumn>,
    /// Extra columns stored in the index so that queries can be answered from
    /// the index alone (a covering index).
    #[serde(default)]
    pub include: Vec<String>,
    /// Makes this a partial index over the rows matching the condition, for
    /// example `status = 'PENDING'`. Allowed: column names, string, number,
    /// boolean and NULL constants, comparisons, AND, OR, NOT, IS [NOT] NULL,
    /// IS [NOT] TRUE/FALSE, [NOT] IN (...), [NOT] BETWEEN, [NOT] LIKE and
    /// parentheses.
    #[serde(default, rename = "where")]
    pub predicate: Option<String>,
    /// Whether the indexed values must be unique.
    #[serde(default)]
    pub unique: bool,
}

/// A column of an index.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexColumn {
    /// The column name.
    pub name: String,
    /// Sort order in the index (default asc).
    #[serde(default)]
    pub order: SortOrder,
}

/// Sort direction.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    /// Ascending.
    #[default]
    Asc,
    /// Descending.
    Desc,
}

/// A named list query: rows matching equality filters, in a fixed order,
/// returned page by page.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuerySpec {
    /// Query name as used in the URL: lowercase letters, digits, `_` and `-`,
    /// starting with a letter, at most 48 characters.
    pub name: String,
    /// Columns the client must give a value for; rows are returned when every
    /// column equals its value.
    #[serde(default)]
    pub filters: Vec<String>,
    /// Sort order of the results. The key column is always added last so the
    /// order is total. Columns must be non-nullable and share one direction.
    /// Without it, rows are ordered by key.
    #[serde(default)]
    pub order_by: Vec<OrderBy>,
    /// Page size when the client does not ask for one (default 50).
    #[serde(default = "default_limit")]
    pub default_limit: u32,
    /// Largest page size a client may ask for (default 500, at most 10000).
    #[serde(default = "max_limit")]
    pub max_limit: u32,
}

/// One sort column of a query.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderBy {
    /// The column name.
    pub column: String,
    /// Sort direction (default asc).
    #[serde(default)]
    pub order: SortOrder,
}

/// Caching of query results.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheSpec {
    /// Whether query results are cached (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long a result stays in a query pod's memory, in milliseconds
    /// (default 2000, at most 3600000).
    #[serde(default = "l1_ttl_ms")]
    pub l1_ttl_ms: u64,
    /// How long a result stays in the shared cache, in seconds (default 300).
    #[serde(default = "l2_ttl_seconds")]
    pub l2_ttl_seconds: u64,
}

impl Default for CacheSpec {
    fn default() -> Self {
        CacheSpec {
            enabled: yes(),
            l1_ttl_ms: l1_ttl_ms(),
            l2_ttl_seconds: l2_ttl_seconds(),
        }
    }
}

/// What happens to an event that cannot be applied.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "camelCase")]
pub enum ErrorPolicy {
    /// Record the event and the reason in the dead-letter table and go on.
    #[default]
    DeadLetter,
    /// Stop the projection at that event.
    Halt,
}

/// A projection file: a Kubernetes-style manifest, so the same file can be
/// applied to a cluster.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectionManifest {
    /// Must be `eventplane.io/v1alpha1`.
    pub api_version: String,
    /// Must be `Projection`.
    pub kind: String,
    /// Name and namespace of the projection.
    pub metadata: ManifestMetadata,
    /// The projection itself.
    pub spec: ProjectionSpec,
}

/// Manifest metadata. Other Kubernetes metadata (labels, annotations) is
/// accepted and ignored.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestMetadata {
    /// Projection name, used in query URLs: lowercase letters, digits and
    /// `-`, starting with a letter, at most 48 characters.
    pub name: String,
    /// Kubernetes namespace; ignored when running from a local file.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// A manifest kind the shared loader reads.
pub(crate) trait Manifest: serde::de::DeserializeOwned {
    /// Lowercase noun for messages ("projection").
    const NOUN: &'static str;
    fn metadata(&self) -> &ManifestMetadata;
    /// Checks the header, the name and the spec.
    fn check(&self) -> Result<(), SpecError>;
}

/// Parses one or more manifests (separated by `---`), validates each one
/// and refuses a name used twice; `extra` adds checks across documents.
/// Error paths stay `spec.…` for the common one-document file; with several
/// documents they start with `documents[i].`.
pub(crate) fn load_documents<M: Manifest>(
    yaml: &str,
    mut extra: impl FnMut(&M, &str) -> Result<(), SpecError>,
) -> Result<Vec<M>, SpecError> {
    let manifests: Vec<M> =
        serde_saphyr::from_multiple(yaml).map_err(|e| SpecError::Yaml(e.to_string()))?;
    if manifests.is_empty() {
        return Err(SpecError::Yaml(format!("no {} manifest found", M::NOUN)));
    }
    let several = manifests.len() > 1;
    let mut names = std::collections::BTreeSet::new();
    for (i, manifest) in manifests.iter().enumerate() {
        let prefix = if several {
            format!("documents[{i}].")
        } else {
            String::new()
        };
        manifest.check().map_err(|e| e.within(&prefix))?;
        let metadata = manifest.metadata();
        if !names.insert((metadata.namespace.clone(), metadata.name.clone())) {
            return Err(SpecError::invalid(
                format!("{prefix}metadata.name"),
                format!("{} {} is defined twice", M::NOUN, metadata.name),
            ));
        }
        extra(manifest, &prefix)?;
    }
    Ok(manifests)
}

impl Manifest for ProjectionManifest {
    const NOUN: &'static str = "projection";
    fn metadata(&self) -> &ManifestMetadata {
        &self.metadata
    }
    fn check(&self) -> Result<(), SpecError> {
        self.validate()
    }
}

/// Parses one or more `Projection` manifests (separated by `---`) and
/// validates each one.
pub fn load_manifests(yaml: &str) -> Result<Vec<ProjectionManifest>, SpecError> {
    load_documents(yaml, |_: &ProjectionManifest, _| Ok(()))
}

impl ProjectionManifest {
    /// Checks the manifest header, the name and the spec.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.api_version != API_VERSION {
            return Err(SpecError::invalid(
                "apiVersion",
                format!("expected {API_VERSION}, got {:?}", self.api_version),
            ));
        }
        if self.kind != KIND {
            return Err(SpecError::invalid(
                "kind",
                format!("expected {KIND}, got {:?}", self.kind),
            ));
        }
        crate::validate::validate_name(&self.metadata.name)?;
        self.spec.validate()
    }
}

impl ProjectionSpec {
    /// The event types this projection consumes, in handler order.
    pub fn event_types(&self) -> Vec<String> {
        self.handlers
            .iter()
            .flat_map(|h| h.types().map(str::to_string))
            .collect()
    }

    pub fn handler(&self, event_type: &str) -> Option<&HandlerSpec> {
        self.handler_index(event_type).map(|i| &self.handlers[i])
    }

    /// The position in `handlers` of the handler for `event_type`.
    pub fn handler_index(&self, event_type: &str) -> Option<usize> {
        self.handlers
            .iter()
            .position(|h| h.types().any(|t| t == event_type))
    }

    /// The Kafka topic the projection is fed from, when it is.
    pub fn kafka_topic(&self) -> Option<&str> {
        self.transport
            .as_ref()
            .filter(|t| t.is_kafka())
            .map(|t| t.topic.as_str())
    }

    /// The names of the primary-key columns, in key order: `key`, or the
    /// entries of `keys`. Borrowed, not collected: a row read looks its
    /// key's columns up by them.
    pub fn key_names(&self) -> &[String] {
        if self.keys.is_empty() {
            std::slice::from_ref(&self.key)
        } else {
            &self.keys
        }
    }

    /// Whether `column` is part of the primary key.
    pub fn is_key(&self, column: &str) -> bool {
        self.key_names().iter().any(|k| k == column)
    }

    /// The primary-key columns, in key order.
    ///
    /// # Panics
    /// If a key is not a declared column, which `validate` rules out.
    pub fn key_columns(&self) -> impl ExactSizeIterator<Item = &ColumnSpec> {
        self.key_names().iter().map(|k| {
            self.column(k)
                .expect("validated spec declares its key columns")
        })
    }

    pub fn column(&self, name: &str) -> Option<&ColumnSpec> {
        self.columns.iter().find(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::examples::{ORDERS, orders as sample};

    #[test]
    fn the_cluster_example_is_the_sample_plus_cluster_sections() {
        let cluster = load_manifests(include_str!(
            "../../../crds/examples/projection-orders.yaml"
        ))
        .unwrap()
        .remove(0);
        let local = load_manifests(ORDERS).unwrap().remove(0);
        assert_eq!(cluster.spec.columns, local.spec.columns);
        assert_eq!(cluster.spec.handlers, local.spec.handlers);
        assert_eq!(cluster.spec.indexes, local.spec.indexes);
        assert_eq!(cluster.spec.queries, local.spec.queries);
        assert_eq!(
            cluster
                .spec
                .database
                .as_ref()
                .map(|d| d.secret_name.as_str()),
            Some("eventplane-db")
        );
        assert_eq!(cluster.spec.scaling.max_replicas, 6);
    }

    #[test]
    fn accessors_find_handlers_and_columns() {
        let s = sample();
        assert_eq!(
            s.event_types(),
            ["OrderPlaced", "OrderPaid", "OrderShipped", "OrderCancelled"]
        );
        assert_eq!(s.handler("OrderPaid").unwrap().op, Op::Update);
        assert!(s.handler("Nope").is_none());
        assert_eq!(s.key_names(), ["id"]);
        assert!(s.is_key("id") && !s.is_key("status"));
        assert!(s.column("total").is_some());
        assert!(s.column("nope").is_none());
    }

    #[test]
    fn sample_manifest_loads_and_validates() {
        let manifests = load_manifests(ORDERS).unwrap();
        assert_eq!(manifests.len(), 1);
        let m = &manifests[0];
        assert_eq!(m.metadata.name, "orders");
        assert_eq!(m.spec.table, "orders");
        assert_eq!(m.spec.key, "id");
        assert_eq!(m.spec.version, 1);
        assert_eq!(m.spec.columns.len(), 6);
        assert_eq!(m.spec.handlers.len(), 4);
        assert_eq!(m.spec.indexes.len(), 5);
        assert_eq!(m.spec.queries.len(), 3);
        assert_eq!(m.spec.cache, CacheSpec::default());
        assert_eq!(m.spec.on_error, ErrorPolicy::DeadLetter);
        let by_status = &m.spec.queries[1];
        assert_eq!(by_status.default_limit, 20);
        assert_eq!(by_status.max_limit, 200);
        assert_eq!(m.spec.queries[0].default_limit, 50);
        assert_eq!(m.spec.queries[0].max_limit, 500);
        assert_eq!(
            m.spec.indexes[2].predicate.as_deref(),
            Some("status = 'PENDING'")
        );
    }

    #[test]
    fn defaults_apply_when_optional_fields_are_absent() {
        let yaml = r#"
apiVersion: eventplane.io/v1alpha1
kind: Projection
metadata:
  name: counters
  labels:
    team: a
spec:
  table: counters
  key: id
  columns:
    - {name: id, type: text}
    - {name: n, type: bigint, nullable: false}
  handlers:
    - {eventType: Counted, op: upsert, key: /streamId, set: [{column: n, from: /data/n}]}
"#;
        let m = load_manifests(yaml).unwrap().remove(0);
        assert_eq!(m.spec.version, 1);
        assert!(m.spec.columns[0].nullable);
        assert!(!m.spec.columns[1].nullable);
        assert!(m.spec.indexes.is_empty());
        assert!(m.spec.queries.is_empty());
        assert!(m.spec.cache.enabled);
        assert_eq!(m.spec.cache.l1_ttl_ms, 2000);
        assert_eq!(m.spec.cache.l2_ttl_seconds, 300);
        assert_eq!(m.spec.on_error, ErrorPolicy::DeadLetter);
    }

    fn counters(name: &str) -> String {
        format!(
            "apiVersion: eventplane.io/v1alpha1\nkind: Projection\nmetadata: {{name: {name}}}\nspec:\n  table: {t}\n  key: id\n  onError: halt\n  columns: [{{name: id, type: text}}]\n  handlers: [{{eventType: E, op: upsert, key: /streamId}}]\n",
            t = name.replace('-', "_")
        )
    }

    #[test]
    fn several_documents_load_in_order() {
        let yaml = format!("{}---\n{}", counters("a"), counters("b-c"));
        let ms = load_manifests(&yaml).unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[1].metadata.name, "b-c");
        assert_eq!(ms[1].spec.on_error, ErrorPolicy::Halt);
    }

    #[test]
    fn errors_in_later_documents_name_the_document() {
        let yaml = format!("{}---\n{}", counters("a"), counters("Bad"));
        let err = load_manifests(&yaml).unwrap_err();
        assert!(
            err.to_string().starts_with("documents[1].metadata.name: "),
            "{err}"
        );
    }

    #[test]
    fn duplicate_projection_names_are_rejected() {
        let yaml = format!("{}---\n{}", counters("a"), counters("a"));
        let err = load_manifests(&yaml).unwrap_err();
        assert!(
            err.to_string().starts_with("documents[1].metadata.name: "),
            "{err}"
        );
    }

    #[test]
    fn wrong_api_version_and_kind_are_rejected() {
        let yaml = counters("a").replace("v1alpha1", "v2");
        let err = load_manifests(&yaml).unwrap_err();
        assert!(err.to_string().starts_with("apiVersion: "), "{err}");
        let yaml = counters("a").replace("kind: Projection", "kind: Deployment");
        let err = load_manifests(&yaml).unwrap_err();
        assert!(err.to_string().starts_with("kind: "), "{err}");
    }

    #[test]
    fn unknown_spec_fields_are_rejected_as_yaml_errors() {
        let yaml = counters("a").replace("  key: id\n", "  key: id\n  tabel: x\n");
        assert!(matches!(load_manifests(&yaml), Err(SpecError::Yaml(_))));
    }

    #[test]
    fn empty_input_is_an_error() {
        assert!(matches!(load_manifests(""), Err(SpecError::Yaml(_))));
    }

    #[test]
    fn column_types_render_their_postgres_names() {
        assert_eq!(ColumnType::Double.sql(), "double precision");
        assert_eq!(ColumnType::Timestamptz.sql(), "timestamptz");
        let t: ColumnType = serde_json::from_str("\"jsonb\"").unwrap();
        assert_eq!(t, ColumnType::Jsonb);
    }

    #[test]
    fn spec_round_trips_through_json_in_camel_case() {
        let m = load_manifests(ORDERS).unwrap().remove(0);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["apiVersion"], "eventplane.io/v1alpha1");
        assert_eq!(json["spec"]["onError"], "deadLetter");
        assert_eq!(json["spec"]["cache"]["l1TtlMs"], 2000);
        assert_eq!(json["spec"]["handlers"][0]["eventType"], "OrderPlaced");
        assert_eq!(json["spec"]["indexes"][2]["where"], "status = 'PENDING'");
        let back: ProjectionManifest = serde_json::from_value(json).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn json_schema_describes_the_spec_for_users() {
        let schema = serde_json::to_value(schemars::schema_for!(ProjectionSpec)).unwrap();
        let text = schema.to_string();
        assert!(text.contains("onError"));
        assert!(text.contains("Increase it to rebuild"));
    }
}
