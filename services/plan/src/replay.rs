//! A rebuild's replay as one set-based query, for specs whose mapping
//! Postgres can do itself: keys and values read by JSON pointer or taken
//! from literals, plain `set` assignments, no `when` or `if`. The statement
//! orders each key's events as the projector does (by `(tx_id, position)`),
//! keeps the events after the key's last delete from its first upsert on,
//! and takes each column from the last of them that sets it — what the
//! projector's fold computes, batch after batch, from an empty table.
//!
//! Every value conversion is the one [`eventplane_api::value::to_sql_text`]
//! makes, restricted to the inputs where Postgres provably reads the same
//! value (integral numbers, shortest decimals, RFC 3339 timestamps with at
//! most microseconds, canonical UUIDs, …). An event outside them, or one
//! the projector would dead-letter, makes the query fail with SQLSTATE
//! [`UNSURE_SQLSTATE`]; the rebuild then empties the table and replays
//! through the projector's batches, which handle it exactly.

use eventplane_api::value::literal_to_sql_text;
use eventplane_api::{
    Assignment, ColumnOp, ColumnSpec, ColumnType, HandlerSpec, Op, ProjectionSpec, quote_ident,
};

/// The SQLSTATE `eventplane_replay_unsure` (migration 0009) raises.
pub const UNSURE_SQLSTATE: &str = "EPR01";

/// A compiled replay: a read-only query whose rows are the table's final
/// rows, every value as its SQL text (NULL for null): the key columns in
/// key order, then [`ReplaySql::columns`]. Bind, in order: the spec's event
/// types (`text[]`), the checkpoint's `tx_id` (as text) and position, the
/// horizon (as text), then [`ReplaySql::params`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySql {
    pub sql: String,
    pub params: Vec<ReplayParam>,
    /// The columns after the key columns, in the spec's order.
    pub columns: Vec<String>,
}

/// A value the statement binds after the four fixed parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayParam {
    /// A handler's event types.
    Types(Vec<String>),
    /// A JSON pointer's path below `data` or `metadata`.
    Path(Vec<String>),
    /// A literal's SQL text, cast in the statement.
    Text(String),
}

/// Why a spec's replay needs the batch path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotSetBased(pub String);

/// A decimal as `is_decimal` in the API crate reads one.
const DECIMAL: &str = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$";
/// What `chrono`'s RFC 3339 parser and Postgres read alike: a valid time of
/// day (no leap second, no 24:00), at most microseconds.
const RFC3339: &str = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$";
const UUID: &str = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// Where a pointer reads from in the events table.
enum Source {
    /// A read of `data` or `metadata` (see [`Compiler::read`]).
    Json(usize),
    /// A column of the event row, with the column types it can fill as the
    /// projector would.
    Field(&'static str, &'static [ColumnType]),
}

struct Read {
    document: &'static str,
    path: Vec<String>,
    sql: String,
}

struct Compiler<'a> {
    spec: &'a ProjectionSpec,
    params: Vec<ReplayParam>,
    /// Each distinct pointer into `data` or `metadata`, read once per event.
    reads: Vec<Read>,
}

/// One column's value and whether the event is outside what the statement
/// maps exactly, as SQL expressions over the `src` row.
struct Mapped {
    value: String,
    bad: String,
}

pub fn replay_sql(spec: &ProjectionSpec, table: &str) -> Result<ReplaySql, NotSetBased> {
    let mut c = Compiler {
        spec,
        params: Vec::new(),
        reads: Vec::new(),
    };
    c.compile(table)
}

fn not(reason: impl Into<String>) -> NotSetBased {
    NotSetBased(reason.into())
}

