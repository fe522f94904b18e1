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
use crate::fold::{Columns, Conflict, RowOp};
use eventplane_api::quote_ident;
use eventplane_api::render_predicate;
use eventplane_api::{ColumnSpec, ColumnType, ProjectionSpec, QuerySpec, SortOrder};

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
    /// Update these columns from the inserted values (empty: do nothing).
    /// Each must be one of the insert columns.
    Set(Vec<String>),
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
            let not_null = if !c.nullable || c.name == spec.key {
                " NOT NULL"
            } else {
                ""
            };
            format!("{} {}{not_null}", quote_ident(&c.name), c.ty.sql())
        })
        .collect();
    defs.push(format!("PRIMARY KEY ({})", quote_ident(&spec.key)));
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

/// Deletes the rows whose keys are in `$1` (a text array).
pub fn delete_sql(spec: &ProjectionSpec, table: &str) -> String {
    let kt = spec.key_column().ty.sql();
    format!(
        "DELETE FROM {} WHERE {} = ANY($1::text[]::{kt}[])",
        quote_ident(table),
        quote_ident(&spec.key)
    )
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
    let key = quote_ident(&spec.key);
    let kt = spec.key_column().ty.sql();
    let mut names = vec![spec.key.clone()];
    names.extend(cols.iter().map(|c| c.to_string()));
    let set = cols
        .iter()
        .map(|c| {
            let q = quote_ident(c);
            format!("{q} = v.{q}::{}", ty(spec, c).sql())
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "UPDATE {} AS t SET {set} FROM unnest({}) AS v({}) WHERE t.{key} = v.{key}::{kt}",
        quote_ident(table),
        unnest(names.len()),
        quoted_list(&names)
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
    let mut names = vec![spec.key.clone()];
    names.extend(insert_cols.iter().map(|c| c.to_string()));
    let select = names
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
            .map(|c| {
                let q = quote_ident(c);
                format!("{q} = EXCLUDED.{q}")
            })
            .collect(),
        ConflictCols::Replace => spec
            .columns
            .iter()
            .filter(|c| c.name != spec.key)
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
    let sql = format!(
        "INSERT INTO {} ({}) SELECT {select} FROM unnest({}) AS v({}) ON CONFLICT ({}) {on_conflict}",
        quote_ident(table),
        quoted_list(&names),
        unnest(names.len()),
        quoted_list(&names),
        quote_ident(&spec.key)
    );
    BulkStatement {
        sql,
        columns: names,
    }
}

/// The statement shape a row operation needs. Variant order is execution
/// order: see `group_ops`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Shape {
    Delete,
    Update(Vec<String>),
    Upsert(Vec<String>, ConflictCols),
}

/// Groups folded row operations by statement shape. Returns each statement
/// with its column-major parameters (one array per `text[]` parameter).
///
/// The statements must run in the returned order, in one transaction: an
/// upsert whose conflict update touches columns it does not insert (an
/// update followed by an upsert in the batch) is split into an UPDATE, which
/// comes first, and an INSERT … DO NOTHING, which must not run before it.
pub fn group_ops(
    spec: &ProjectionSpec,
    table: &str,
    ops: Vec<(String, RowOp)>,
) -> Vec<(BulkStatement, Vec<Vec<Option<String>>>)> {
    let mut groups: BTreeMap<Shape, Vec<Vec<Option<String>>>> = BTreeMap::new();
    let mut add = |shape: Shape, key: &str, values: &Columns| {
        let mut row = vec![Some(key.to_string())];
        row.extend(values.values().cloned());
        groups.entry(shape).or_default().push(row);
    };
    let names = |m: &Columns| m.keys().cloned().collect::<Vec<_>>();
    for (key, op) in ops {
        match op {
            RowOp::Delete => add(Shape::Delete, &key, &Columns::new()),
            RowOp::Update(m) => {
                if !m.is_empty() {
                    add(Shape::Update(names(&m)), &key, &m);
                }
            }
            RowOp::Upsert {
                insert,
                on_conflict: Conflict::Replace,
            } => add(
                Shape::Upsert(names(&insert), ConflictCols::Replace),
                &key,
                &insert,
            ),
            RowOp::Upsert {
                insert,
                on_conflict: Conflict::Set(patch),
            } => {
                let covered = patch.iter().all(|(c, v)| insert.get(c) == Some(v));
                if covered {
                    add(
                        Shape::Upsert(names(&insert), ConflictCols::Set(names(&patch))),
                        &key,
                        &insert,
                    );
                } else {
                    add(Shape::Update(names(&patch)), &key, &patch);
                    add(
                        Shape::Upsert(names(&insert), ConflictCols::Set(Vec::new())),
                        &key,
                        &insert,
                    );
                }
            }
        }
    }
    groups
        .into_iter()
        .map(|(shape, rows)| {
            let statement = match shape {
                Shape::Delete => BulkStatement {
                    sql: delete_sql(spec, table),
                    columns: vec![spec.key.clone()],
                },
                Shape::Update(cols) => {
                    let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
                    update_sql(spec, table, &cols)
                }
                Shape::Upsert(cols, conflict) => {
                    let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
                    upsert_sql(spec, table, &cols, conflict)
                }
            };
            let width = statement.columns.len();
            let mut params = vec![Vec::with_capacity(rows.len()); width];
            for row in rows {
                for (param, value) in params.iter_mut().zip(row) {
                    param.push(value);
                }
            }
            (statement, params)
        })
        .collect()
}

/// Reads one row as the text of a JSON object; `$1` is the key as text.
/// Postgres renders the JSON, so a `numeric` keeps every digit.
pub fn row_sql(spec: &ProjectionSpec, table: &str) -> String {
    format!(
        "SELECT to_jsonb(t)::text FROM (SELECT {} FROM {} WHERE {} = $1::{}) t",
        all_columns(spec),
        quote_ident(table),
        quote_ident(&spec.key),
        spec.key_column().ty.sql()
    )
}

/// The columns a query's rows are ordered by: its orderBy columns, then the
/// key as a tie-breaker (unless already listed). A cursor holds their values
/// in this order.
pub fn sort_columns<'a>(spec: &'a ProjectionSpec, query: &QuerySpec) -> Vec<&'a ColumnSpec> {
    let mut cols: Vec<&ColumnSpec> = query
        .order_by
        .iter()
        .map(|o| column(spec, &o.column))
        .collect();
    if !cols.iter().any(|c| c.name == spec.key) {
        cols.push(spec.key_column());
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
    use crate::fold::{fold, tests as fold_tests};
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

    #[test]
    fn delete_snapshot() {
        assert_eq!(
            delete_sql(&sample(), "orders"),
            r#"DELETE FROM "orders" WHERE "id" = ANY($1::text[]::text[])"#
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
            ConflictCols::Set(vec!["status".into()]),
        );
        assert_eq!(
            s.sql,
            r#"INSERT INTO "orders" ("id", "status", "total") SELECT v."id"::text, v."status"::text, v."total"::numeric FROM unnest($1::text[], $2::text[], $3::text[]) AS v("id", "status", "total") ON CONFLICT ("id") DO UPDATE SET "status" = EXCLUDED."status""#
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

    #[test]
    fn group_ops_batches_rows_by_shape_in_execution_order() {
        let spec = sample();
        let ops = vec![
            ("a".to_string(), RowOp::Delete),
            (
                "b".to_string(),
                RowOp::Update(c(&[("status", Some("PAID"))])),
            ),
            (
                "c".to_string(),
                RowOp::Update(c(&[("status", Some("SHIPPED"))])),
            ),
            ("d".to_string(), RowOp::Update(Columns::new())),
            ("e".to_string(), RowOp::Delete),
        ];
        let groups = group_ops(&spec, "orders", ops);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].0.sql, delete_sql(&spec, "orders"));
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
                    on_conflict: Conflict::Set(ins.clone()),
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
        let groups = group_ops(&spec, "orders", ops);
        assert_eq!(groups.len(), 2);
        assert_eq!(
            groups[0].0,
            upsert_sql(
                &spec,
                "orders",
                &["status", "total"],
                ConflictCols::Set(vec!["status".into(), "total".into()])
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
    fn upsert_patching_uninserted_columns_is_split_update_first() {
        let spec = sample();
        let ops = vec![(
            "a".to_string(),
            RowOp::Upsert {
                insert: c(&[("status", Some("PENDING"))]),
                on_conflict: Conflict::Set(c(&[("status", Some("PENDING")), ("total", Some("5"))])),
            },
        )];
        let groups = group_ops(&spec, "orders", ops);
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
                    let row: Columns = all
                        .iter()
                        .map(|c| (c.to_string(), Some(format!("old{k}"))))
                        .collect();
                    start.insert(format!("k{k}"), row);
                }
            }
            let mut expected = start.clone();
            for (key, op) in fold(changes.clone()) {
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
                    let null_row =
                        || -> Columns { all.iter().map(|c| (c.to_string(), None)).collect() };
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
