//! Eventplane's resource API: the `Projection` and `PartitionPolicy` types
//! (the spec a user writes, once, as a local YAML file or a Kubernetes
//! resource, and the status the operator reports), their validation, and
//! the typed column values the specs declare. No I/O.

pub mod cluster;
pub mod condition;
mod error;
pub mod examples;
mod ident;
pub mod partition;
mod predicate;
pub mod resource;
pub mod transport;
mod types;
mod validate;
pub mod value;
mod version;

pub use cluster::{RebuildSpec, ReclaimPolicy, ScalingSpec};
pub use error::SpecError;
pub use ident::quote_ident;
pub use partition::{
    DatabaseRef, Interval, PARTITION_POLICY_KIND, PartitionPolicy, PartitionPolicyManifest,
    PartitionPolicySpec, Retention, RetentionAction, load_partition_policies,
};
pub use predicate::render_predicate;
pub use types::{
    API_VERSION, Assignment, CacheSpec, ColumnOp, ColumnSpec, ColumnType, ErrorPolicy, HandlerSpec,
    IndexColumn, IndexSpec, KIND, KeySource, ManifestMetadata, Op, OrderBy, Projection,
    ProjectionManifest, ProjectionSpec, QuerySpec, SortOrder, load_manifests,
};
pub use validate::validate_name;
pub use value::{parse_param, to_sql_text};
pub use version::{UnknownState, VersionState};
