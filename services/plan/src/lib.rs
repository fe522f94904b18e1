//! Eventplane's planners: pure functions from a declared spec to what the
//! runtime executes. For projections: mapping events onto row changes,
//! folding a batch per key, and the SQL of tables, indexes, bulk writes,
//! row reads and keyset-paged list queries. For partition policies: the
//! calendar and the ordered DDL steps that bring a table in line. No I/O.

pub mod content;
mod cursor;
mod digest;
mod fold;
pub mod key;
mod mapping;
pub mod partition;
pub mod replay;
mod sql;

pub use cursor::{decode_cursor, encode_cursor};
pub use digest::stable_hash;
pub use fold::{Columns, Conflict, Effect, Folded, Guard, Patch, RowOp, fold};
pub use mapping::{ChangeKind, MapError, Mapper, RowChange, map_event};
pub use partition::{
    Bound, Calendar, ExistingPartition, Observed, Plan, PlanError, Step, default_partition_name,
    interval_start, next_start, partition_name, plan,
};
pub use sql::{
    BulkStatement, ConflictCols, ListSql, create_table_sql, delete_sql, group_ops, index_name,
    index_sql, list_sql, row_sql, sort_columns, update_effects_sql, update_sql, upsert_guarded_sql,
    upsert_sql,
};
