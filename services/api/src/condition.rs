//! Handler conditions: `when` on the event, `if` on the current row.
//!
//! They are parsed like partial-index predicates, checked against a small
//! allow-list and compiled to a tree in which every constant and every
//! event field is a typed *slot*: the projector binds slot values as
//! parameters, so user text never reaches the database as SQL. A `when`
//! condition is evaluated here, on the event; an `if` condition is
//! rendered into the row statements by the planner.

use std::cmp::Ordering;

use serde_json::Value;
use sqlparser::ast::{BinaryOperator, Expr, Ident, InTarget, UnaryOperator, Value as SqlValue};

use crate::predicate::parse_condition;
use crate::types::{ColumnSpec, ColumnType};
use crate::value::{compare_values, is_decimal, literal_to_sql_text, to_sql_text};

/// A compiled condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub cond: Cond,
    /// The values the condition reads besides columns, in parameter order.
    pub slots: Vec<Slot>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
    Compare(Term, CmpOp, Term),
    /// `IS NULL`, or `IS NOT NULL` when the flag is set.
    IsNull(Term, bool),
    /// `IN (...)`, or `NOT IN` when the flag is set.
    In(Term, Vec<Term>, bool),
    /// A boolean operand on its own.
    Truth(Term),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub fn sql(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    fn holds(self, o: Ordering) -> bool {
        match self {
            CmpOp::Eq => o == Ordering::Equal,
            CmpOp::Ne => o != Ordering::Equal,
            CmpOp::Lt => o == Ordering::Less,
            CmpOp::Le => o != Ordering::Greater,
            CmpOp::Gt => o == Ordering::Greater,
            CmpOp::Ge => o != Ordering::Less,
        }
    }
}

/// An operand.
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    /// A declared column (only in `if`).
    Column(String),
    /// The value of `slots[i]`.
    Slot(usize),
    Null,
}

/// A value bound as a parameter, with the type it is compared as.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub source: Source,
    pub ty: ColumnType,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// An event field, by JSON pointer into the envelope.
    Pointer(String),
    /// A constant, as the SQL text of the slot's type.
    Constant(String),
}

/// Compiles a `when` condition: event fields and constants only.
pub fn parse_when(text: &str) -> Result<Condition, String> {
    compile(text, None)
}

/// Compiles an `if` condition over the declared `columns`.
pub fn parse_guard(text: &str, columns: &[ColumnSpec]) -> Result<Condition, String> {
    compile(text, Some(columns))
}

fn compile(text: &str, columns: Option<&[ColumnSpec]>) -> Result<Condition, String> {
    let expr = parse_condition(text, true)?;
    let mut c = Compiler {
        columns,
        slots: Vec::new(),
    };
    let cond = c.cond(&expr)?;
    Ok(Condition {
        cond,
        slots: c.slots,
    })
}

/// An operand before its type is known.
enum Raw<'a> {
    Column(&'a ColumnSpec),
    Pointer(String),
    Number(String),
    Text(String),
    Bool(bool),
    Null,
}

impl Raw<'_> {
    /// The type a constant or column has on its own.
    fn own_type(&self) -> Option<ColumnType> {
        match self {
            Raw::Column(c) => Some(c.ty),
            Raw::Number(_) => Some(ColumnType::Numeric),
            Raw::Text(_) => Some(ColumnType::Text),
            Raw::Bool(_) => Some(ColumnType::Boolean),
            Raw::Pointer(_) | Raw::Null => None,
        }
    }
}

struct Compiler<'a> {
    columns: Option<&'a [ColumnSpec]>,
    slots: Vec<Slot>,
}

/// `data.a.b` → `/data/a/b`; `event.streamId` → `/streamId`.
fn pointer(parts: &[Ident]) -> Result<String, String> {
    let names: Vec<&str> = parts.iter().map(|p| p.value.as_str()).collect();
    let rest = match names[0] {
        "data" | "metadata" => &names[..],
        "event" => &names[1..],
        _ => {
            return Err(format!(
                "{} is not an event field: write data.<field>, metadata.<field> or event.<field>",
                names.join(".")
            ));
        }
    };
    Ok(rest
        .iter()
        .map(|n| format!("/{}", n.replace('~', "~0").replace('/', "~1")))
        .collect())
}

