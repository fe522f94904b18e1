//! Validation of projection names and specs. Errors carry the path of the
//! offending field (`spec.columns[2].name`) so users can find it in YAML.

use std::collections::BTreeSet;

use crate::condition::{parse_guard, parse_when};
use crate::error::SpecError;
use crate::predicate::render_predicate;
use crate::types::{ColumnOp, ColumnSpec, ColumnType, HandlerSpec, Op, ProjectionSpec, SortOrder};
use crate::value::literal_to_sql_text;

/// Largest page size a query may allow; bigger pages belong in an export,
/// not a request that the cache and the replica have to carry.
const MAX_LIMIT: u32 = 10_000;
/// An L1 entry is never invalidated across pods faster than its TTL when an
/// invalidation is lost, so it is kept to an hour at most.
const MAX_L1_TTL_MS: u64 = 3_600_000;
/// Most columns in a composite key; the CRD says the same.
const MAX_KEY_COLUMNS: usize = 8;
/// Names we create ourselves (bookkeeping tables) or Postgres reserves.
const RESERVED_PREFIXES: [&str; 2] = ["ep_", "pg_"];

/// Checks a projection name: `^[a-z][a-z0-9-]{0,47}$` (it appears in URLs).
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    if matches_pattern(
        name,
        |c| c.is_ascii_lowercase(),
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
        48,
    ) {
        Ok(())
    } else {
        Err(SpecError::invalid(
            "metadata.name",
            format!(
                "{name:?} is not a valid projection name: use 1 to 48 lowercase letters, digits and '-', starting with a letter"
            ),
        ))
    }
}

fn matches_pattern(
    s: &str,
    first: impl Fn(char) -> bool,
    rest: impl Fn(char) -> bool,
    max_len: usize,
) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if first(c) => {}
        _ => return false,
    }
    s.len() <= max_len && chars.all(rest)
}

fn check_ident(field: &str, s: &str) -> Result<(), SpecError> {
    let ok = matches_pattern(
        s,
        |c| c.is_ascii_lowercase() || c == '_',
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_',
        48,
    );
    if !ok {
        return Err(SpecError::invalid(
            field,
            format!(
                "{s:?} is not a valid identifier: use 1 to 48 lowercase letters, digits and '_', not starting with a digit"
            ),
        ));
    }
    if let Some(p) = RESERVED_PREFIXES.iter().find(|p| s.starts_with(**p)) {
        return Err(SpecError::invalid(
            field,
            format!("{s:?} uses the reserved prefix {p:?}"),
        ));
    }
    Ok(())
}

/// Whether operation `op` applies to a column of `col`'s type.
fn check_column_op(at: &str, op: ColumnOp, col: &ColumnSpec) -> Result<(), SpecError> {
    let fits = match op {
        ColumnOp::Set | ColumnOp::SetIfNull => true,
        ColumnOp::Add => matches!(
            col.ty,
            ColumnType::Bigint | ColumnType::Integer | ColumnType::Numeric | ColumnType::Double
        ),
        ColumnOp::Min | ColumnOp::Max => col.ty != ColumnType::Jsonb,
        ColumnOp::Append | ColumnOp::Merge => col.ty == ColumnType::Jsonb,
    };
    if fits {
        return Ok(());
    }
    let needs = match op {
        ColumnOp::Add => "a bigint, integer, numeric or double column",
        ColumnOp::Min | ColumnOp::Max => "a column of an ordered type (not jsonb)",
        _ => "a jsonb column",
    };
    Err(SpecError::invalid(
        format!("{at}.op"),
        format!(
            "{} needs {needs}; column {:?} is {}",
            serde_json::to_value(op)
                .unwrap_or_default()
                .as_str()
                .unwrap_or("op"),
            col.name,
            col.ty.name()
        ),
    ))
}

/// A constant `value` or `default` of an assignment.
fn check_constant(field: &str, op: ColumnOp, ty: ColumnType, text: &str) -> Result<(), SpecError> {
    let sql = literal_to_sql_text(ty, text).map_err(|e| SpecError::invalid(field, e))?;
    if op == ColumnOp::Merge && !sql.starts_with('{') {
        return Err(SpecError::invalid(field, "merge needs a JSON object"));
    }
    Ok(())
}

fn check_event_type(field: &str, s: &str) -> Result<(), SpecError> {
    let ok = matches_pattern(
        s,
        |c| c.is_ascii_alphabetic(),
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'),
        128,
    );
    if ok {
        Ok(())
    } else {
        Err(SpecError::invalid(
            field,
            format!(
                "{s:?} is not a valid event type: use 1 to 128 letters, digits, '_', '.', ':' and '-', starting with a letter"
            ),
        ))
    }
}