impl Compiler<'_> {
    /// `$n` for a new parameter.
    fn bind(&mut self, param: ReplayParam) -> String {
        self.params.push(param);
        format!("${}", self.params.len() + 4)
    }

    fn compile(&mut self, table: &str) -> Result<ReplaySql, NotSetBased> {
        let spec = self.spec;
        let keys: Vec<_> = spec.key_columns().collect();
        for h in &spec.handlers {
            if h.when.is_some() || h.guard.is_some() {
                return Err(not("a handler has a when or if condition"));
            }
            if let Some(a) = h.set.iter().find(|a| a.op != ColumnOp::Set) {
                return Err(not(format!("column {} is not a plain set", a.column)));
            }
        }
        for k in &keys {
            if !matches!(
                k.ty,
                ColumnType::Text
                    | ColumnType::Bigint
                    | ColumnType::Integer
                    | ColumnType::Uuid
                    | ColumnType::Boolean
                    | ColumnType::Timestamptz
            ) {
                // Two spellings of one numeric (or double, or jsonb) value
                // are two keys to the projector but one to the table.
                return Err(not(format!("key column {} is {}", k.name, k.ty.name())));
            }
        }

        let mut handler_case = String::from("CASE");
        for (h, handler) in spec.handlers.iter().enumerate() {
            let types = self.bind(ReplayParam::Types(
                handler.types().map(str::to_string).collect(),
            ));
            handler_case.push_str(&format!(
                " WHEN e.event_type = ANY({types}::text[]) THEN {h}"
            ));
        }
        handler_case.push_str(" END");

        // Per handler: its key values, its assignments and what rejects it.
        let mut key_values: Vec<Vec<String>> = vec![Vec::new(); keys.len()];
        let mut handler_bad = Vec::new();
        let mut values: Vec<Vec<(usize, String)>> = vec![Vec::new(); spec.columns.len()];
        for (h, handler) in spec.handlers.iter().enumerate() {
            let mut bad = Vec::new();
            for (i, col) in keys.iter().enumerate() {
                let pointer = key_pointer(handler, col)?;
                let mapped = self.key(col, pointer)?;
                key_values[i].push(format!("WHEN {h} THEN {}", mapped.value));
                bad.push(mapped.bad);
            }
            for a in &handler.set {
                let (index, col) = spec
                    .columns
                    .iter()
                    .enumerate()
                    .find(|(_, c)| c.name == a.column)
                    .ok_or_else(|| not(format!("unknown column {}", a.column)))?;
                let mapped = self.assignment(a, col)?;
                values[index].push((h, mapped.value));
                bad.push(mapped.bad);
            }
            handler_bad.push(format!("WHEN {h} THEN {}", or_all(&bad)));
        }

        let key_aliases: Vec<String> = (0..keys.len()).map(|i| format!("k{i}")).collect();
        let key_list = key_aliases.join(", ");
        let mut m_cols = Vec::new();
        for (i, whens) in key_values.iter().enumerate() {
            m_cols.push(format!("CASE hx {} END AS k{i}", whens.join(" ")));
        }
        let ops: Vec<String> = spec
            .handlers
            .iter()
            .enumerate()
            .map(|(h, handler)| {
                let op = match handler.op {
                    Op::Upsert => "u",
                    Op::Update => "p",
                    Op::Delete => "d",
                };
                format!("WHEN {h} THEN '{op}'")
            })
            .collect();
        m_cols.push(format!("CASE hx {} END AS op", ops.join(" ")));
        m_cols.push(format!(
            "coalesce(CASE hx {} END, true) AS bad",
            handler_bad.join(" ")
        ));
        let mut row = Vec::new();
        let mut g_cols = Vec::new();
        let mut out_cols: Vec<String> = (0..keys.len()).map(|i| format!("k{i}::text")).collect();
        let mut columns = Vec::new();
        for (index, col) in spec.columns.iter().enumerate() {
            if keys.iter().any(|k| k.name == col.name) {
                // The output takes the key from the group.
                row.push(format!("NULL::{}", col.ty.sql()));
                continue;
            }
            columns.push(col.name.clone());
            let setters = &values[index];
            if setters.is_empty() {
                row.push(format!("NULL::{}", col.ty.sql()));
                out_cols.push("NULL::text".into());
                continue;
            }
            let handlers: Vec<String> = setters.iter().map(|(h, _)| h.to_string()).collect();
            m_cols.push(format!("hx IN ({}) AS s{index}", handlers.join(", ")));
            let whens: Vec<String> = setters
                .iter()
                .map(|(h, v)| format!("WHEN {h} THEN {v}"))
                .collect();
            row.push(format!("CASE hx {} END", whens.join(" ")));
            g_cols.push(format!("max(seq) FILTER (WHERE s{index}) AS p{index}"));
            out_cols.push(format!(
                "(CASE WHEN p{index} >= st THEN (vs[p{index}]).{} END)::text",
                quote_ident(&col.name)
            ));
        }
        // The table's row type carries each event's values through the
        // aggregate in one array.
        m_cols.push(format!(
            "ROW({})::{} AS v",
            row.join(", "),
            quote_ident(table)
        ));

        // `OFFSET 0` keeps `src`, `x` and `m` from being merged into the
        // queries above them, which would evaluate each pointer read and
        // each mapped value once per use instead of once per event.
        // The aggregates take each key's rows in the order the window sorted
        // them (no hash aggregate, no parallel workers: the caller turns
        // both off), so `seq` indexes `ops` and `vs`. An aggregate ORDER BY
        // would say so too, but sorts every group again.
        let sql = format!(
            "WITH src AS (\
               SELECT e.tx_id, e.position, e.event_type, e.stream_id, e.stream_version, e.recorded_at\
                 {reads}, {handler_case} AS hx FROM events e \
               WHERE e.event_type = ANY($1::text[]) \
                 AND (e.tx_id, e.position) > ($2::text::xid8, $3::bigint) AND e.tx_id < $4::text::xid8 \
               OFFSET 0\
             ), x AS (\
               SELECT src.*{texts} FROM src OFFSET 0\
             ), m AS (\
               SELECT tx_id, position, {m_cols} FROM x OFFSET 0\
             ), r AS (\
               SELECT m.*, row_number() OVER (PARTITION BY {key_list} ORDER BY tx_id, position) AS seq FROM m\
             ), g AS (\
               SELECT {key_list}, count(*) FILTER (WHERE bad) AS nbad, array_agg(op) AS ops, array_agg(v) AS vs, \
                 coalesce(max(seq) FILTER (WHERE op = 'd'), 0) AS ld{g_cols} \
               FROM r GROUP BY {key_list}\
             ), f AS (\
               SELECT g.*, array_position(ops, 'u', (ld + 1)::int) AS st FROM g\
             ) \
             SELECT {out_cols} FROM f \
             WHERE CASE WHEN nbad > 0 THEN eventplane_replay_unsure(nbad) ELSE st IS NOT NULL END",
            reads = self
                .reads
                .iter()
                .enumerate()
                .map(|(n, r)| format!(", {} AS j{n}", r.sql))
                .collect::<String>(),
            texts = (0..self.reads.len())
                .map(|n| format!(", (j{n} #>> '{{}}') AS t{n}, jsonb_typeof(j{n}) AS y{n}"))
                .collect::<String>(),
            m_cols = m_cols.join(", "),
            g_cols = g_cols.iter().map(|c| format!(", {c}")).collect::<String>(),
            out_cols = out_cols.join(", "),
        );
        Ok(ReplaySql {
            sql,
            params: std::mem::take(&mut self.params),
            columns,
        })
    }

    /// The read of `path` below `document`, once per event: its index `n`
    /// names the columns `j<n>` (the jsonb, SQL NULL when missing),
    /// `t<n>` (its text) and `y<n>` (its JSON type).
    fn read(&mut self, document: &'static str, path: &[String]) -> usize {
        if let Some(n) = self
            .reads
            .iter()
            .position(|r| r.document == document && r.path == path)
        {
            return n;
        }
        let sql = if path.is_empty() {
            format!("e.{document}")
        } else {
            let param = self.bind(ReplayParam::Path(path.to_vec()));
            format!("(e.{document} #> {param}::text[])")
        };
        self.reads.push(Read {
            document,
            path: path.to_vec(),
            sql,
        });
        self.reads.len() - 1
    }

    /// Where `pointer` reads from.
    fn source(&mut self, pointer: &str) -> Result<Source, NotSetBased> {
        let tokens = parse_pointer(pointer).ok_or_else(|| not(format!("pointer {pointer:?}")))?;
        let Some((first, rest)) = tokens.split_first() else {
            return Err(not("the whole envelope as a value"));
        };
        // Postgres reads a digit token as an array index differently from
        // JSON Pointer (negative, leading zeros).
        if rest.iter().any(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_digit() || b == b'-' || b == b'+')
        }) {
            return Err(not(format!("pointer {pointer:?} may index an array")));
        }
        let field = |column, types| {
            if rest.is_empty() {
                Ok(Source::Field(column, types))
            } else {
                Err(not(format!("pointer {pointer:?} below a scalar")))
            }
        };
        match first.as_str() {
            "data" | "metadata" => {
                let document = if first == "data" { "data" } else { "metadata" };
                Ok(Source::Json(self.read(document, rest)))
            }
            "type" => field("x.event_type", &[ColumnType::Text]),
            "streamId" => field("x.stream_id", &[ColumnType::Text]),
            "streamVersion" => field(
                "x.stream_version",
                &[ColumnType::Bigint, ColumnType::Numeric, ColumnType::Text],
            ),
            "position" => field(
                "x.position",
                &[ColumnType::Bigint, ColumnType::Numeric, ColumnType::Text],
            ),
            "recordedAt" => field("x.recorded_at", &[ColumnType::Timestamptz]),
            _ => Err(not(format!("pointer {pointer:?} outside the envelope"))),
        }
    }

    /// A key column's value: present, not null, and converted.
    fn key(&mut self, col: &ColumnSpec, pointer: &str) -> Result<Mapped, NotSetBased> {
        match self.source(pointer)? {
            Source::Field(column, types) => field_value(col, column, types),
            Source::Json(n) => {
                let (value, ok) = convert(col.ty, n);
                Ok(Mapped {
                    value,
                    bad: format!("NOT coalesce({ok}, false)"),
                })
            }
        }
    }

    /// An assignment's value, as `source_value` and `effect` in the
    /// mapping compute it for `set`.
    fn assignment(&mut self, a: &Assignment, col: &ColumnSpec) -> Result<Mapped, NotSetBased> {
        let pointers = a.pointers();
        let mut literal = |text: &str| -> Result<String, NotSetBased> {
            let sql = literal_to_sql_text(col.ty, text)
                .map_err(|e| not(format!("value for column {}: {e}", col.name)))?;
            let param = self.bind(ReplayParam::Text(sql));
            Ok(format!("{param}::text::{}", col.ty.sql()))
        };
        let pointer = match pointers.as_slice() {
            [] => {
                let value = a
                    .value
                    .as_deref()
                    .ok_or_else(|| not(format!("column {} has no source", col.name)))?;
                let value = literal(value)?;
                return Ok(Mapped {
                    value,
                    bad: "false".into(),
                });
            }
            [pointer] => *pointer,
            _ => return Err(not(format!("column {} reads several pointers", col.name))),
        };
        let default = a.default.as_deref().map(&mut literal).transpose()?;
        let n = match self.source(pointer)? {
            Source::Field(column, types) => return field_value(col, column, types),
            Source::Json(n) => n,
        };
        let (value, ok) = convert(col.ty, n);
        let present = format!("coalesce(y{n} <> 'null', false)");
        let (absent_value, absent_bad) = match default {
            Some(d) => (d, "false".to_string()),
            // A JSON null sets the column to null where it may be; a
            // missing field rejects the event.
            None => (
                format!("NULL::{}", col.ty.sql()),
                if col.nullable {
                    format!("j{n} IS NULL")
                } else {
                    "true".into()
                },
            ),
        };
        Ok(Mapped {
            value: format!("CASE WHEN {present} THEN {value} ELSE {absent_value} END"),
            bad: format!("CASE WHEN {present} THEN NOT {ok} ELSE {absent_bad} END"),
        })
    }
}