impl<'a> Compiler<'a> {
    fn raw(&self, e: &Expr) -> Result<Raw<'a>, String> {
        Ok(match e {
            Expr::Identifier(ident) => {
                let Some(columns) = self.columns else {
                    return Err(format!(
                        "`when` reads the event only, not the column {:?}: write event fields as data.<field>",
                        ident.value
                    ));
                };
                // Postgres folds unquoted names to lower case.
                let name = if ident.quote_style.is_some() {
                    ident.value.clone()
                } else {
                    ident.value.to_lowercase()
                };
                match columns.iter().find(|c| c.name == name) {
                    Some(c) => Raw::Column(c),
                    None => return Err(format!("unknown column {name:?}")),
                }
            }
            Expr::CompoundIdentifier(parts) => Raw::Pointer(pointer(parts)?),
            Expr::Nested(inner) => self.raw(inner)?,
            Expr::Value(v) => match &v.value {
                SqlValue::Number(n, false) if is_decimal(n) => Raw::Number(n.clone()),
                SqlValue::SingleQuotedString(s) => Raw::Text(s.clone()),
                SqlValue::Boolean(b) => Raw::Bool(*b),
                SqlValue::Null => Raw::Null,
                other => return Err(format!("constant `{other}` is not allowed")),
            },
            Expr::UnaryOp {
                op: UnaryOperator::Minus,
                expr,
            } => match expr.as_ref() {
                Expr::Value(v) => match &v.value {
                    SqlValue::Number(n, false) if is_decimal(n) => Raw::Number(format!("-{n}")),
                    other => return Err(format!("`-{other}` is not allowed")),
                },
                other => return Err(format!("`-{other}` is not allowed: only constants")),
            },
            Expr::Function(f) => return Err(format!("function call {} is not allowed", f.name)),
            Expr::Subquery(_) | Expr::Exists { .. } => {
                return Err("subqueries are not allowed".into());
            }
            Expr::Cast { .. } => return Err("casts are not allowed".into()),
            other => return Err(format!("`{other}` is not an operand")),
        })
    }

    /// Gives `raw` the type `ty`: a column stays a column, an event field
    /// or a constant becomes a slot.
    fn term(&mut self, raw: Raw<'_>, ty: ColumnType) -> Result<Term, String> {
        let constant = |text: String| -> Result<Source, String> {
            Ok(Source::Constant(literal_to_sql_text(ty, &text).map_err(
                |e| format!("constant {text:?} is not a {} value: {e}", ty.name()),
            )?))
        };
        let source = match raw {
            Raw::Column(c) => return Ok(Term::Column(c.name.clone())),
            Raw::Null => return Ok(Term::Null),
            Raw::Pointer(p) => Source::Pointer(p),
            Raw::Number(n) => constant(n)?,
            Raw::Text(s) => constant(s)?,
            Raw::Bool(b) => constant(b.to_string())?,
        };
        self.slots.push(Slot { source, ty });
        Ok(Term::Slot(self.slots.len() - 1))
    }

    /// The type two operands are compared as.
    fn common_type(a: &Raw<'_>, b: &Raw<'_>) -> Result<ColumnType, String> {
        match (a, b) {
            (Raw::Column(x), Raw::Column(y)) if x.ty != y.ty => Err(format!(
                "columns {:?} ({}) and {:?} ({}) have different types",
                x.name,
                x.ty.name(),
                y.name,
                y.ty.name()
            )),
            (Raw::Pointer(p), Raw::Pointer(q)) => Err(format!(
                "compare an event field with a column or a constant, not with another event field ({p} and {q})"
            )),
            (Raw::Column(c), _) | (_, Raw::Column(c)) => Ok(c.ty),
            _ => match (a.own_type(), b.own_type()) {
                (Some(x), Some(y)) if x != y => Err(format!(
                    "cannot compare a {} constant with a {} constant",
                    x.name(),
                    y.name()
                )),
                (Some(t), _) | (None, Some(t)) => Ok(t),
                // An event field against NULL: any JSON value will do.
                (None, None) => Ok(ColumnType::Jsonb),
            },
        }
    }

    fn cond(&mut self, e: &Expr) -> Result<Cond, String> {
        Ok(match e {
            Expr::Nested(inner) => self.cond(inner)?,
            Expr::BinaryOp { left, op, right } => {
                let cmp = match op {
                    BinaryOperator::And => {
                        return Ok(Cond::And(
                            Box::new(self.cond(left)?),
                            Box::new(self.cond(right)?),
                        ));
                    }
                    BinaryOperator::Or => {
                        return Ok(Cond::Or(
                            Box::new(self.cond(left)?),
                            Box::new(self.cond(right)?),
                        ));
                    }
                    BinaryOperator::Eq => CmpOp::Eq,
                    BinaryOperator::NotEq => CmpOp::Ne,
                    BinaryOperator::Lt => CmpOp::Lt,
                    BinaryOperator::LtEq => CmpOp::Le,
                    BinaryOperator::Gt => CmpOp::Gt,
                    BinaryOperator::GtEq => CmpOp::Ge,
                    other => return Err(format!("operator {other} is not allowed")),
                };
                let (a, b) = (self.raw(left)?, self.raw(right)?);
                let ty = Self::common_type(&a, &b)?;
                if ty == ColumnType::Jsonb && !matches!(cmp, CmpOp::Eq | CmpOp::Ne) {
                    return Err(format!(
                        "jsonb values can only be compared with = and <>, not {}",
                        cmp.sql()
                    ));
                }
                Cond::Compare(self.term(a, ty)?, cmp, self.term(b, ty)?)
            }
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => Cond::Not(Box::new(self.cond(expr)?)),
            Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
                let raw = self.raw(inner)?;
                let ty = raw.own_type().unwrap_or(ColumnType::Jsonb);
                Cond::IsNull(self.term(raw, ty)?, matches!(e, Expr::IsNotNull(_)))
            }
            Expr::In {
                expr,
                target,
                negated,
                global,
            } => {
                let list = match target {
                    InTarget::List(list) if !global && !list.is_empty() => list,
                    InTarget::Subquery(_) => return Err("subqueries are not allowed".into()),
                    other => return Err(format!("IN {other} is not allowed")),
                };
                let subject = self.raw(expr)?;
                let mut items = Vec::with_capacity(list.len());
                for item in list {
                    let raw = self.raw(item)?;
                    if matches!(raw, Raw::Column(_) | Raw::Pointer(_)) {
                        return Err(format!("IN lists may hold only constants, not `{item}`"));
                    }
                    items.push(raw);
                }
                // A column decides the type (constants must fit it);
                // otherwise the constants must agree among themselves.
                let ty = match &subject {
                    Raw::Column(c) => Some(c.ty),
                    _ => {
                        let mut ty = subject.own_type();
                        for t in items.iter().filter_map(Raw::own_type) {
                            match ty {
                                Some(u) if u != t => {
                                    return Err(format!(
                                        "cannot compare a {} value with a {} constant",
                                        u.name(),
                                        t.name()
                                    ));
                                }
                                _ => ty = Some(t),
                            }
                        }
                        ty
                    }
                };
                let ty = ty.unwrap_or(ColumnType::Jsonb);
                let subject = self.term(subject, ty)?;
                let items = items
                    .into_iter()
                    .map(|raw| self.term(raw, ty))
                    .collect::<Result<_, _>>()?;
                Cond::In(subject, items, *negated)
            }
            Expr::Value(_) | Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                let raw = self.raw(e)?;
                if let Some(t) = raw.own_type().filter(|t| *t != ColumnType::Boolean) {
                    return Err(format!("`{e}` is a {} value, not a condition", t.name()));
                }
                Cond::Truth(self.term(raw, ColumnType::Boolean)?)
            }
            other => return Err(format!("`{other}` is not allowed")),
        })
    }
}

