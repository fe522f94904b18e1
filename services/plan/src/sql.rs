//! SQL text for a projection's table: DDL, the bulk write statements the
//! projector runs, and the reads the query service runs.
//!
//! Every value travels as a `text` or `text[]` parameter and is cast to the
//! column type in SQL, so one statement shape serves every batch and the
//! values were already checked by `value::to_sql_text`. Identifiers are
//! always quoted. The physical table name is a parameter because each spec
//! version lives in its own table.
//!
//! # Panics
//! These functions expect a validated spec and column names taken from it;
//! an undeclared column or an invalid predicate is a programming error.

use std::collections::BTreeMap;

use crate::digest::stable_hash;
use crate::fold::{Columns, Conflict, Folded, Patch, RowOp};
use eventplane_api::condition::{Cond, Condition, Term, parse_guard};
use eventplane_api::quote_ident;
use eventplane_api::render_predicate;
use eventplane_api::{ColumnOp, ColumnSpec, ColumnType, ProjectionSpec, QuerySpec, SortOrder};

/// Postgres truncates identifiers longer than this many bytes.
const MAX_IDENT_BYTES: usize = 63;

/// A statement whose parameters are `text[]` arrays, one per entry of
/// `columns`, in that order (`$1` is `columns[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkStatement {
    pub sql: String,
    pub columns: Vec<String>,
}

/// What an upsert does when the key already exists.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConflictCols {
    /// Change these columns by their operation, with the inserted value as
    /// the operand (empty: do nothing). Each must be one of the insert
    /// columns.
    Set(Vec<(String, ColumnOp)>),
    /// Every non-key column takes the inserted value, or NULL when it is not
    /// an insert column.
    Replace,
}

/// A list query and the filter columns whose values are its first
/// parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListSql {
    pub sql: String,
    pub filter_columns: Vec<String>,
}

fn column<'a>(spec: &'a ProjectionSpec, name: &str) -> &'a ColumnSpec {
    spec.column(name)
        .unwrap_or_else(|| panic!("column {name:?} is not declared in the spec"))
}

fn ty(spec: &ProjectionSpec, name: &str) -> ColumnType {
    column(spec, name).ty
}

fn all_columns(spec: &ProjectionSpec) -> String {
    spec.columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `CREATE TABLE` followed by the index statements.
pub fn create_table_sql(spec: &ProjectionSpec, table: &str) -> Vec<String> {
    let mut defs: Vec<String> = spec
        .columns
        .iter()
        .map(|c| {
            // The key is NOT NULL through PRIMARY KEY anyway; saying so keeps
            // the DDL readable.
            let not_null = if !c.nullable || spec.is_key(&c.name) {
                " NOT NULL"
            } else {
                ""
            };
            format!("{} {}{not_null}", quote_ident(&c.name), c.ty.sql())
        })
        .collect();
    defs.push(format!("PRIMARY KEY ({})", quoted_list(spec.key_names())));
    let mut out = vec![format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        quote_ident(table),
        defs.join(", ")
    )];
    out.extend(index_sql(spec, table));
    out
}

/// The physical name of an index: `<table>_<index>`, shortened with a hash
/// suffix when it would exceed Postgres' identifier limit, so that two long
/// names never truncate to the same identifier.
pub fn index_name(table: &str, index: &str) -> String {
    let full = format!("{table}_{index}");
    if full.len() <= MAX_IDENT_BYTES {
        return full;
    }
    let suffix = format!("_{:08x}", stable_hash(full.as_bytes()) as u32);
    let mut cut = MAX_IDENT_BYTES - suffix.len();
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &full[..cut])
}

/// One `CREATE INDEX IF NOT EXISTS` per declared index.
pub fn index_sql(spec: &ProjectionSpec, table: &str) -> Vec<String> {
    spec.indexes
        .iter()
        .map(|ix| {
            let unique = if ix.unique { "UNIQUE " } else { "" };
            let cols = ix
                .columns
                .iter()
                .map(|c| match c.order {
                    SortOrder::Asc => quote_ident(&c.name),
                    SortOrder::Desc => format!("{} DESC", quote_ident(&c.name)),
                })
                .collect::<Vec<_>>()
                .join(", ");
            let mut sql = format!(
                "CREATE {unique}INDEX IF NOT EXISTS {} ON {} ({cols})",
                quote_ident(&index_name(table, &ix.name)),
                quote_ident(table)
            );
            if !ix.include.is_empty() {
                let inc = ix
                    .include
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", ");
                sql.push_str(&format!(" INCLUDE ({inc})"));
            }
            if let Some(p) = &ix.predicate {
                let rendered = render_predicate(p, &spec.columns)
                    .unwrap_or_else(|e| panic!("index {} has an invalid predicate: {e}", ix.name));
                sql.push_str(&format!(" WHERE {rendered}"));
            }
            sql
        })
        .collect()
}

/// The key columns' names, the first parameters of every bulk statement.
fn key_params(spec: &ProjectionSpec) -> Vec<String> {
    spec.key_names().to_vec()
}

