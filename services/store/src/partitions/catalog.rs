//! Reads what the planner needs from the Postgres catalog: whether the
//! table is range-partitioned and by which column, its partitions with
//! their bounds, and which intervals have rows waiting in its default
//! partition.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use eventplane_api::{PartitionPolicySpec, quote_ident};
use eventplane_plan::{Bound, Calendar, ExistingPartition, Observed};
use sqlx::{Acquire, PgConnection, Row};

use super::PartitionError;
use super::execute::archive_comment_prefix;

/// At most this many distinct days are read from the default partition per
/// run; a day missed here is caught when its partition's attach fails and
/// the step is retried as a move.
const DEFAULT_ROW_DAYS_LIMIT: i64 = 10_000;

/// A table by schema and name, as the catalog spells them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Relation {
    pub schema: String,
    pub name: String,
}

impl Relation {
    /// Quoted, schema-qualified: catalog names are not validated against
    /// the spec's identifier rules, so quoting is what keeps them inert.
    pub fn sql(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// Everything `apply` needs beyond the planner's `Observed`.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub observed: Observed,
    pub parent: Relation,
    /// Partitions by the names the planner sees.
    pub relations: HashMap<String, Relation>,
    pub default: Option<Relation>,
    /// Partitions left half-detached by an interrupted `DETACH CONCURRENTLY`,
    /// with the bounds they had.
    pub detach_pending: Vec<(Relation, Bound)>,
    /// The parent's insertable columns, in order, for moving rows.
    pub columns: Vec<String>,
    /// Tables in the archive schema marked as this parent's partitions.
    pub archived: Vec<ExistingPartition>,
}

/// What the catalog shows about the policy's table.
pub async fn observe(
    conn: &mut PgConnection,
    spec: &PartitionPolicySpec,
) -> Result<Observed, PartitionError> {
    Ok(snapshot(conn, spec).await?.observed)
}

pub(crate) async fn snapshot(
    conn: &mut PgConnection,
    spec: &PartitionPolicySpec,
) -> Result<Snapshot, PartitionError> {
    let calendar = Calendar::new(spec)?;
    let table = spec.quoted_table();
    let mut tx = conn.begin().await?;
    // Bounds are rendered in the session time zone; UTC makes them parse
    // the same everywhere.
    sqlx::query("SET LOCAL TimeZone = 'UTC'")
        .execute(&mut *tx)
        .await?;

    let row = sqlx::query(
        "SELECT n.nspname::text AS schema, c.relname::text AS name,
                c.relkind = 'p' AND pt.partstrat = 'r' AS range_partitioned,
                a.attname::text AS key_column,
                format_type(a.atttypid, a.atttypmod) AS key_type
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid
           LEFT JOIN pg_attribute a
                  ON a.attrelid = c.oid AND pt.partnatts = 1 AND a.attnum = pt.partattrs[0]
          WHERE c.oid = to_regclass($1)",
    )
    .bind(&table)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| PartitionError::MissingTable(spec.table.clone()))?;
    let parent = Relation {
        schema: row.try_get("schema")?,
        name: row.try_get("name")?,
    };
    let partitioned = row
        .try_get::<Option<bool>, _>("range_partitioned")?
        .unwrap_or(false);
    let key_column: Option<String> = row.try_get("key_column")?;
    let key_type: Option<String> = row.try_get("key_type")?;
    if let (Some(column), Some(found)) = (&key_column, key_type)
        && *column == spec.column
        && found != "timestamp with time zone"
    {
        return Err(PartitionError::KeyType {
            column: column.clone(),
            found,
        });
    }

    let rows = sqlx::query(
        "SELECT n.nspname::text AS schema, c.relname::text AS name,
                pg_get_expr(c.relpartbound, c.oid) AS bound,
                c.reltuples::int8 AS rows, i.inhdetachpending AS pending
           FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE i.inhparent = to_regclass($1)
          ORDER BY c.relname",
    )
    .bind(&table)
    .fetch_all(&mut *tx)
    .await?;