impl Condition {
    /// The slot values for `envelope`: event fields converted to their
    /// slot's type (a missing field is null), constants as compiled.
    pub fn bind(&self, envelope: &Value) -> Result<Vec<Option<String>>, String> {
        self.slots
            .iter()
            .map(|slot| match &slot.source {
                Source::Constant(text) => Ok(Some(text.clone())),
                Source::Pointer(p) => match envelope.pointer(p) {
                    None => Ok(None),
                    Some(v) => to_sql_text(slot.ty, v).map_err(|e| format!("{p}: {e}")),
                },
            })
            .collect()
    }

    /// Evaluates a condition without columns on bound slot values, with
    /// SQL's three-valued logic: `None` is unknown, which does not hold.
    pub fn holds(&self, values: &[Option<String>]) -> bool {
        self.eval(&self.cond, values) == Some(true)
    }

    fn value<'v>(&self, t: &Term, values: &'v [Option<String>]) -> Option<&'v str> {
        match t {
            Term::Slot(i) => values[*i].as_deref(),
            Term::Null => None,
            Term::Column(c) => panic!("column {c} in a condition evaluated on the event"),
        }
    }

    fn ty(&self, t: &Term) -> ColumnType {
        match t {
            Term::Slot(i) => self.slots[*i].ty,
            _ => ColumnType::Text,
        }
    }

    fn compare(&self, a: &Term, b: &Term, values: &[Option<String>]) -> Option<Ordering> {
        let (x, y) = (self.value(a, values)?, self.value(b, values)?);
        let ty = match a {
            Term::Slot(_) => self.ty(a),
            _ => self.ty(b),
        };
        if ty == ColumnType::Text {
            // Code-point order: the event has no collation.
            return Some(x.cmp(y));
        }
        compare_values(ty, x, y)
    }

    fn eval(&self, c: &Cond, v: &[Option<String>]) -> Option<bool> {
        match c {
            Cond::And(a, b) => match (self.eval(a, v), self.eval(b, v)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Cond::Or(a, b) => match (self.eval(a, v), self.eval(b, v)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Cond::Not(a) => self.eval(a, v).map(|b| !b),
            Cond::Compare(a, op, b) => self.compare(a, b, v).map(|o| op.holds(o)),
            Cond::IsNull(t, negated) => Some(self.value(t, v).is_none() != *negated),
            Cond::In(t, items, negated) => {
                let mut unknown = false;
                for item in items {
                    match self.compare(t, item, v) {
                        Some(Ordering::Equal) => return Some(!negated),
                        Some(_) => {}
                        None => unknown = true,
                    }
                }
                if unknown { None } else { Some(*negated) }
            }
            Cond::Truth(t) => self.value(t, v).map(|s| s == "true"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cols() -> Vec<ColumnSpec> {
        [
            ("status", ColumnType::Text),
            ("total", ColumnType::Numeric),
            ("paid", ColumnType::Boolean),
            ("n", ColumnType::Bigint),
            ("doc", ColumnType::Jsonb),
        ]
        .into_iter()
        .map(|(name, ty)| ColumnSpec {
            name: name.into(),
            ty,
            nullable: true,
        })
        .collect()
    }

    fn when(text: &str, data: Value) -> bool {
        let c = parse_when(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let envelope = json!({"type": "E", "streamId": "s-1", "data": data, "metadata": {"m": 1}});
        c.holds(&c.bind(&envelope).unwrap())
    }

    #[test]
    fn when_conditions_follow_sql_logic_on_the_event() {
        assert!(when("data.total > 100", json!({"total": 150})));
        assert!(!when("data.total > 100", json!({"total": 50})));
        assert!(!when("data.total > 100", json!({})));
        assert!(when("data.total IS NULL", json!({})));
        assert!(when("data.total IS NOT NULL", json!({"total": "1.5"})));
        assert!(when("data.c IN ('EUR', 'USD')", json!({"c": "USD"})));
        assert!(!when("data.c NOT IN ('EUR', 'USD')", json!({"c": "USD"})));
        assert!(!when("data.c NOT IN ('EUR')", json!({})));
        assert!(when(
            "NOT (data.total >= 10) OR data.x = 'a'",
            json!({"total": 5})
        ));
        assert!(when("data.express", json!({"express": true})));
        assert!(!when("data.express", json!({"express": false})));
        assert!(when("event.streamId = 's-1'", json!({})));
        assert!(when("metadata.m = 1", json!({})));
        assert!(when("data.\"Big Name\" = -2.50", json!({"Big Name": -2.5})));
        assert!(when("data.a <> 'b' AND data.a < 'b'", json!({"a": "a"})));
        assert!(when("data.n = 1e2", json!({"n": 100})));
    }

    #[test]
    fn a_field_of_the_wrong_type_is_an_error_naming_it() {
        let c = parse_when("data.total > 100").unwrap();
        let e = c.bind(&json!({"data": {"total": "lots"}})).unwrap_err();
        assert!(e.starts_with("/data/total: "), "{e}");
    }

    #[test]
    fn guards_keep_columns_and_bind_constants_and_fields_as_slots() {
        let c = parse_guard("status = 'PENDING' AND total < data.total", &cols()).unwrap();
        assert_eq!(
            c.slots,
            [
                Slot {
                    source: Source::Constant("PENDING".into()),
                    ty: ColumnType::Text
                },
                Slot {
                    source: Source::Pointer("/data/total".into()),
                    ty: ColumnType::Numeric
                },
            ]
        );
        assert_eq!(
            c.cond,
            Cond::And(
                Box::new(Cond::Compare(
                    Term::Column("status".into()),
                    CmpOp::Eq,
                    Term::Slot(0)
                )),
                Box::new(Cond::Compare(
                    Term::Column("total".into()),
                    CmpOp::Lt,
                    Term::Slot(1)
                ))
            )
        );
        let c = parse_guard("n IN (1, 2) AND paid AND doc IS NULL", &cols()).unwrap();
        assert_eq!(c.slots.len(), 2);
        assert_eq!(c.slots[0].ty, ColumnType::Bigint);
    }

    fn guard_err(text: &str) -> String {
        match parse_guard(text, &cols()) {
            Ok(c) => panic!("{text} was accepted as {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn injection_attempts_and_unknown_names_are_rejected() {
        assert!(guard_err("status = 'x'; DROP TABLE orders").contains(";"));
        assert!(guard_err("status = 'x' OR 1=1 --").contains("comment"));
        assert!(guard_err("status = 'x' /* c */").contains("comment"));
        assert!(guard_err("pg_sleep(1) IS NULL").contains("pg_sleep"));
        assert!(guard_err("(SELECT 1) = 1").contains("subquer"));
        assert!(guard_err("status = $$x$$").contains("dollar"));
        assert!(guard_err("status::text = 'x'").contains("::"));
        assert!(guard_err("nope = 1").contains("unknown column \"nope\""));
        assert!(guard_err("orders.status = 'x'").contains("not an event field"));
        assert!(guard_err("total + 1 = 2").contains("+"));
        assert!(guard_err("status IN (SELECT 'a')").contains("subquer"));
        assert!(guard_err("status IN (status)").contains("constants"));
        assert!(guard_err("n = 'abc'").contains("not a bigint value"));
        assert!(guard_err("status = n").contains("different types"));
        assert!(guard_err("data.a = data.b").contains("another event field"));
        assert!(guard_err("1 = 'a'").contains("cannot compare"));
        assert!(guard_err("status").contains("not a condition"));
        assert!(guard_err("doc < '{}'").contains("jsonb"));
        assert!(guard_err("status LIKE 'a%'").contains("LIKE"));
        assert!(guard_err("").contains("cannot parse"));
        let e = parse_when("status = 'x'").unwrap_err();
        assert!(e.contains("reads the event only"), "{e}");
    }
}