/// `t` is the row whose key the parameters `v` carry.
fn key_match(spec: &ProjectionSpec) -> String {
    spec.key_columns()
        .map(|c| {
            let q = quote_ident(&c.name);
            format!("t.{q} = v.{q}::{}", c.ty.sql())
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn unnest(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}::text[]"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn quoted_list<S: AsRef<str>>(names: &[S]) -> String {
    names
        .iter()
        .map(|n| quote_ident(n.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Updates `cols` of existing rows; parameters are the keys, then one array
/// per column.
pub fn update_sql(spec: &ProjectionSpec, table: &str, cols: &[&str]) -> BulkStatement {
    let cols: Vec<(&str, ColumnOp)> = cols.iter().map(|c| (*c, ColumnOp::Set)).collect();
    update_effects_sql(spec, table, &cols, None)
}

/// The new value of column `c` under `op`, from the old value `old` and
/// the operand parameter `v."c"`.
fn effect_sql(spec: &ProjectionSpec, c: &str, op: ColumnOp, old: &str) -> String {
    let v = format!("v.{}::{}", quote_ident(c), ty(spec, c).sql());
    effect(op, old, &v)
}

/// The new value of a column under `op`, from its old value `old` and the
/// operand `v` (SQL expressions).
fn effect(op: ColumnOp, old: &str, v: &str) -> String {
    let v = v.to_string();
    match op {
        ColumnOp::Set => v,
        ColumnOp::Add => format!("COALESCE({old}, 0) + {v}"),
        ColumnOp::Min => format!("LEAST({old}, {v})"),
        ColumnOp::Max => format!("GREATEST({old}, {v})"),
        ColumnOp::SetIfNull => format!("COALESCE({old}, {v})"),
        ColumnOp::Append => {
            format!("CASE WHEN jsonb_typeof({old}) = 'array' THEN {old} || {v} ELSE {v} END")
        }
        ColumnOp::Merge => {
            format!("CASE WHEN jsonb_typeof({old}) = 'object' THEN {old} || {v} ELSE {v} END")
        }
    }
}

/// The parameter columns of handler `handler`'s guard, after the others.
fn guard_names(spec: &ProjectionSpec, handler: Option<usize>) -> Vec<String> {
    handler
        .map(|h| {
            (0..guard_of(spec, h).slots.len())
                .map(|i| format!("ep_g{i}"))
                .collect()
        })
        .unwrap_or_default()
}

fn guard_of(spec: &ProjectionSpec, handler: usize) -> Condition {
    let text = spec.handlers[handler]
        .guard
        .as_deref()
        .unwrap_or_else(|| panic!("handler {handler} has no guard"));
    parse_guard(text, &spec.columns).unwrap_or_else(|e| panic!("validated guard {text:?}: {e}"))
}

/// Renders a guard. Columns are read from `t` or, without a row, are
/// NULL; slots are the `v."ep_g<i>"` parameters.
fn guard_sql(spec: &ProjectionSpec, c: &Condition, row: bool) -> String {
    let term = |t: &Term| match t {
        Term::Column(name) if row => format!("t.{}", quote_ident(name)),
        Term::Column(name) => format!("NULL::{}", ty(spec, name).sql()),
        Term::Slot(i) => format!("v.\"ep_g{i}\"::{}", c.slots[*i].ty.sql()),
        Term::Null => "NULL".to_string(),
    };
    fn walk(e: &Cond, term: &dyn Fn(&Term) -> String) -> String {
        match e {
            Cond::And(a, b) => format!("({} AND {})", walk(a, term), walk(b, term)),
            Cond::Or(a, b) => format!("({} OR {})", walk(a, term), walk(b, term)),
            Cond::Not(a) => format!("(NOT {})", walk(a, term)),
            Cond::Compare(a, op, b) => format!("({} {} {})", term(a), op.sql(), term(b)),
            Cond::IsNull(a, negated) => {
                let not = if *negated { "NOT " } else { "" };
                format!("({} IS {not}NULL)", term(a))
            }
            Cond::In(a, items, negated) => {
                let not = if *negated { "NOT " } else { "" };
                let items: Vec<String> = items.iter().map(term).collect();
                format!("({} {not}IN ({}))", term(a), items.join(", "))
            }
            Cond::Truth(a) => format!("({})", term(a)),
        }
    }
    walk(&c.cond, &term)
}

/// Changes `cols` of existing rows, each by its operation, where handler
/// `guard`'s condition holds if one is given; parameters are the keys, one
/// array per column, then the guard's slots.
pub fn update_effects_sql(
    spec: &ProjectionSpec,
    table: &str,
    cols: &[(&str, ColumnOp)],
    guard: Option<usize>,
) -> BulkStatement {
    let mut names = key_params(spec);
    names.extend(cols.iter().map(|(c, _)| c.to_string()));
    names.extend(guard_names(spec, guard));
    let set = cols
        .iter()
        .map(|(c, op)| {
            let q = quote_ident(c);
            format!("{q} = {}", effect_sql(spec, c, *op, &format!("t.{q}")))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let condition = guard
        .map(|h| format!(" AND {}", guard_sql(spec, &guard_of(spec, h), true)))
        .unwrap_or_default();
    let sql = format!(
        "UPDATE {} AS t SET {set} FROM unnest({}) AS v({}) WHERE {}{condition}",
        quote_ident(table),
        unnest(names.len()),
        quoted_list(&names),
        key_match(spec)
    );
    BulkStatement {
        sql,
        columns: names,
    }
}

/// Deletes the rows whose keys are the parameters, where handler `guard`'s
/// condition holds if one is given; its slots are the next parameters.
pub fn delete_sql(spec: &ProjectionSpec, table: &str, guard: Option<usize>) -> BulkStatement {
    let mut names = key_params(spec);
    names.extend(guard_names(spec, guard));
    let condition = guard
        .map(|h| format!(" AND {}", guard_sql(spec, &guard_of(spec, h), true)))
        .unwrap_or_default();
    let sql = format!(
        "DELETE FROM {} AS t USING unnest({}) AS v({}) WHERE {}{condition}",
        quote_ident(table),
        unnest(names.len()),
        quoted_list(&names),
        key_match(spec)
    );
    BulkStatement {
        sql,
        columns: names,
    }
}

/// Inserts rows (key plus `insert_cols`) and resolves key conflicts as
/// `conflict` says; parameters are the keys, then one array per insert
/// column.
pub fn upsert_sql(
    spec: &ProjectionSpec,
    table: &str,
    insert_cols: &[&str],
    conflict: ConflictCols,
) -> BulkStatement {
    upsert_guarded_sql(spec, table, insert_cols, conflict, None)
}

/// [`upsert_sql`], inserting only where handler `guard`'s condition holds
/// on a row of nulls; its slots are parameters after the insert columns.
pub fn upsert_guarded_sql(
    spec: &ProjectionSpec,
    table: &str,
    insert_cols: &[&str],
    conflict: ConflictCols,
    guard: Option<usize>,
) -> BulkStatement {
    let mut names = key_params(spec);
    names.extend(insert_cols.iter().map(|c| c.to_string()));
    let inserted = names.len();
    names.extend(guard_names(spec, guard));
    let select = names[..inserted]
        .iter()
        .map(|c| {
            let q = quote_ident(c);
            format!("v.{q}::{}", ty(spec, c).sql())
        })
        .collect::<Vec<_>>()
        .join(", ");
    let assignments: Vec<String> = match &conflict {
        ConflictCols::Set(cols) => cols
            .iter()
            .map(|(c, op)| {
                let q = quote_ident(c);
                format!(
                    "{q} = {}",
                    effect(*op, &format!("t.{q}"), &format!("EXCLUDED.{q}"))
                )
            })
            .collect(),
        ConflictCols::Replace => spec
            .columns
            .iter()
            .filter(|c| !spec.is_key(&c.name))
            .map(|c| {
                let q = quote_ident(&c.name);
                if insert_cols.contains(&c.name.as_str()) {
                    format!("{q} = EXCLUDED.{q}")
                } else {
                    format!("{q} = NULL")
                }
            })
            .collect(),
    };
    let on_conflict = if assignments.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", assignments.join(", "))
    };
    let condition = guard
        .map(|h| format!(" WHERE {}", guard_sql(spec, &guard_of(spec, h), false)))
        .unwrap_or_default();
    let sql = format!(
        "INSERT INTO {} AS t ({}) SELECT {select} FROM unnest({}) AS v({}){condition} ON CONFLICT ({}) {on_conflict}",
        quote_ident(table),
        quoted_list(&names[..inserted]),
        unnest(names.len()),
        quoted_list(&names),
        quoted_list(spec.key_names())
    );
    BulkStatement {
        sql,
        columns: names,
    }
}

/// The statement shape a row operation needs, with the handler whose
/// guard it carries. Variant order is execution order: see `group_ops`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Shape {
    Delete(Option<usize>),
    Update(Vec<(String, ColumnOp)>, Option<usize>),
    Upsert(Vec<String>, ConflictCols, Option<usize>),
}

type Rows = Vec<Vec<Option<String>>>;

/// One round's operations grouped by shape, each row as its parameter
/// values.
fn group_round(spec: &ProjectionSpec, ops: Vec<(String, RowOp)>) -> BTreeMap<Shape, Rows> {
    let mut groups: BTreeMap<Shape, Rows> = BTreeMap::new();
    for (key, op) in ops {
        let key = crate::key::parts(spec, &key);
        let (guard, op) = match op {
            RowOp::Guarded(g, op) => (Some(g), *op),
            op => (None, op),
        };
        let handler = guard.as_ref().map(|g| g.handler);
        let params = guard.map(|g| g.params).unwrap_or_default();
        let mut add = |shape: Shape, values: Vec<Option<String>>| {
            let mut row: Vec<Option<String>> = key.iter().cloned().map(Some).collect();
            row.extend(values);
            row.extend(params.iter().cloned());
            groups.entry(shape).or_default().push(row);
        };
        let names = |m: &Columns| m.keys().cloned().collect::<Vec<_>>();
        let patch_shape = |p: &Patch| p.iter().map(|(c, e)| (c.clone(), e.op)).collect::<Vec<_>>();
        let patch_values = |p: &Patch| p.values().map(|e| e.value.clone()).collect::<Vec<_>>();
        match op {
            RowOp::Guarded(..) => unreachable!("guards do not nest"),
            RowOp::Delete => add(Shape::Delete(handler), Vec::new()),
            RowOp::Update(p) => {
                if !p.is_empty() {
                    add(Shape::Update(patch_shape(&p), handler), patch_values(&p));
                }
            }
            RowOp::Upsert {
                insert,
                on_conflict: Conflict::Replace,
            } => add(
                Shape::Upsert(names(&insert), ConflictCols::Replace, handler),
                insert.into_values().collect(),
            ),
            RowOp::Upsert {
                insert,
                on_conflict: Conflict::Set(patch),
            } => {
                // One statement when the conflict changes each column by
                // what the insert carries (a set to it, an add, min or max
                // of it): besides saving a round trip, it is safe beside
                // another writer of the row (a Kafka-fed batch of another
                // partition), whose insert it waits for and then updates.
                // Otherwise the update of existing rows, then the insert of
                // absent ones.
                let covered = handler.is_none()
                    && patch.iter().all(|(c, e)| {
                        matches!(
                            e.op,
                            ColumnOp::Set | ColumnOp::Add | ColumnOp::Min | ColumnOp::Max
                        ) && insert.get(c) == Some(&e.value)
                    });
                if covered {
                    add(
                        Shape::Upsert(
                            names(&insert),
                            ConflictCols::Set(
                                patch.iter().map(|(c, e)| (c.clone(), e.op)).collect(),
                            ),
                            None,
                        ),
                        insert.into_values().collect(),
                    );
                } else {
                    if !patch.is_empty() {
                        add(
                            Shape::Update(patch_shape(&patch), handler),
                            patch_values(&patch),
                        );
                    }
                    add(
                        Shape::Upsert(names(&insert), ConflictCols::Set(Vec::new()), handler),
                        insert.into_values().collect(),
                    );
                }
            }
        }
    }
    groups
}

/// Groups folded row operations by statement shape. Returns each statement
/// with its column-major parameters (one array per `text[]` parameter).
///
/// The statements must run in the returned order, in one transaction:
/// rounds in order, and within a round an upsert whose conflict changes
/// more than it inserts is split into an UPDATE, which comes first, and an
/// INSERT … DO NOTHING, which must not run before it.
pub fn group_ops(
    spec: &ProjectionSpec,
    table: &str,
    folded: Folded,
) -> Vec<(BulkStatement, Vec<Vec<Option<String>>>)> {
    let mut out = Vec::new();
    for round in folded.rounds {
        for (shape, rows) in group_round(spec, round) {
            let statement = match shape {
                Shape::Delete(guard) => delete_sql(spec, table, guard),
                Shape::Update(cols, guard) => {
                    let cols: Vec<(&str, ColumnOp)> =
                        cols.iter().map(|(c, op)| (c.as_str(), *op)).collect();
                    update_effects_sql(spec, table, &cols, guard)
                }
                Shape::Upsert(cols, conflict, guard) => {
                    let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
                    upsert_guarded_sql(spec, table, &cols, conflict, guard)
                }
            };
            let width = statement.columns.len();
            let mut params = vec![Vec::with_capacity(rows.len()); width];
            for row in rows {
                for (param, value) in params.iter_mut().zip(row) {
                    param.push(value);
                }
            }
            out.push((statement, params));
        }
    }
    out
}

/// Reads one row as the text of a JSON object; the parameters are the key
/// columns' values as text, in key order. Postgres renders the JSON, so a
/// `numeric` keeps every digit.
pub fn row_sql(spec: &ProjectionSpec, table: &str) -> String {
    let key = spec
        .key_columns()
        .enumerate()
        .map(|(i, c)| format!("{} = ${}::{}", quote_ident(&c.name), i + 1, c.ty.sql()))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!(
        "SELECT to_jsonb(t)::text FROM (SELECT {} FROM {} WHERE {key}) t",
        all_columns(spec),
        quote_ident(table),
    )
}

/// The columns a query's rows are ordered by: its orderBy columns, then the
/// key columns as a tie-breaker (those not already listed). A cursor holds their values
/// in this order.
pub fn sort_columns<'a>(spec: &'a ProjectionSpec, query: &QuerySpec) -> Vec<&'a ColumnSpec> {
    let mut cols: Vec<&ColumnSpec> = query
        .order_by
        .iter()
        .map(|o| column(spec, &o.column))
        .collect();
    for key in spec.key_columns() {
        if !cols.iter().any(|c| c.name == key.name) {
            cols.push(key);
        }
    }
    cols
}

/// A page of a list query. Parameters: the filter values in
/// `filter_columns` order, then (with a cursor) the cursor values in
/// `sort_columns` order, then the limit.
pub fn list_sql(
    spec: &ProjectionSpec,
    query: &QuerySpec,
    table: &str,
    with_cursor: bool,
) -> ListSql {
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    let mut conditions: Vec<String> = query
        .filters
        .iter()
        .map(|f| format!("{} = ${}::{}", quote_ident(f), next(), ty(spec, f).sql()))
        .collect();
    let sort = sort_columns(spec, query);
    let desc = ProjectionSpec::direction(query) == SortOrder::Desc;
    if with_cursor {
        let names = sort
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let params = sort
            .iter()
            .map(|c| format!("${}::{}", next(), c.ty.sql()))
            .collect::<Vec<_>>()
            .join(", ");
        let cmp = if desc { "<" } else { ">" };
        conditions.push(format!("({names}) {cmp} ({params})"));
    }
    let limit = next();
    let dir = if desc { " DESC" } else { "" };
    let order = |prefix: &str| {
        sort.iter()
            .map(|c| format!("{prefix}{}{dir}", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    // Each row comes as JSON text with, beside it, its sort values as a
    // JSON array (the next page's cursor if it is the last one), both
    // rendered by Postgres so `numeric` keeps every digit. The outer ORDER
    // BY is what orders the result; the inner one only picks which rows
    // the LIMIT keeps.
    let sort_values = sort
        .iter()
        .map(|c| format!("t.{}", quote_ident(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT to_jsonb(t)::text, jsonb_build_array({sort_values})::text \
         FROM (SELECT {} FROM {}{filter} ORDER BY {} LIMIT ${limit}::bigint) t ORDER BY {}",
        all_columns(spec),
        quote_ident(table),
        order(""),
        order("t."),
    );
    ListSql {
        sql,
        filter_columns: query.filters.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fold::{Effect, fold, tests as fold_tests};
    use eventplane_api::examples::orders as sample;

    const COLS: &str = r#""id", "status", "customer_id", "total", "created_at", "updated_at""#;

    #[test]
    fn create_table_snapshot() {
        let sql = create_table_sql(&sample(), "orders_v2");
        assert_eq!(
            sql,
            [
                r#"CREATE TABLE IF NOT EXISTS "orders_v2" ("id" text NOT NULL, "status" text NOT NULL, "customer_id" text NOT NULL, "total" numeric, "created_at" timestamptz NOT NULL, "updated_at" timestamptz, PRIMARY KEY ("id"))"#,
                r#"CREATE INDEX IF NOT EXISTS "orders_v2_by_status_customer" ON "orders_v2" ("status", "customer_id", "created_at" DESC)"#,
                r#"CREATE INDEX IF NOT EXISTS "orders_v2_covering" ON "orders_v2" ("id") INCLUDE ("total", "status")"#,
                r#"CREATE INDEX IF NOT EXISTS "orders_v2_pending" ON "orders_v2" ("created_at") WHERE ("status" = 'PENDING')"#,
                r#"CREATE INDEX IF NOT EXISTS "orders_v2_by_customer" ON "orders_v2" ("customer_id", "created_at" DESC)"#,
                r#"CREATE INDEX IF NOT EXISTS "orders_v2_by_created" ON "orders_v2" ("created_at" DESC)"#,
            ]
        );
        assert_eq!(index_sql(&sample(), "orders_v2"), sql[1..]);
    }

    #[test]
    fn unique_indexes_and_nullable_keys() {
        let mut spec = sample();
        spec.indexes[1].unique = true;
        spec.columns[0].nullable = true;
        let sql = create_table_sql(&spec, "orders");
        assert!(sql[0].starts_with(r#"CREATE TABLE IF NOT EXISTS "orders" ("id" text NOT NULL, "#));
        assert!(sql[2].starts_with(r#"CREATE UNIQUE INDEX IF NOT EXISTS "orders_covering""#));
    }

    #[test]
    fn long_index_names_are_shortened_distinctly() {
        let table = "t".repeat(48);
        let a = index_name(&table, &"a".repeat(40));
        let b = index_name(&table, &format!("{}b", "a".repeat(39)));
        assert_eq!(a.len(), 63);
        assert_eq!(b.len(), 63);
        assert_ne!(a, b);
        assert_eq!(a, index_name(&table, &"a".repeat(40)));
        assert_eq!(index_name("orders", "pending"), "orders_pending");
    }

    /// The sample keyed by (customer_id, id).
    fn composite() -> ProjectionSpec {
        let mut spec = sample();
        spec.keys = vec!["customer_id".into(), "id".into()];
        spec.key.clear();
        spec
    }

    #[test]
    fn composite_keys_match_every_key_column() {
        let spec = composite();
        let ddl = create_table_sql(&spec, "orders");
        assert!(
            ddl[0].ends_with(r#"PRIMARY KEY ("customer_id", "id"))"#),
            "{}",
            ddl[0]
        );
        assert_eq!(
            row_sql(&spec, "orders"),
            r#"SELECT to_jsonb(t)::text FROM (SELECT "id", "status", "customer_id", "total", "created_at", "updated_at" FROM "orders" WHERE "customer_id" = $1::text AND "id" = $2::text) t"#
        );
        let delete = delete_sql(&spec, "orders", None);
        assert_eq!(
            delete.sql,
            r#"DELETE FROM "orders" AS t USING unnest($1::text[], $2::text[]) AS v("customer_id", "id") WHERE t."customer_id" = v."customer_id"::text AND t."id" = v."id"::text"#
        );
        let upsert = upsert_sql(&spec, "orders", &["status"], ConflictCols::Replace);
        assert!(
            upsert.sql.ends_with(r#"ON CONFLICT ("customer_id", "id") DO UPDATE SET "status" = EXCLUDED."status", "total" = NULL, "created_at" = NULL, "updated_at" = NULL"#),
            "{}",
            upsert.sql
        );
        assert_eq!(upsert.columns, ["customer_id", "id", "status"]);
        // Each row's key string is split into one parameter per column.
        let key = crate::key::encode(vec!["c1".into(), "o1".into()]);
        let groups = group_ops(&spec, "orders", one_round(vec![(key, RowOp::Delete)]));
        assert_eq!(groups[0].0, delete);
        assert_eq!(
            groups[0].1,
            vec![vec![Some("c1".to_string())], vec![Some("o1".to_string())]]
        );
        let sort = sort_columns(&spec, &spec.queries[0]);
        let names: Vec<&str> = sort.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["created_at", "customer_id", "id"]);
    }

    #[test]
    fn delete_snapshot() {
        assert_eq!(
            delete_sql(&sample(), "orders", None).sql,
            r#"DELETE FROM "orders" AS t USING unnest($1::text[]) AS v("id") WHERE t."id" = v."id"::text"#
        );
    }

    #[test]
    fn update_snapshot() {
        let s = update_sql(&sample(), "orders", &["status", "updated_at"]);
        assert_eq!(
            s.sql,
            r#"UPDATE "orders" AS t SET "status" = v."status"::text, "updated_at" = v."updated_at"::timestamptz FROM unnest($1::text[], $2::text[], $3::text[]) AS v("id", "status", "updated_at") WHERE t."id" = v."id"::text"#
        );
        assert_eq!(s.columns, ["id", "status", "updated_at"]);
    }

    #[test]
    fn upsert_snapshots() {
        let spec = sample();
        let s = upsert_sql(
            &spec,
            "orders",
            &["status", "total"],
            ConflictCols::Set(vec![("status".into(), ColumnOp::Set)]),
        );
        assert_eq!(
            s.sql,
            r#"INSERT INTO "orders" AS t ("id", "status", "total") SELECT v."id"::text, v."status"::text, v."total"::numeric FROM unnest($1::text[], $2::text[], $3::text[]) AS v("id", "status", "total") ON CONFLICT ("id") DO UPDATE SET "status" = EXCLUDED."status""#
        );
        // Additions, minimums and maximums take the inserted value as
        // their operand, so one statement inserts or changes the row.
        let added = upsert_sql(
            &spec,
            "orders",
            &["total", "updated_at"],
            ConflictCols::Set(vec![
                ("total".into(), ColumnOp::Add),
                ("updated_at".into(), ColumnOp::Max),
            ]),
        );
        assert!(
            added.sql.ends_with(r#"DO UPDATE SET "total" = COALESCE(t."total", 0) + EXCLUDED."total", "updated_at" = GREATEST(t."updated_at", EXCLUDED."updated_at")"#),
            "{}",
            added.sql
        );
        assert_eq!(s.columns, ["id", "status", "total"]);
        let s = upsert_sql(&spec, "orders", &["status"], ConflictCols::Set(vec![]));
        assert!(
            s.sql.ends_with(r#"ON CONFLICT ("id") DO NOTHING"#),
            "{}",
            s.sql
        );
        let s = upsert_sql(&spec, "orders", &["status", "total"], ConflictCols::Replace);
        assert!(
            s.sql.ends_with(r#"ON CONFLICT ("id") DO UPDATE SET "status" = EXCLUDED."status", "customer_id" = NULL, "total" = EXCLUDED."total", "created_at" = NULL, "updated_at" = NULL"#),
            "{}",
            s.sql
        );
    }

    #[test]
    fn row_snapshot() {
        assert_eq!(
            row_sql(&sample(), "orders"),
            format!(
                r#"SELECT to_jsonb(t)::text FROM (SELECT {COLS} FROM "orders" WHERE "id" = $1::text) t"#
            )
        );
    }

    #[test]
    fn list_snapshots() {
        let spec = sample();
        let q = &spec.queries[0];
        let l = list_sql(&spec, q, "orders", false);
        assert_eq!(
            l.sql,
            format!(
                r#"SELECT to_jsonb(t)::text, jsonb_build_array(t."created_at", t."id")::text FROM (SELECT {COLS} FROM "orders" WHERE "customer_id" = $1::text ORDER BY "created_at" DESC, "id" DESC LIMIT $2::bigint) t ORDER BY t."created_at" DESC, t."id" DESC"#
            )
        );
        assert_eq!(l.filter_columns, ["customer_id"]);
        let l = list_sql(&spec, q, "orders", true);
        assert_eq!(
            l.sql,
            format!(
                r#"SELECT to_jsonb(t)::text, jsonb_build_array(t."created_at", t."id")::text FROM (SELECT {COLS} FROM "orders" WHERE "customer_id" = $1::text AND ("created_at", "id") < ($2::timestamptz, $3::text) ORDER BY "created_at" DESC, "id" DESC LIMIT $4::bigint) t ORDER BY t."created_at" DESC, t."id" DESC"#
            )
        );
        let recent = list_sql(&spec, &spec.queries[2], "orders", true);
        assert!(
            recent
                .sql
                .contains(r#" WHERE ("created_at", "id") < ($1::timestamptz, $2::text) ORDER BY"#),
            "{}",
            recent.sql
        );
        assert!(recent.sql.contains("LIMIT $3::bigint"));
        assert!(recent.filter_columns.is_empty());
    }

    #[test]
    fn list_without_order_by_sorts_by_key_ascending() {
        let spec = sample();
        let mut q = spec.queries[2].clone();
        q.order_by.clear();
        let l = list_sql(&spec, &q, "orders", false);
        assert_eq!(
            l.sql,
            format!(
                r#"SELECT to_jsonb(t)::text, jsonb_build_array(t."id")::text FROM (SELECT {COLS} FROM "orders" ORDER BY "id" LIMIT $1::bigint) t ORDER BY t."id""#
            )
        );
        let l = list_sql(&spec, &q, "orders", true);
        assert!(
            l.sql
                .contains(r#"WHERE ("id") > ($1::text) ORDER BY "id" LIMIT $2::bigint"#),
            "{}",
            l.sql
        );
    }

    #[test]
    fn key_in_order_by_is_not_repeated() {
        let spec = sample();
        let mut q = spec.queries[2].clone();
        q.order_by[0].column = "id".into();
        let cols: Vec<&str> = sort_columns(&spec, &q)
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["id"]);
    }

    fn c(pairs: &[(&str, Option<&str>)]) -> Columns {
        fold_tests::cols(pairs)
    }

    fn p(pairs: &[(&str, Option<&str>)]) -> Patch {
        fold_tests::set(pairs)
    }

    fn one_round(ops: Vec<(String, RowOp)>) -> Folded {
        Folded { rounds: vec![ops] }
    }

    #[test]
    fn group_ops_batches_rows_by_shape_in_execution_order() {
        let spec = sample();
        let ops = vec![
            ("a".to_string(), RowOp::Delete),
            (
                "b".to_string(),
                RowOp::Update(p(&[("status", Some("PAID"))])),
            ),
            (
                "c".to_string(),
                RowOp::Update(p(&[("status", Some("SHIPPED"))])),
            ),
            ("d".to_string(), RowOp::Update(Patch::new())),
            ("e".to_string(), RowOp::Delete),
        ];
        let groups = group_ops(&spec, "orders", one_round(ops));
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].0, delete_sql(&spec, "orders", None));
        assert_eq!(
            groups[0].1,
            vec![vec![Some("a".to_string()), Some("e".to_string())]]
        );
        assert_eq!(groups[1].0, update_sql(&spec, "orders", &["status"]));
        assert_eq!(
            groups[1].1,
            vec![
                vec![Some("b".to_string()), Some("c".to_string())],
                vec![Some("PAID".to_string()), Some("SHIPPED".to_string())],
            ]
        );
    }

    #[test]
    fn group_ops_keeps_nulls_and_conflict_modes_apart() {
        let spec = sample();
        let ins = c(&[("status", Some("PENDING")), ("total", None)]);
        let ops = vec![
            (
                "a".to_string(),
                RowOp::Upsert {
                    insert: ins.clone(),
                    on_conflict: Conflict::Set(p(&[("status", Some("PENDING")), ("total", None)])),
                },
            ),
            (
                "b".to_string(),
                RowOp::Upsert {
                    insert: ins.clone(),
                    on_conflict: Conflict::Replace,
                },
            ),
        ];
        let groups = group_ops(&spec, "orders", one_round(ops));
        assert_eq!(groups.len(), 2);
        assert_eq!(
            groups[0].0,
            upsert_sql(
                &spec,
                "orders",
                &["status", "total"],
                ConflictCols::Set(vec![
                    ("status".into(), ColumnOp::Set),
                    ("total".into(), ColumnOp::Set)
                ])
            )
        );
        assert_eq!(
            groups[0].1,
            vec![
                vec![Some("a".to_string())],
                vec![Some("PENDING".to_string())],
                vec![None]
            ]
        );
        assert_eq!(
            groups[1].0,
            upsert_sql(&spec, "orders", &["status", "total"], ConflictCols::Replace)
        );
    }

    #[test]
    fn an_upsert_adding_what_it_inserts_is_one_statement() {
        let spec = sample();
        let mut patch = Patch::new();
        patch.insert(
            "total".to_string(),
            Effect {
                op: ColumnOp::Add,
                ty: ColumnType::Numeric,
                value: Some("5".to_string()),
            },
        );
        let upsert = |insert: &str| RowOp::Upsert {
            insert: c(&[("total", Some(insert))]),
            on_conflict: Conflict::Set(patch.clone()),
        };
        let groups = group_ops(&spec, "orders", one_round(vec![("a".into(), upsert("5"))]));
        assert_eq!(groups.len(), 1);
        assert_eq!(
            groups[0].0,
            upsert_sql(
                &spec,
                "orders",
                &["total"],
                ConflictCols::Set(vec![("total".into(), ColumnOp::Add)])
            )
        );
        // An absent row would not start from the operand: split.
        let groups = group_ops(&spec, "orders", one_round(vec![("a".into(), upsert("7"))]));
        assert_eq!(groups.len(), 2);
        assert_eq!(
            groups[0].0,
            update_effects_sql(&spec, "orders", &[("total", ColumnOp::Add)], None)
        );
    }

    #[test]
    fn upsert_patching_uninserted_columns_is_split_update_first() {
        let spec = sample();
        let ops = vec![(
            "a".to_string(),
            RowOp::Upsert {
                insert: c(&[("status", Some("PENDING"))]),
                on_conflict: Conflict::Set(p(&[("status", Some("PENDING")), ("total", Some("5"))])),
            },
        )];
        let groups = group_ops(&spec, "orders", one_round(ops));
        assert_eq!(groups.len(), 2);
        assert_eq!(
            groups[0].0,
            update_sql(&spec, "orders", &["status", "total"])
        );
        assert_eq!(
            groups[1].0,
            upsert_sql(&spec, "orders", &["status"], ConflictCols::Set(vec![]))
        );
    }

    /// Interprets grouped statements against an in-memory table, by shape,
    /// to check that grouping preserves the folded semantics.
    #[test]
    fn grouped_statements_match_sequential_application() {
        use fold_tests::{Rng, random_change};
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        let all = ["a", "b", "c"];
        for _ in 0..2000 {
            let changes: Vec<_> = (0..rng.below(10))
                .map(|_| random_change(&mut rng, 3))
                .collect();
            let mut start: BTreeMap<String, Columns> = BTreeMap::new();
            for k in 0..3 {
                if rng.below(2) == 0 {
                    let mut row = fold_tests::null_row();
                    row.extend(all.iter().map(|c| (c.to_string(), Some(format!("old{k}")))));
                    start.insert(format!("k{k}"), row);
                }
            }
            let mut expected = start.clone();
            for (key, op) in fold(changes.clone()).rounds.into_iter().flatten() {
                fold_tests::apply_op(&mut expected, &key, &op);
            }
            let mut actual = start.clone();
            for (stmt, params) in group_ops(&test_spec(), "t", fold(changes.clone())) {
                let rows = params[0].len();
                for r in 0..rows {
                    let key = params[0][r].clone().unwrap();
                    let vals: Columns = stmt.columns[1..]
                        .iter()
                        .zip(&params[1..])
                        .map(|(c, p)| (c.clone(), p[r].clone()))
                        .collect();
                    let null_row = fold_tests::null_row;
                    if stmt.sql.starts_with("DELETE") {
                        actual.remove(&key);
                    } else if stmt.sql.starts_with("UPDATE") {
                        if let Some(row) = actual.get_mut(&key) {
                            row.extend(vals);
                        }
                    } else if let Some(row) = actual.get_mut(&key) {
                        // The conflict clause, read back column by column.
                        for c in all {
                            if stmt.sql.contains(&format!("\"{c}\" = EXCLUDED")) {
                                row.insert(c.to_string(), vals[c].clone());
                            } else if stmt.sql.contains(&format!("\"{c}\" = NULL")) {
                                row.insert(c.to_string(), None);
                            }
                        }
                    } else {
                        let mut row = null_row();
                        row.extend(vals);
                        actual.insert(key, row);
                    }
                }
            }
            assert_eq!(actual, expected, "{changes:?}");
        }
    }

    #[test]
    fn effects_and_guards_render_as_expressions_over_parameters() {
        let mut spec = sample();
        spec.handlers[1].guard =
            Some("status IN ('PENDING', 'x''; DROP') AND total < data.total".into());
        let s = update_effects_sql(
            &spec,
            "orders",
            &[("total", ColumnOp::Add), ("updated_at", ColumnOp::Max)],
            Some(1),
        );
        assert_eq!(
            s.sql,
            r#"UPDATE "orders" AS t SET "total" = COALESCE(t."total", 0) + v."total"::numeric, "updated_at" = GREATEST(t."updated_at", v."updated_at"::timestamptz) FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) AS v("id", "total", "updated_at", "ep_g0", "ep_g1", "ep_g2") WHERE t."id" = v."id"::text AND ((t."status" IN (v."ep_g0"::text, v."ep_g1"::text)) AND (t."total" < v."ep_g2"::numeric))"#
        );
        assert!(!s.sql.contains("DROP"), "constants are parameters");
        let s = upsert_guarded_sql(
            &spec,
            "orders",
            &["status"],
            ConflictCols::Set(vec![]),
            Some(1),
        );
        assert!(
            s.sql.contains(r#"WHERE ((NULL::text IN (v."ep_g0"::text, v."ep_g1"::text)) AND (NULL::numeric < v."ep_g2"::numeric)) ON CONFLICT ("id") DO NOTHING"#),
            "{}",
            s.sql
        );
        assert_eq!(s.columns, ["id", "status", "ep_g0", "ep_g1", "ep_g2"]);
        let s = delete_sql(&spec, "orders", Some(1));
        assert!(
            s.sql.starts_with(r#"DELETE FROM "orders" AS t USING unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS v("id", "ep_g0", "ep_g1", "ep_g2") WHERE t."id" = v."id"::text AND "#),
            "{}",
            s.sql
        );
        let e = |op| update_effects_sql(&spec, "orders", &[("total", op)], None).sql;
        assert!(e(ColumnOp::Min).contains(r#""total" = LEAST(t."total", v."total"::numeric)"#));
        assert!(
            e(ColumnOp::SetIfNull).contains(r#""total" = COALESCE(t."total", v."total"::numeric)"#)
        );
    }

    fn test_spec() -> ProjectionSpec {
        let yaml = r#"
apiVersion: eventplane.io/v1alpha1
kind: Projection
metadata: {name: t}
spec:
  table: t
  key: k
  columns: [{name: k, type: text}, {name: a, type: text}, {name: b, type: text}, {name: c, type: text}]
  handlers: [{eventType: E, op: delete, key: /k}]
"#;
        eventplane_api::load_manifests(yaml).unwrap().remove(0).spec
    }
}