/// A column of the event row as a value of `col`'s type, where the
/// projector's conversion of the envelope field gives the same value.
fn field_value(
    col: &ColumnSpec,
    column: &str,
    types: &[ColumnType],
) -> Result<Mapped, NotSetBased> {
    if !types.contains(&col.ty) {
        return Err(not(format!("{column} into a {} column", col.ty.name())));
    }
    Ok(Mapped {
        value: format!("{column}::{}", col.ty.sql()),
        bad: "false".into(),
    })
}

/// `(value, ok)`: read `n` as a value of type `ty`, and whether it is a
/// value `to_sql_text` converts to exactly that (false for a value it
/// rejects and for one this query cannot match). The value is computed
/// even where `ok` fails: an event that fails it, or a cast that fails,
/// ends the query either way, and the batch path takes over.
fn convert(ty: ColumnType, n: usize) -> (String, String) {
    let j = format!("j{n}");
    let t = format!("t{n}");
    let kind = format!("y{n}");
    let int = |digits: u32| format!("'^-?[0-9]{{1,{digits}}}$'");
    let signed = |digits: u32| format!("'^[+-]?[0-9]{{1,{digits}}}$'");
    let (value, ok) = match ty {
        // Numbers other than integers are printed by serde_json, not as
        // Postgres stores them.
        ColumnType::Text => (
            t.clone(),
            format!(
                "({kind} IN ('string', 'boolean') OR ({kind} = 'number' AND {t} ~ {}))",
                int(18)
            ),
        ),
        ColumnType::Bigint | ColumnType::Integer => {
            let digits = if ty == ColumnType::Bigint { 18 } else { 9 };
            (
                format!("{t}::{}", ty.sql()),
                format!(
                    "(({kind} = 'number' AND {t} ~ {}) OR ({kind} = 'string' AND {t} ~ {}))",
                    int(digits),
                    signed(digits)
                ),
            )
        }
        // A fractional number reaches the projector as an f64 printed in
        // its shortest form: the same text only where Postgres' shortest
        // form of the double is the stored text.
        ColumnType::Numeric => (
            format!("{t}::numeric"),
            format!(
                "(({kind} = 'number' AND ({t} ~ {} OR CASE WHEN {t} ~ '^-?[0-9]+\\.[0-9]+$' \
                 THEN {t}::float8::text = {t} ELSE false END)) OR ({kind} = 'string' AND {t} ~ '{DECIMAL}'))",
                int(18)
            ),
        ),
        // -0 is stored as 0, as the projector prints it.
        ColumnType::Double => (
            format!("(CASE WHEN {t}::float8 = 0 THEN 0 ELSE {t}::float8 END)"),
            format!("({kind} = 'number' OR ({kind} = 'string' AND {t} ~ '{DECIMAL}'))"),
        ),
        ColumnType::Boolean => (
            format!("{t}::boolean"),
            format!("({kind} = 'boolean' OR ({kind} = 'string' AND {t} IN ('true', 'false')))"),
        ),
        ColumnType::Timestamptz => (
            format!("{t}::timestamptz"),
            format!("({kind} = 'string' AND {t} ~ '{RFC3339}')"),
        ),
        ColumnType::Uuid => (
            format!("{t}::uuid"),
            format!("({kind} = 'string' AND {t} ~ '{UUID}')"),
        ),
        // The projector re-prints numbers inside a document; one without
        // numbers reads back the same.
        ColumnType::Jsonb => (
            j.to_string(),
            format!("NOT jsonb_path_exists({j}, '$.** ? (@.type() == \"number\")')"),
        ),
    };
    (value, ok)
}