    let mut partitions = Vec::new();
    let mut relations = HashMap::new();
    let mut default = None;
    let mut detach_pending = Vec::new();
    for row in rows {
        let relation = Relation {
            schema: row.try_get("schema")?,
            name: row.try_get("name")?,
        };
        let bound = parse_bound(
            &row.try_get::<Option<String>, _>("bound")?
                .unwrap_or_default(),
        );
        if row.try_get::<bool, _>("pending")? {
            // Half-detached: no longer routes rows, finished by `apply`.
            detach_pending.push((relation, bound));
            continue;
        }
        // Partitions in the parent's schema go by their bare name, like the
        // names the planner makes; others keep their schema to stay unique.
        let name = if relation.schema == parent.schema {
            relation.name.clone()
        } else {
            format!("{}.{}", relation.schema, relation.name)
        };
        if bound == Bound::Default {
            default = Some(relation.clone());
        }
        relations.insert(name.clone(), relation);
        partitions.push(ExistingPartition {
            name,
            bound,
            row_estimate: row.try_get("rows")?,
        });
    }

    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_attribute
          WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped
            AND attgenerated = ''
          ORDER BY attnum",
    )
    .bind(&table)
    .fetch_all(&mut *tx)
    .await?;

    let default_rows = match (&default, key_column.as_deref()) {
        (Some(relation), Some(column)) if column == spec.column => {
            waiting_rows(&mut tx, relation, column, &calendar).await?
        }
        _ => Vec::new(),
    };
    let archived = match spec
        .retention
        .as_ref()
        .and_then(|r| r.archive_schema.as_deref())
    {
        Some(schema) => archived(&mut tx, &parent, schema).await?,
        None => Vec::new(),
    };
    tx.commit().await?;

    Ok(Snapshot {
        observed: Observed {
            partitioned,
            key_column,
            partitions,
            default_rows,
        },
        parent,
        relations,
        default,
        detach_pending,
        columns,
        archived,
    })
}

/// The plain tables in `schema` whose comment marks them as archived
/// partitions of `parent`, with the bounds the comment records.
async fn archived(
    conn: &mut PgConnection,
    parent: &Relation,
    schema: &str,
) -> Result<Vec<ExistingPartition>, PartitionError> {
    let prefix = archive_comment_prefix(parent);
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT c.relname::text, d.description, c.reltuples::int8
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
          WHERE n.nspname = $1 AND c.relkind = 'r' AND NOT c.relispartition
            AND starts_with(d.description, $2)
          ORDER BY c.relname",
    )
    .bind(schema)
    .bind(&prefix)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, comment, rows)| ExistingPartition {
            name: format!("{schema}.{name}"),
            bound: parse_archive_range(&comment[prefix.len()..]),
            row_estimate: rows,
        })
        .collect())
}

/// Reads the ` [from, to)` an archive comment ends with.
fn parse_archive_range(text: &str) -> Bound {
    let range = text
        .trim()
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|rest| rest.split_once(", "));
    let parse = |t: &str| {
        DateTime::parse_from_rfc3339(t)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    };
    match range.and_then(|(from, to)| Some((parse(from)?, parse(to)?))) {
        Some((from, to)) => Bound::Range { from, to },
        None => Bound::Other(text.trim().to_string()),
    }
}

/// Interval starts with rows in the default partition. Rows are grouped by
/// UTC day server-side (the policy's zone and interval are ours to apply);
/// a UTC day overlaps at most two local days, and the first and last row of
/// each day are both real rows, so mapping those two finds every interval
/// that has rows, and no interval that has none. Rows with no key or one
/// beyond any plausible calendar (`infinity`) stay in the default partition.
async fn waiting_rows(
    conn: &mut PgConnection,
    default: &Relation,
    column: &str,
    calendar: &Calendar,
) -> Result<Vec<DateTime<Utc>>, PartitionError> {
    let column = quote_ident(column);
    let sql = format!(
        "SELECT min({column}) AS first, max({column}) AS last FROM {}
          WHERE {column} >= '0001-01-01T00:00:00Z' AND {column} < '9999-01-01T00:00:00Z'
          GROUP BY date_trunc('day', {column} AT TIME ZONE 'UTC')
          LIMIT {DEFAULT_ROW_DAYS_LIMIT}",
        default.sql()
    );
    let days: Vec<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    let starts: BTreeSet<DateTime<Utc>> = days
        .into_iter()
        .flat_map(|(first, last)| [first, last])
        .map(|t| calendar.interval_start(t))
        .collect();
    Ok(starts.into_iter().collect())
}

