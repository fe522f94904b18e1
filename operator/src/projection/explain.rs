//! Checks each declared list query of a projection with `EXPLAIN` against
//! its stable name, so a query that would read the whole table shows in the
//! status before it is slow in production.

use eventplane_api::ProjectionSpec;
use eventplane_api::resource::QueryCheck;
use eventplane_plan::list_sql;
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};

/// The page size the plans are made for: the usual default of a list query.
const EXPLAIN_LIMIT: i64 = 50;

/// Plans every declared list query. The queries run with parameters, so
/// they are planned as the query service runs them: prepared, with a
/// generic plan (a custom plan for NULL filters would say nothing).
pub async fn check_queries(
    pool: &PgPool,
    spec: &ProjectionSpec,
    stable: &str,
    table: &str,
) -> sqlx::Result<Vec<QueryCheck>> {
    let mut checks = Vec::with_capacity(spec.queries.len());
    for query in &spec.queries {
        let list = list_sql(spec, query, stable, false);
        let mut params: Vec<String> = vec!["NULL".to_string(); list.filter_columns.len()];
        params.push(EXPLAIN_LIMIT.to_string());
        // One transaction on one connection: the prepared statement and the
        // plan cache setting belong to the session, and end with it here.
        let mut tx = pool.begin().await?;
        sqlx::raw_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(AssertSqlSafe(format!("PREPARE ep_q AS {}", list.sql)))
            .execute(&mut *tx)
            .await?;
        let plan: Value = sqlx::query_scalar(AssertSqlSafe(format!(
            "EXPLAIN (FORMAT JSON) EXECUTE ep_q({})",
            params.join(", ")
        )))
        .fetch_one(&mut *tx)
        .await?;
        sqlx::raw_sql("DEALLOCATE ep_q").execute(&mut *tx).await?;
        tx.rollback().await?;
        checks.push(summarize(&query.name, &plan, table));
    }
    Ok(checks)
}

/// The check of one `EXPLAIN (FORMAT JSON)` output: the top node's cost,
/// the path from the top node down to the first scan, and whether any node
/// reads `table` sequentially.
pub fn summarize(name: &str, explain: &Value, table: &str) -> QueryCheck {
    let root = explain
        .get(0)
        .and_then(|e| e.get("Plan"))
        .unwrap_or(&Value::Null);
    QueryCheck {
        name: name.to_string(),
        full_scan: scans_sequentially(root, table),
        cost: root
            .get("Total Cost")
            .and_then(Value::as_f64)
            .unwrap_or_default(),
        plan: describe(root),
    }
}

fn children(node: &Value) -> impl Iterator<Item = &Value> {
    node.get("Plans")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn scans_sequentially(node: &Value, table: &str) -> bool {
    let here = node.get("Node Type").and_then(Value::as_str) == Some("Seq Scan")
        && node.get("Relation Name").and_then(Value::as_str) == Some(table);
    here || children(node).any(|child| scans_sequentially(child, table))
}

/// e.g. `Sort > Limit > Index Scan using orders_v1_by_customer on orders_v1`.
fn describe(root: &Value) -> String {
    let mut steps = Vec::new();
    let mut node = Some(root);
    while let Some(current) = node {
        let Some(kind) = current.get("Node Type").and_then(Value::as_str) else {
            break;
        };
        let mut step = kind.to_string();
        if let Some(index) = current.get("Index Name").and_then(Value::as_str) {
            step.push_str(&format!(" using {index}"));
        }
        if let Some(relation) = current.get("Relation Name").and_then(Value::as_str) {
            step.push_str(&format!(" on {relation}"));
            steps.push(step);
            break;
        }
        steps.push(step);
        node = children(current).next();
    }
    steps.join(" > ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(scan: Value) -> Value {
        json!([{"Plan": {
            "Node Type": "Sort", "Total Cost": 12.5,
            "Plans": [{"Node Type": "Limit", "Plans": [scan]}]
        }}])
    }

    #[test]
    fn an_index_scan_is_not_a_full_scan() {
        let check = summarize(
            "by_customer",
            &plan(
                json!({"Node Type": "Index Scan", "Index Name": "orders_v1_by_customer", "Relation Name": "orders_v1"}),
            ),
            "orders_v1",
        );
        assert_eq!(
            check,
            QueryCheck {
                name: "by_customer".into(),
                full_scan: false,
                cost: 12.5,
                plan: "Sort > Limit > Index Scan using orders_v1_by_customer on orders_v1".into(),
            }
        );
    }

    #[test]
    fn a_seq_scan_anywhere_on_the_table_is_a_full_scan() {
        let nested = plan(json!({"Node Type": "Sort", "Plans": [
            {"Node Type": "Seq Scan", "Relation Name": "orders_v1"}]}));
        let check = summarize("recent", &nested, "orders_v1");
        assert!(check.full_scan);
        assert_eq!(check.plan, "Sort > Limit > Sort > Seq Scan on orders_v1");
        // Another table's sequential scan is not this projection's problem.
        assert!(!summarize("recent", &nested, "customers_v1").full_scan);
    }

    #[test]
    fn garbage_gives_an_empty_check() {
        let check = summarize("q", &json!({}), "t");
        assert_eq!(
            (check.full_scan, check.cost, check.plan.as_str()),
            (false, 0.0, "")
        );
    }
}