/// A JSON pointer (RFC 6901): empty, or `/`-separated tokens where `~`
/// appears only as `~0` or `~1`.
pub(crate) fn check_pointer(field: &str, p: &str) -> Result<(), SpecError> {
    let bad = |why: &str| {
        Err(SpecError::invalid(
            field,
            format!("{p:?} is not a valid JSON pointer: {why}"),
        ))
    };
    if p.is_empty() {
        return Ok(());
    }
    if !p.starts_with('/') {
        return bad("it must start with '/', for example /data/orderId");
    }
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return bad("'~' must be followed by 0 or 1");
        }
    }
    Ok(())
}

impl ProjectionSpec {
    /// Checks the whole spec; returns the first problem found.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_ident("spec.table", &self.table)?;
        if self.version < 1 {
            return Err(SpecError::invalid("spec.version", "must be at least 1"));
        }
        self.validate_columns()?;
        self.validate_handlers()?;
        self.validate_indexes()?;
        self.validate_queries()?;
        crate::transport::check(self)?;
        if self.cache.l1_ttl_ms > MAX_L1_TTL_MS {
            return Err(SpecError::invalid(
                "spec.cache.l1TtlMs",
                format!("must be at most {MAX_L1_TTL_MS} (one hour)"),
            ));
        }
        Ok(())
    }

    fn validate_columns(&self) -> Result<(), SpecError> {
        if self.columns.is_empty() {
            return Err(SpecError::invalid(
                "spec.columns",
                "declare at least one column",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, c) in self.columns.iter().enumerate() {
            let field = format!("spec.columns[{i}].name");
            check_ident(&field, &c.name)?;
            if !seen.insert(c.name.as_str()) {
                return Err(SpecError::invalid(
                    field,
                    format!("column {:?} is declared twice", c.name),
                ));
            }
        }
        self.validate_key()
    }

    /// `key` or `keys`: declared, distinct columns of types with one
    /// spelling per value.
    fn validate_key(&self) -> Result<(), SpecError> {
        let named: Vec<(String, &String)> = match (self.key.is_empty(), self.keys.is_empty()) {
            (false, true) => vec![("spec.key".to_string(), &self.key)],
            (true, false) if self.keys.len() >= 2 => self
                .keys
                .iter()
                .enumerate()
                .map(|(i, k)| (format!("spec.keys[{i}]"), k))
                .collect(),
            (true, false) => {
                return Err(SpecError::invalid(
                    "spec.keys",
                    "a composite key has at least two columns; for one, use `key`",
                ));
            }
            _ => {
                return Err(SpecError::invalid(
                    "spec",
                    "give exactly one of `key` (one column) and `keys` (a composite key)",
                ));
            }
        };
        if named.len() > MAX_KEY_COLUMNS {
            return Err(SpecError::invalid(
                "spec.keys",
                format!("a key has at most {MAX_KEY_COLUMNS} columns"),
            ));
        }
        let mut seen = BTreeSet::new();
        for (field, name) in named {
            let Some(key) = self.column(name) else {
                return Err(SpecError::invalid(
                    field,
                    format!("{name:?} is not a declared column"),
                ));
            };
            if !seen.insert(name.as_str()) {
                return Err(SpecError::invalid(
                    field,
                    format!("{name:?} is listed twice"),
                ));
            }
            // jsonb has no btree equality; floating and decimal keys have
            // several spellings of one value, which would defeat folding
            // changes by key.
            if matches!(
                key.ty,
                ColumnType::Jsonb | ColumnType::Double | ColumnType::Numeric
            ) {
                return Err(SpecError::invalid(
                    field,
                    format!(
                        "a key column cannot be of type {}; use text, bigint, integer, uuid, timestamptz or boolean",
                        key.ty.name()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A handler's `key` or `keys`: a pointer per key column.
    fn validate_handler_key(&self, at: &str, h: &HandlerSpec) -> Result<(), SpecError> {
        let names = self.key_names();
        match (h.key.is_empty(), h.keys.is_empty()) {
            (false, true) if names.len() == 1 => check_pointer(&format!("{at}.key"), &h.key),
            (false, true) => Err(SpecError::invalid(
                format!("{at}.key"),
                format!(
                    "the key has {} columns ({}): give `keys`, one entry per key column",
                    names.len(),
                    names.join(", ")
                ),
            )),
            (true, false) => {
                let mut seen = BTreeSet::new();
                for (j, k) in h.keys.iter().enumerate() {
                    let at = format!("{at}.keys[{j}]");
                    if !names.contains(&k.column) {
                        return Err(SpecError::invalid(
                            format!("{at}.column"),
                            format!(
                                "{:?} is not a key column; the key is ({})",
                                k.column,
                                names.join(", ")
                            ),
                        ));
                    }
                    if !seen.insert(k.column.as_str()) {
                        return Err(SpecError::invalid(
                            format!("{at}.column"),
                            format!("key column {:?} is given twice", k.column),
                        ));
                    }
                    match (&k.from, k.from_first.is_empty()) {
                        (Some(p), true) => check_pointer(&format!("{at}.from"), p)?,
                        (None, false) => {
                            for (i, p) in k.from_first.iter().enumerate() {
                                check_pointer(&format!("{at}.fromFirst[{i}]"), p)?;
                            }
                        }
                        _ => {
                            return Err(SpecError::invalid(
                                at,
                                "give exactly one of `from` and `fromFirst`",
                            ));
                        }
                    }
                }
                if let Some(missing) = names.iter().find(|n| !seen.contains(n.as_str())) {
                    return Err(SpecError::invalid(
                        format!("{at}.keys"),
                        format!("key column {missing:?} has no entry"),
                    ));
                }
                Ok(())
            }
            _ => Err(SpecError::invalid(
                at,
                "give exactly one of `key` and `keys`",
            )),
        }
    }

    fn validate_handlers(&self) -> Result<(), SpecError> {
        if self.handlers.is_empty() {
            return Err(SpecError::invalid(
                "spec.handlers",
                "declare at least one handler",
            ));
        }
        let mut types = BTreeSet::new();
        for (i, h) in self.handlers.iter().enumerate() {
            let at = format!("spec.handlers[{i}]");
            let listed = match (h.event_type.is_empty(), h.event_types.is_empty()) {
                (false, true) => vec![(format!("{at}.eventType"), &h.event_type)],
                (true, false) => h
                    .event_types
                    .iter()
                    .enumerate()
                    .map(|(j, t)| (format!("{at}.eventTypes[{j}]"), t))
                    .collect(),
                _ => {
                    return Err(SpecError::invalid(
                        at,
                        "give exactly one of `eventType` and `eventTypes`",
                    ));
                }
            };
            for (field, ty) in listed {
                check_event_type(&field, ty)?;
                if !types.insert(ty.as_str()) {
                    return Err(SpecError::invalid(
                        field,
                        format!("event type {ty:?} has more than one handler"),
                    ));
                }
            }
            self.validate_handler_key(&at, h)?;
            if let Some(when) = &h.when {
                parse_when(when).map_err(|e| SpecError::invalid(format!("{at}.when"), e))?;
            }
            if let Some(guard) = &h.guard {
                parse_guard(guard, &self.columns)
                    .map_err(|e| SpecError::invalid(format!("{at}.if"), e))?;
            }
            if h.op == Op::Delete && !h.set.is_empty() {
                return Err(SpecError::invalid(
                    format!("{at}.set"),
                    "a delete handler cannot set columns",
                ));
            }
            let mut assigned = BTreeSet::new();
            for (j, a) in h.set.iter().enumerate() {
                let at = format!("{at}.set[{j}]");
                let Some(col) = self.column(&a.column) else {
                    return Err(SpecError::invalid(
                        format!("{at}.column"),
                        format!("{:?} is not a declared column", a.column),
                    ));
                };
                if self.is_key(&col.name) {
                    return Err(SpecError::invalid(
                        format!("{at}.column"),
                        "a key column cannot be set; it comes from the handler's key",
                    ));
                }
                if !assigned.insert(a.column.as_str()) {
                    return Err(SpecError::invalid(
                        format!("{at}.column"),
                        format!("column {:?} is set twice", a.column),
                    ));
                }
                check_column_op(&at, a.op, col)?;
                let pointers =
                    usize::from(a.from.is_some()) + usize::from(!a.from_first.is_empty());
                match (pointers, &a.value) {
                    (1, None) => {
                        if let Some(p) = &a.from {
                            check_pointer(&format!("{at}.from"), p)?;
                        }
                        for (k, p) in a.from_first.iter().enumerate() {
                            check_pointer(&format!("{at}.fromFirst[{k}]"), p)?;
                        }
                    }
                    (0, Some(v)) => check_constant(&format!("{at}.value"), a.op, col.ty, v)?,
                    (0, None) if a.op == ColumnOp::Add => {}
                    _ => {
                        return Err(SpecError::invalid(
                            at,
                            "give exactly one of `from`, `fromFirst` and `value`",
                        ));
                    }
                }
                if let Some(d) = &a.default {
                    if pointers == 0 {
                        return Err(SpecError::invalid(
                            format!("{at}.default"),
                            "a default needs `from` or `fromFirst`",
                        ));
                    }
                    check_constant(&format!("{at}.default"), a.op, col.ty, d)?;
                }
            }
        }
        Ok(())
    }

    fn validate_indexes(&self) -> Result<(), SpecError> {
        let mut names = BTreeSet::new();
        for (i, ix) in self.indexes.iter().enumerate() {
            let at = format!("spec.indexes[{i}]");
            check_ident(&format!("{at}.name"), &ix.name)?;
            if !names.insert(ix.name.as_str()) {
                return Err(SpecError::invalid(
                    format!("{at}.name"),
                    format!("index {:?} is declared twice", ix.name),
                ));
            }
            if ix.columns.is_empty() {
                return Err(SpecError::invalid(
                    format!("{at}.columns"),
                    "an index needs at least one column",
                ));
            }
            for (j, c) in ix.columns.iter().enumerate() {
                self.declared(&format!("{at}.columns[{j}].name"), &c.name)?;
            }
            for (j, c) in ix.include.iter().enumerate() {
                self.declared(&format!("{at}.include[{j}]"), c)?;
            }
            if let Some(p) = &ix.predicate {
                render_predicate(p, &self.columns)
                    .map_err(|e| SpecError::invalid(format!("{at}.where"), e))?;
            }
        }
        Ok(())
    }

    fn validate_queries(&self) -> Result<(), SpecError> {
        let mut names = BTreeSet::new();
        for (i, q) in self.queries.iter().enumerate() {
            let at = format!("spec.queries[{i}]");
            let name_ok = matches_pattern(
                &q.name,
                |c| c.is_ascii_lowercase(),
                |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-',
                48,
            );
            if !name_ok {
                return Err(SpecError::invalid(
                    format!("{at}.name"),
                    format!(
                        "{:?} is not a valid query name: use 1 to 48 lowercase letters, digits, '_' and '-', starting with a letter",
                        q.name
                    ),
                ));
            }
            if !names.insert(q.name.as_str()) {
                return Err(SpecError::invalid(
                    format!("{at}.name"),
                    format!("query {:?} is declared twice", q.name),
                ));
            }
            let mut filters = BTreeSet::new();
            for (j, f) in q.filters.iter().enumerate() {
                let field = format!("{at}.filters[{j}]");
                let col = self.declared(&field, f)?;
                if col.ty == ColumnType::Jsonb {
                    return Err(SpecError::invalid(
                        field,
                        "jsonb columns cannot be used as filters",
                    ));
                }
                if !filters.insert(f.as_str()) {
                    return Err(SpecError::invalid(field, format!("{f:?} is listed twice")));
                }
            }
            let mut ordered = BTreeSet::new();
            for (j, o) in q.order_by.iter().enumerate() {
                let field = format!("{at}.orderBy[{j}].column");
                let col = self.declared(&field, &o.column)?;
                if col.nullable && !self.is_key(&col.name) {
                    return Err(SpecError::invalid(
                        field,
                        format!(
                            "column {:?} is nullable; paging by cursor needs non-nullable sort columns (set nullable: false)",
                            o.column
                        ),
                    ));
                }
                if col.ty == ColumnType::Jsonb {
                    return Err(SpecError::invalid(
                        field,
                        "jsonb columns cannot be used for sorting",
                    ));
                }
                if !ordered.insert(o.column.as_str()) {
                    return Err(SpecError::invalid(
                        field,
                        format!("{:?} is listed twice", o.column),
                    ));
                }
                if o.order != q.order_by[0].order {
                    return Err(SpecError::invalid(
                        format!("{at}.orderBy[{j}].order"),
                        "mixed directions are not supported: every orderBy entry must be asc, or every one desc",
                    ));
                }
            }
            if q.default_limit < 1 {
                return Err(SpecError::invalid(
                    format!("{at}.defaultLimit"),
                    "must be at least 1",
                ));
            }
            if q.default_limit > q.max_limit {
                return Err(SpecError::invalid(
                    format!("{at}.defaultLimit"),
                    format!("must not exceed maxLimit ({})", q.max_limit),
                ));
            }
            if q.max_limit > MAX_LIMIT {
                return Err(SpecError::invalid(
                    format!("{at}.maxLimit"),
                    format!("must be at most {MAX_LIMIT}"),
                ));
            }
        }
        Ok(())
    }

    fn declared(&self, field: &str, name: &str) -> Result<&crate::types::ColumnSpec, SpecError> {
        self.column(name)
            .ok_or_else(|| SpecError::invalid(field, format!("{name:?} is not a declared column")))
    }

    /// The direction shared by every orderBy entry of `query` (ascending
    /// when there is none).
    pub fn direction(query: &crate::types::QuerySpec) -> SortOrder {
        query.order_by.first().map(|o| o.order).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::examples::orders as sample;

    /// Applies `edit` to the sample and returns the error text.
    fn invalid(edit: impl FnOnce(&mut ProjectionSpec)) -> String {
        let mut spec = sample();
        edit(&mut spec);
        spec.validate()
            .expect_err("spec should be invalid")
            .to_string()
    }

    fn assert_field(err: String, field: &str) {
        assert!(
            err.starts_with(&format!("{field}: ")),
            "expected error on {field}, got {err}"
        );
    }

    #[test]
    fn sample_spec_is_valid() {
        sample().validate().unwrap();
    }

    #[test]
    fn projection_names_follow_url_rules() {
        assert!(validate_name("orders").is_ok());
        assert!(validate_name("orders-v2").is_ok());
        assert!(validate_name(&format!("a{}", "b".repeat(47))).is_ok());
        for bad in ["", "Orders", "1orders", "orders_x", "-a", &"a".repeat(49)] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.starts_with("metadata.name: "), "{e}");
        }
    }

    #[test]
    fn error_display_is_field_then_message() {
        let e = SpecError::invalid("spec.columns[2].name", "bad");
        assert_eq!(e.to_string(), "spec.columns[2].name: bad");
    }

    #[test]
    fn table_must_be_a_plain_identifier() {
        assert_field(invalid(|s| s.table = "Orders".into()), "spec.table");
        assert_field(invalid(|s| s.table = "ord\"ers".into()), "spec.table");
        assert_field(invalid(|s| s.table = "9a".into()), "spec.table");
        assert_field(invalid(|s| s.table = "a".repeat(49)), "spec.table");
        let e = invalid(|s| s.table = "pg_orders".into());
        assert_field(e.clone(), "spec.table");
        assert!(e.contains("reserved"));
        assert_field(invalid(|s| s.table = "ep_orders".into()), "spec.table");
        let mut s = sample();
        s.table = "_orders_2".into();
        s.validate().unwrap();
    }

    #[test]
    fn version_zero_is_rejected() {
        assert_field(invalid(|s| s.version = 0), "spec.version");
    }

    #[test]
    fn column_rules() {
        assert_field(invalid(|s| s.columns.clear()), "spec.columns");
        assert_field(
            invalid(|s| s.columns[2].name = "Customer".into()),
            "spec.columns[2].name",
        );
        let e = invalid(|s| s.columns[3].name = "status".into());
        assert_field(e.clone(), "spec.columns[3].name");
        assert!(e.contains("twice"));
    }

    #[test]
    fn key_must_be_a_declared_non_json_non_float_column() {
        assert_field(invalid(|s| s.key = "nope".into()), "spec.key");
        for ty in [ColumnType::Jsonb, ColumnType::Double, ColumnType::Numeric] {
            assert_field(invalid(|s| s.columns[0].ty = ty), "spec.key");
        }
    }

    /// The sample keyed by (customer_id, id), each handler giving both.
    fn composite(spec: &mut ProjectionSpec) {
        spec.keys = vec!["customer_id".into(), "id".into()];
        spec.key.clear();
        spec.handlers[0].set.retain(|a| a.column != "customer_id");
        for h in &mut spec.handlers {
            h.key.clear();
            h.keys = vec![
                crate::KeySource {
                    column: "customer_id".into(),
                    from: Some("/data/customerId".into()),
                    from_first: vec![],
                },
                crate::KeySource {
                    column: "id".into(),
                    from: None,
                    from_first: vec!["/data/orderId".into(), "/data/order_id".into()],
                },
            ];
        }
    }

    #[test]
    fn composite_keys_are_declared_columns_each_given_by_every_handler() {
        let mut ok = sample();
        composite(&mut ok);
        ok.validate().unwrap();
        assert_eq!(ok.key_names(), ["customer_id", "id"]);

        assert_field(
            invalid(|s| {
                composite(s);
                s.keys[1] = "nope".into();
            }),
            "spec.keys[1]",
        );
        assert_field(
            invalid(|s| {
                composite(s);
                s.keys[1] = "customer_id".into();
            }),
            "spec.keys[1]",
        );
        let e = invalid(|s| {
            composite(s);
            s.keys[0] = "total".into();
        });
        assert_field(e.clone(), "spec.keys[0]");
        assert!(e.contains("numeric"), "{e}");
        assert_field(
            invalid(|s| {
                composite(s);
                s.keys.truncate(1);
            }),
            "spec.keys",
        );
        assert_field(
            invalid(|s| {
                composite(s);
                s.key = "id".into();
            }),
            "spec",
        );
        // A handler names each key column once, with one source.
        let e = invalid(|s| {
            composite(s);
            s.handlers[2].keys.clear();
            s.handlers[2].key = "/data/orderId".into();
        });
        assert_field(e.clone(), "spec.handlers[2].key");
        assert!(e.contains("customer_id, id"), "{e}");
        assert_field(
            invalid(|s| {
                composite(s);
                s.handlers[1].keys.pop();
            }),
            "spec.handlers[1].keys",
        );
        assert_field(
            invalid(|s| {
                composite(s);
                s.handlers[1].keys[1].column = "status".into();
            }),
            "spec.handlers[1].keys[1].column",
        );
        assert_field(
            invalid(|s| {
                composite(s);
                s.handlers[1].keys[1].column = "customer_id".into();
            }),
            "spec.handlers[1].keys[1].column",
        );
        assert_field(
            invalid(|s| {
                composite(s);
                s.handlers[0].keys[0].from_first = vec!["/x".into()];
            }),
            "spec.handlers[0].keys[0]",
        );
        assert_field(
            invalid(|s| {
                composite(s);
                s.handlers[0].keys[1].from_first[1] = "nope".into();
            }),
            "spec.handlers[0].keys[1].fromFirst[1]",
        );
        // Key columns are not set by assignments.
        assert_field(
            invalid(|s| {
                composite(s);
                s.handlers[0].set[1].column = "customer_id".into();
            }),
            "spec.handlers[0].set[1].column",
        );
    }

    #[test]
    fn a_one_column_key_may_come_from_several_pointers() {
        let mut spec = sample();
        spec.handlers[0].key.clear();
        spec.handlers[0].keys = vec![crate::KeySource {
            column: "id".into(),
            from: None,
            from_first: vec!["/data/orderId".into(), "/data/order_id".into()],
        }];
        spec.validate().unwrap();
    }

    #[test]
    fn handler_rules() {
        assert_field(invalid(|s| s.handlers.clear()), "spec.handlers");
        assert_field(
            invalid(|s| s.handlers[1].event_type = "1Paid".into()),
            "spec.handlers[1].eventType",
        );
        assert_field(
            invalid(|s| s.handlers[1].event_type = "Order Paid".into()),
            "spec.handlers[1].eventType",
        );
        let mut ok = sample();
        ok.handlers[1].event_type = "orders.v1:Order-Paid_x".into();
        ok.validate().unwrap();
        let e = invalid(|s| s.handlers[2].event_type = "OrderPaid".into());
        assert_field(e.clone(), "spec.handlers[2].eventType");
        assert!(e.contains("more than one handler"));
        assert_field(
            invalid(|s| s.handlers[0].key = "data/orderId".into()),
            "spec.handlers[0].key",
        );
        assert_field(
            invalid(|s| s.handlers[0].key = "/data/a~2b".into()),
            "spec.handlers[0].key",
        );
        assert_field(
            invalid(|s| s.handlers[0].key = "/data/a~".into()),
            "spec.handlers[0].key",
        );
        let mut ok = sample();
        ok.handlers[0].key = "/data/a~0b~1c".into();
        ok.validate().unwrap();
    }

    #[test]
    fn delete_handlers_cannot_set_columns() {
        let e = invalid(|s| {
            let set = s.handlers[1].set.clone();
            s.handlers[3].set = set;
        });
        assert_field(e, "spec.handlers[3].set");
    }

    #[test]
    fn assignment_rules() {
        assert_field(
            invalid(|s| s.handlers[0].set[1].column = "nope".into()),
            "spec.handlers[0].set[1].column",
        );
        let e = invalid(|s| s.handlers[0].set[1].column = "id".into());
        assert_field(e.clone(), "spec.handlers[0].set[1].column");
        assert!(e.contains("key"));
        assert_field(
            invalid(|s| s.handlers[0].set[2].column = "customer_id".into()),
            "spec.handlers[0].set[2].column",
        );
        assert_field(
            invalid(|s| s.handlers[0].set[1].value = Some("x".into())),
            "spec.handlers[0].set[1]",
        );
        assert_field(
            invalid(|s| s.handlers[0].set[1].from = None),
            "spec.handlers[0].set[1]",
        );
        assert_field(
            invalid(|s| s.handlers[0].set[1].from = Some("data".into())),
            "spec.handlers[0].set[1].from",
        );
        let e = invalid(|s| {
            s.handlers[0].set[2].from = None;
            s.handlers[0].set[2].value = Some("lots".into());
        });
        assert_field(e.clone(), "spec.handlers[0].set[2].value");
        assert!(e.contains("expected numeric"), "{e}");
    }

    #[test]
    fn index_rules() {
        assert_field(
            invalid(|s| s.indexes[1].name = "Cover".into()),
            "spec.indexes[1].name",
        );
        assert_field(
            invalid(|s| s.indexes[2].name = "covering".into()),
            "spec.indexes[2].name",
        );
        assert_field(
            invalid(|s| s.indexes[0].columns.clear()),
            "spec.indexes[0].columns",
        );
        assert_field(
            invalid(|s| s.indexes[0].columns[1].name = "nope".into()),
            "spec.indexes[0].columns[1].name",
        );
        assert_field(
            invalid(|s| s.indexes[1].include[1] = "nope".into()),
            "spec.indexes[1].include[1]",
        );
        let e = invalid(|s| s.indexes[2].predicate = Some("pg_sleep(1) IS NULL".into()));
        assert_field(e.clone(), "spec.indexes[2].where");
        assert!(e.contains("pg_sleep"));
    }

    #[test]
    fn query_rules() {
        assert_field(
            invalid(|s| s.queries[0].name = "By customer".into()),
            "spec.queries[0].name",
        );
        assert_field(
            invalid(|s| s.queries[1].name = "by_customer".into()),
            "spec.queries[1].name",
        );
        assert_field(
            invalid(|s| s.queries[0].filters[0] = "nope".into()),
            "spec.queries[0].filters[0]",
        );
        assert_field(
            invalid(|s| s.queries[0].filters.push("customer_id".into())),
            "spec.queries[0].filters[1]",
        );
        assert_field(
            invalid(|s| s.queries[0].order_by[0].column = "nope".into()),
            "spec.queries[0].orderBy[0].column",
        );
        let e = invalid(|s| s.queries[0].order_by[0].column = "total".into());
        assert_field(e.clone(), "spec.queries[0].orderBy[0].column");
        assert!(e.contains("non-nullable"), "{e}");
        let e = invalid(|s| {
            s.queries[0].order_by.push(crate::types::OrderBy {
                column: "status".into(),
                order: SortOrder::Asc,
            })
        });
        assert_field(e.clone(), "spec.queries[0].orderBy[1].order");
        assert!(e.contains("mixed directions are not supported"));
        assert_field(
            invalid(|s| s.queries[0].default_limit = 0),
            "spec.queries[0].defaultLimit",
        );
        assert_field(
            invalid(|s| s.queries[1].default_limit = 201),
            "spec.queries[1].defaultLimit",
        );
        assert_field(
            invalid(|s| s.queries[1].max_limit = 10_001),
            "spec.queries[1].maxLimit",
        );
        let mut ok = sample();
        ok.queries[1].max_limit = 10_000;
        ok.queries[1].default_limit = 10_000;
        ok.validate().unwrap();
    }

    #[test]
    fn nullable_key_column_may_still_be_used_for_ordering() {
        let mut s = sample();
        s.columns[0].nullable = true;
        s.queries[0].order_by[0].column = "id".into();
        s.validate().unwrap();
    }

    fn assignment(column: &str, op: ColumnOp, from: Option<&str>) -> crate::types::Assignment {
        crate::types::Assignment {
            column: column.into(),
            op,
            from: from.map(str::to_string),
            from_first: Vec::new(),
            default: None,
            value: None,
        }
    }

    #[test]
    fn column_operations_must_fit_the_column_type() {
        let e = invalid(|s| {
            s.handlers[0].set[0] = assignment("status", ColumnOp::Add, Some("/data/x"))
        });
        assert_field(e.clone(), "spec.handlers[0].set[0].op");
        assert!(
            e.contains("add needs a bigint, integer, numeric or double column"),
            "{e}"
        );
        assert!(e.contains("\"status\" is text"), "{e}");
        let e = invalid(|s| {
            s.handlers[0].set[0] = assignment("total", ColumnOp::Append, Some("/data/x"))
        });
        assert_field(e, "spec.handlers[0].set[0].op");
        let mut ok = sample();
        ok.handlers[1].set[0] = assignment("total", ColumnOp::Add, None);
        ok.validate().unwrap();
        ok.handlers[1].set[1] = assignment("updated_at", ColumnOp::Max, Some("/recordedAt"));
        ok.validate().unwrap();
        let e = invalid(|s| s.handlers[0].set[0] = assignment("status", ColumnOp::Set, None));
        assert_field(e, "spec.handlers[0].set[0]");
        let e = invalid(|s| {
            let mut a = assignment("total", ColumnOp::Add, None);
            a.value = Some("ten".into());
            s.handlers[0].set[0] = a;
        });
        assert_field(e, "spec.handlers[0].set[0].value");
    }

    #[test]
    fn sources_and_defaults_are_checked() {
        let e = invalid(|s| {
            let mut a = assignment("total", ColumnOp::Set, Some("/data/total"));
            a.from_first = vec!["/data/amount".into()];
            s.handlers[0].set[2] = a;
        });
        assert_field(e.clone(), "spec.handlers[0].set[2]");
        assert!(
            e.contains("exactly one of `from`, `fromFirst` and `value`"),
            "{e}"
        );
        let e = invalid(|s| {
            let mut a = assignment("total", ColumnOp::Set, None);
            a.from_first = vec!["/data/total".into(), "data/amount".into()];
            s.handlers[0].set[2] = a;
        });
        assert_field(e, "spec.handlers[0].set[2].fromFirst[1]");
        let e = invalid(|s| {
            let mut a = assignment("total", ColumnOp::Set, Some("/data/total"));
            a.default = Some("lots".into());
            s.handlers[0].set[2] = a;
        });
        assert_field(e, "spec.handlers[0].set[2].default");
        let e = invalid(|s| {
            let mut a = assignment("total", ColumnOp::Add, None);
            a.default = Some("1".into());
            s.handlers[0].set[2] = a;
        });
        assert_field(e, "spec.handlers[0].set[2].default");
    }

    #[test]
    fn handlers_may_list_several_event_types_once() {
        let mut ok = sample();
        ok.handlers[0].event_type = String::new();
        ok.handlers[0].event_types = vec!["OrderCreated".into(), "OrderPlaced".into()];
        ok.validate().unwrap();
        assert_eq!(ok.handler_index("OrderCreated"), Some(0));
        let e = invalid(|s| s.handlers[0].event_types = vec!["OrderCreated".into()]);
        assert_field(e, "spec.handlers[0]");
        let e = invalid(|s| {
            s.handlers[0].event_type = String::new();
            s.handlers[0].event_types = vec!["OrderCreated".into(), "OrderPaid".into()];
        });
        assert_field(e, "spec.handlers[1].eventType");
        let e = invalid(|s| {
            s.handlers[0].event_type = String::new();
            s.handlers[0].event_types = vec!["Order Created".into()];
        });
        assert_field(e, "spec.handlers[0].eventTypes[0]");
    }

    #[test]
    fn conditions_are_parsed_and_checked_against_the_columns() {
        let mut ok = sample();
        ok.handlers[0].when = Some("data.total > 100 AND data.currency IN ('EUR')".into());
        ok.handlers[1].guard = Some("status = 'PENDING' AND total <= data.amount".into());
        ok.validate().unwrap();
        for (bad, needle) in [
            ("status = 'PENDING'; DROP TABLE orders", ";"),
            ("status = 'x' -- comment", "comment"),
            ("pg_sleep(1) IS NULL", "pg_sleep"),
            ("nope = 'x'", "unknown column \"nope\""),
            ("status = (SELECT 'x')", "subquer"),
            ("total > 'many'", "not a numeric value"),
        ] {
            let e = invalid(|s| s.handlers[1].guard = Some(bad.into()));
            assert_field(e.clone(), "spec.handlers[1].if");
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let e = invalid(|s| s.handlers[0].when = Some("status = 'PENDING'".into()));
        assert_field(e.clone(), "spec.handlers[0].when");
        assert!(e.contains("reads the event only"), "{e}");
    }

    #[test]
    fn cache_ttl_is_bounded() {
        assert_field(
            invalid(|s| s.cache.l1_ttl_ms = 3_600_001),
            "spec.cache.l1TtlMs",
        );
    }
}