/// The key column's single pointer in `handler`.
fn key_pointer<'h>(handler: &'h HandlerSpec, col: &ColumnSpec) -> Result<&'h str, NotSetBased> {
    match handler.key_pointers(&col.name).as_slice() {
        [pointer] => Ok(pointer),
        _ => Err(not(format!(
            "key column {} reads several pointers",
            col.name
        ))),
    }
}

/// The reference tokens of a JSON pointer (RFC 6901), unescaped.
fn parse_pointer(pointer: &str) -> Option<Vec<String>> {
    let rest = pointer.strip_prefix('/')?;
    Some(
        rest.split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect(),
    )
}

fn or_all(parts: &[String]) -> String {
    if parts.is_empty() {
        "false".into()
    } else {
        format!("({})", parts.join(" OR "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventplane_api::examples::orders;

    #[test]
    fn the_sample_compiles_with_every_value_bound() {
        let compiled = replay_sql(&orders(), "orders_v2").expect("set-based");
        assert!(compiled.sql.contains("::\"orders_v2\" AS v"));
        assert_eq!(
            compiled.columns,
            ["status", "customer_id", "total", "created_at", "updated_at"]
        );
        // Four handlers' types, three pointer paths below data (orderId,
        // read once for every handler, customerId, total) and the three
        // status literals.
        let types = compiled
            .params
            .iter()
            .filter(|p| matches!(p, ReplayParam::Types(_)))
            .count();
        assert_eq!(types, 4);
        let paths = compiled
            .params
            .iter()
            .filter(|p| matches!(p, ReplayParam::Path(_)))
            .count();
        assert_eq!(paths, 3);
        assert!(compiled.params.contains(&ReplayParam::Text("PAID".into())));
        assert!(!compiled.sql.contains("PAID"), "literals are parameters");
        assert!(!compiled.sql.contains("orderId"), "paths are parameters");
    }

    #[test]
    fn conditions_and_other_ops_need_the_batch_path() {
        let mut spec = orders();
        spec.handlers[1].guard = Some("status = 'PENDING'".into());
        assert!(replay_sql(&spec, "t").is_err());
        let mut spec = orders();
        spec.handlers[0].set[2].op = ColumnOp::Max;
        assert!(replay_sql(&spec, "t").is_err());
        let mut spec = orders();
        spec.handlers[0].set[1].from = Some("/data/lines/0".into());
        assert!(replay_sql(&spec, "t").is_err());
    }

    #[test]
    fn pointers_unescape() {
        assert_eq!(
            parse_pointer("/data/a~1b/c~0d"),
            Some(vec!["data".into(), "a/b".into(), "c~d".into()])
        );
        assert_eq!(parse_pointer("data"), None);
    }
}
