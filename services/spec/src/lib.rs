//! Eventplane projection spec: the declarative read-model definition shared
//! by the projector, the query service and the operator, with its validation
//! and all the pure logic that turns it into SQL and row changes.

pub mod cluster;
mod cursor;
mod error;
mod fold;
mod ident;
mod mapping;
pub mod partition;
mod predicate;
pub mod resource;
mod sql;
mod types;
mod validate;
mod value;

pub use cluster::{RebuildSpec, ReclaimPolicy, ScalingSpec};
pub use cursor::{decode_cursor, encode_cursor};
pub use error::SpecError;
pub use fold::{Columns, Conflict, RowOp, fold};
pub use ident::quote_ident;
pub use mapping::{ChangeKind, MapError, RowChange};
pub use partition::planner::{
    Bound, Calendar, ExistingPartition, Observed, Plan, PlanError, Step, default_partition_name,
    interval_start, next_start, partition_name, plan,
};
pub use partition::types::{
    DatabaseRef, Interval, PARTITION_POLICY_KIND, PartitionPolicy, PartitionPolicyManifest,
    PartitionPolicySpec, Retention, RetentionAction, load_partition_policies,
};
pub use predicate::render_predicate;
pub use sql::{
    BulkStatement, ConflictCols, ListSql, create_table_sql, delete_sql, group_ops, index_name,
    index_sql, list_sql, row_sql, sort_columns, update_sql, upsert_sql,
};
pub use types::{
    API_VERSION, Assignment, CacheSpec, ColumnSpec, ColumnType, ErrorPolicy, HandlerSpec,
    IndexColumn, IndexSpec, KIND, ManifestMetadata, Op, OrderBy, Projection, ProjectionManifest,
    ProjectionSpec, QuerySpec, SortOrder, load_manifests,
};
pub use validate::validate_name;
pub use value::{parse_param, to_sql_text};