/// Reads `pg_get_expr(relpartbound)` output rendered with TimeZone UTC.
pub(crate) fn parse_bound(expr: &str) -> Bound {
    if expr == "DEFAULT" {
        return Bound::Default;
    }
    let range = expr
        .strip_prefix("FOR VALUES FROM (")
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|rest| rest.split_once(") TO ("));
    let parsed = range.and_then(|(from, to)| Some((parse_value(from)?, parse_value(to)?)));
    match parsed {
        Some((from, to)) => Bound::Range { from, to },
        None => Bound::Other(expr.to_string()),
    }
}

fn parse_value(value: &str) -> Option<DateTime<Utc>> {
    match value {
        "MINVALUE" | "'-infinity'" => Some(DateTime::<Utc>::MIN_UTC),
        "MAXVALUE" | "'infinity'" => Some(DateTime::<Utc>::MAX_UTC),
        quoted => {
            let text = quoted.strip_prefix('\'')?.strip_suffix('\'')?;
            DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
                .ok()
                .map(|t| t.with_timezone(&Utc))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn partition_bounds_parse_into_utc_ranges() {
        let cases = [
            (
                "FOR VALUES FROM ('2026-01-01 00:00:00+00') TO ('2026-02-01 00:00:00+00')",
                Bound::Range {
                    from: t("2026-01-01T00:00:00Z"),
                    to: t("2026-02-01T00:00:00Z"),
                },
            ),
            (
                "FOR VALUES FROM ('2026-03-01 05:00:00.25+00') TO ('2026-04-01 04:00:00+00')",
                Bound::Range {
                    from: t("2026-03-01T05:00:00.25Z"),
                    to: t("2026-04-01T04:00:00Z"),
                },
            ),
            (
                "FOR VALUES FROM ('2025-12-31 19:00:00-05') TO ('2026-01-31 19:00:00-05:30')",
                Bound::Range {
                    from: t("2026-01-01T00:00:00Z"),
                    to: t("2026-02-01T00:30:00Z"),
                },
            ),
            (
                "FOR VALUES FROM (MINVALUE) TO ('2020-01-01 00:00:00+00')",
                Bound::Range {
                    from: DateTime::<Utc>::MIN_UTC,
                    to: t("2020-01-01T00:00:00Z"),
                },
            ),
            (
                "FOR VALUES FROM ('2020-01-01 00:00:00+00') TO ('infinity')",
                Bound::Range {
                    from: t("2020-01-01T00:00:00Z"),
                    to: DateTime::<Utc>::MAX_UTC,
                },
            ),
            ("DEFAULT", Bound::Default),
        ];
        for (expr, expected) in cases {
            assert_eq!(parse_bound(expr), expected, "{expr}");
        }
    }

    #[test]
    fn archive_comments_give_back_the_bounds_they_were_written_with() {
        let parent = Relation {
            schema: "public".into(),
            name: "t".into(),
        };
        let bound = Bound::Range {
            from: t("2026-01-01T00:00:00Z"),
            to: t("2026-02-01T00:00:00Z"),
        };
        let comment = super::super::execute::archive_comment(&parent, Some(&bound));
        assert_eq!(
            comment,
            "eventplane archive of public.t: [2026-01-01T00:00:00Z, 2026-02-01T00:00:00Z)"
        );
        let prefix = archive_comment_prefix(&parent);
        assert_eq!(parse_archive_range(&comment[prefix.len()..]), bound);
        assert_eq!(
            parse_archive_range(" edited by hand"),
            Bound::Other("edited by hand".into())
        );
    }

    #[test]
    fn bounds_that_are_not_one_timestamp_range_are_kept_verbatim() {
        for expr in [
            "FOR VALUES IN ('a', 'b')",
            "FOR VALUES FROM ('2026-01-01 00:00:00+00', 1) TO ('2026-02-01 00:00:00+00', 1)",
            "FOR VALUES FROM ('0044-03-15 00:00:00+00 BC') TO ('2026-02-01 00:00:00+00')",
            "FOR VALUES WITH (modulus 4, remainder 0)",
        ] {
            assert_eq!(parse_bound(expr), Bound::Other(expr.into()), "{expr}");
        }
    }
}
