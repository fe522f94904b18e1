//! Partial-index predicates: parsed with sqlparser, checked against a small
//! whitelist and rendered back from the syntax tree, so user text never
//! reaches the database as written.

use sqlparser::ast::{BinaryOperator, Expr, InTarget, UnaryOperator, Value};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer, Whitespace};

use crate::ident::quote_ident;
use crate::types::ColumnSpec;
use crate::value::is_decimal;

/// Parses `pred` and renders it as safe SQL over the declared `columns`.
/// The error names the construct that was rejected.
pub fn render_predicate(pred: &str, columns: &[ColumnSpec]) -> Result<String, String> {
    Render { columns }.expr(&parse_condition(pred, false)?)
}

/// Parses one condition after screening its tokens; shared with the
/// handler conditions.
/// `dotted` admits qualified names (`data.total`).
pub(crate) fn parse_condition(pred: &str, dotted: bool) -> Result<Expr, String> {
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, pred)
        .tokenize()
        .map_err(|e| format!("cannot parse: {e}"))?;
    // Tokens are screened before parsing because the parser drops comments
    // and would accept some literal forms we never want to render.
    for t in &tokens {
        if !(dotted && *t == Token::Period) {
            check_token(t)?;
        }
    }
    let mut parser = Parser::new(&dialect).with_tokens(tokens);
    let expr = parser
        .parse_expr()
        .map_err(|e| format!("cannot parse: {e}"))?;
    let rest = parser.peek_token();
    if rest.token != Token::EOF {
        return Err(format!("unexpected `{}` after the condition", rest.token));
    }
    Ok(expr)
}

fn check_token(t: &Token) -> Result<(), String> {
    match t {
        Token::Word(_)
        | Token::Number(_, _)
        | Token::SingleQuotedString(_)
        | Token::DoubleEq
        | Token::Eq
        | Token::Neq
        | Token::Lt
        | Token::Gt
        | Token::LtEq
        | Token::GtEq
        | Token::Minus
        | Token::LParen
        | Token::RParen
        | Token::Comma
        | Token::EOF => Ok(()),
        Token::Whitespace(Whitespace::Space | Whitespace::Newline | Whitespace::Tab) => Ok(()),
        Token::Whitespace(_) => Err("comments are not allowed".into()),
        Token::SemiColon => Err("`;` is not allowed: give a single condition".into()),
        Token::DollarQuotedString(_) => Err("dollar-quoted strings are not allowed".into()),
        Token::EscapedStringLiteral(_) => Err("E'' strings are not allowed".into()),
        other => Err(format!("`{other}` is not allowed")),
    }
}

struct Render<'a> {
    columns: &'a [ColumnSpec],
}

impl Render<'_> {
    /// A literal, optionally negated when numeric.
    fn constant(&self, e: &Expr) -> Result<String, String> {
        match e {
            Expr::Value(v) => literal(&v.value),
            Expr::UnaryOp {
                op: UnaryOperator::Minus,
                expr,
            } if matches!(expr.as_ref(), Expr::Value(v) if matches!(v.value, Value::Number(..))) => {
                self.expr(e)
            }
            other => Err(format!("IN lists may hold only constants, not `{other}`")),
        }
    }

    fn expr(&self, e: &Expr) -> Result<String, String> {
        Ok(match e {
            Expr::Identifier(ident) => {
                // Postgres folds unquoted names to lower case.
                let name = if ident.quote_style.is_some() {
                    ident.value.clone()
                } else {
                    ident.value.to_lowercase()
                };
                match self.columns.iter().find(|c| c.name == name) {
                    Some(c) => quote_ident(&c.name),
                    None => return Err(format!("unknown column {name:?}")),
                }
            }
            Expr::Value(v) => literal(&v.value)?,
            // Every compound is rendered parenthesised already.
            Expr::Nested(inner) => self.expr(inner)?,
            Expr::BinaryOp { left, op, right } => {
                let op = match op {
                    BinaryOperator::Eq => "=",
                    BinaryOperator::NotEq => "<>",
                    BinaryOperator::Lt => "<",
                    BinaryOperator::LtEq => "<=",
                    BinaryOperator::Gt => ">",
                    BinaryOperator::GtEq => ">=",
                    BinaryOperator::And => "AND",
                    BinaryOperator::Or => "OR",
                    other => return Err(format!("operator {other} is not allowed")),
                };
                // Explicit parentheses keep the parsed precedence whatever
                // the rendering of the operands.
                format!("({} {op} {})", self.expr(left)?, self.expr(right)?)
            }
            Expr::UnaryOp { op, expr } => match (op, expr.as_ref()) {
                (UnaryOperator::Not, inner) => format!("(NOT {})", self.expr(inner)?),
                (UnaryOperator::Minus, Expr::Value(v)) if matches!(v.value, Value::Number(..)) => {
                    format!("-{}", literal(&v.value)?)
                }
                (op, _) => return Err(format!("operator {op} is not allowed")),
            },
            Expr::IsNull(inner) => format!("({} IS NULL)", self.expr(inner)?),
            Expr::IsNotNull(inner) => format!("({} IS NOT NULL)", self.expr(inner)?),
            Expr::IsTrue(inner) => format!("({} IS TRUE)", self.expr(inner)?),
            Expr::IsNotTrue(inner) => format!("({} IS NOT TRUE)", self.expr(inner)?),
            Expr::IsFalse(inner) => format!("({} IS FALSE)", self.expr(inner)?),
            Expr::IsNotFalse(inner) => format!("({} IS NOT FALSE)", self.expr(inner)?),
            Expr::In {
                expr,
                target,
                negated,
                global,
            } => {
                let list = match target {
                    InTarget::List(list) if !global => list,
                    InTarget::Subquery(_) => return Err("subqueries are not allowed".into()),
                    other => return Err(format!("IN {other} is not allowed")),
                };
                let items = list
                    .iter()
                    .map(|item| self.constant(item))
                    .collect::<Result<Vec<_>, _>>()?;
                let not = if *negated { "NOT " } else { "" };
                format!("({} {not}IN ({}))", self.expr(expr)?, items.join(", "))
            }
            Expr::Between {
                expr,
                negated,
                low,
                high,
            } => {
                let not = if *negated { "NOT " } else { "" };
                format!(
                    "({} {not}BETWEEN {} AND {})",
                    self.expr(expr)?,
                    self.expr(low)?,
                    self.expr(high)?
                )
            }
            Expr::Like {
                negated,
                any,
                expr,
                pattern,
                escape_char,
            } => {
                if *any {
                    return Err("LIKE ANY is not allowed".into());
                }
                if escape_char.is_some() {
                    return Err("LIKE … ESCAPE is not allowed".into());
                }
                let pattern = match pattern.as_ref() {
                    Expr::Value(v) if matches!(v.value, Value::SingleQuotedString(_)) => {
                        literal(&v.value)?
                    }
                    other => return Err(format!("LIKE needs a string constant, not `{other}`")),
                };
                let not = if *negated { "NOT " } else { "" };
                format!("({} {not}LIKE {pattern})", self.expr(expr)?)
            }
            Expr::Function(f) => return Err(format!("function call {} is not allowed", f.name)),
            Expr::Subquery(_) | Expr::Exists { .. } => {
                return Err("subqueries are not allowed".into());
            }
            Expr::Cast { .. } => return Err("casts are not allowed".into()),
            Expr::CompoundIdentifier(parts) => {
                return Err(format!(
                    "qualified name {} is not allowed; use a plain column name",
                    parts
                        .iter()
                        .map(|p| p.value.as_str())
                        .collect::<Vec<_>>()
                        .join(".")
                ));
            }
            other => return Err(format!("`{other}` is not allowed")),
        })
    }
}

fn literal(v: &Value) -> Result<String, String> {
    Ok(match v {
        Value::Number(n, long) if !long && is_decimal(n) => n.clone(),
        Value::SingleQuotedString(s) => quote_literal(s),
        Value::Boolean(true) => "TRUE".into(),
        Value::Boolean(false) => "FALSE".into(),
        Value::Null => "NULL".into(),
        other => return Err(format!("constant `{other}` is not allowed")),
    })
}

/// Single-quotes a string constant. A backslash would be an escape if the
/// server ran with `standard_conforming_strings = off`, so such strings use
/// the E'' form, which reads the same under either setting.
fn quote_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if s.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ColumnType;

    fn cols() -> Vec<ColumnSpec> {
        [
            ("status", ColumnType::Text),
            ("total", ColumnType::Numeric),
            ("paid", ColumnType::Boolean),
            ("order", ColumnType::Integer),
        ]
        .into_iter()
        .map(|(name, ty)| ColumnSpec {
            name: name.into(),
            ty,
            nullable: true,
        })
        .collect()
    }

    fn ok(p: &str) -> String {
        render_predicate(p, &cols()).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    fn err(p: &str) -> String {
        match render_predicate(p, &cols()) {
            Ok(sql) => panic!("{p} was accepted as {sql}"),
            Err(e) => e,
        }
    }

    #[test]
    fn simple_comparison_is_rendered_with_quoted_names() {
        assert_eq!(ok("status = 'PENDING'"), "(\"status\" = 'PENDING')");
    }

    #[test]
    fn quoted_identifier_and_doubled_quote_render_safely() {
        assert_eq!(ok("\"status\" = 'a''b'"), "(\"status\" = 'a''b')");
    }

    #[test]
    fn unquoted_names_are_case_folded_like_postgres() {
        assert_eq!(ok("STATUS IS NULL"), "(\"status\" IS NULL)");
        assert!(err("\"STATUS\" IS NULL").contains("unknown column"));
    }

    #[test]
    fn all_whitelisted_constructs_render() {
        assert_eq!(
            ok("status <> 'x' AND (total >= 10 OR NOT paid) AND total != -1.5"),
            "(((\"status\" <> 'x') AND ((\"total\" >= 10) OR (NOT \"paid\"))) AND (\"total\" <> -1.5))"
        );
        assert_eq!(
            ok("total < 1 OR total <= 2 OR total > 3"),
            "(((\"total\" < 1) OR (\"total\" <= 2)) OR (\"total\" > 3))"
        );
        assert_eq!(ok("status IS NOT NULL"), "(\"status\" IS NOT NULL)");
        assert_eq!(ok("paid IS TRUE"), "(\"paid\" IS TRUE)");
        assert_eq!(ok("paid IS NOT TRUE"), "(\"paid\" IS NOT TRUE)");
        assert_eq!(ok("paid IS FALSE"), "(\"paid\" IS FALSE)");
        assert_eq!(ok("paid IS NOT FALSE"), "(\"paid\" IS NOT FALSE)");
        assert_eq!(ok("paid = true"), "(\"paid\" = TRUE)");
        assert_eq!(ok("status = NULL"), "(\"status\" = NULL)");
        assert_eq!(ok("status IN ('a', 'b')"), "(\"status\" IN ('a', 'b'))");
        assert_eq!(ok("total NOT IN (1, -2)"), "(\"total\" NOT IN (1, -2))");
        assert_eq!(
            ok("total BETWEEN 1 AND 2.5"),
            "(\"total\" BETWEEN 1 AND 2.5)"
        );
        assert_eq!(
            ok("total NOT BETWEEN 1 AND 2"),
            "(\"total\" NOT BETWEEN 1 AND 2)"
        );
        assert_eq!(ok("status LIKE 'A%'"), "(\"status\" LIKE 'A%')");
        assert_eq!(ok("status NOT LIKE 'A%'"), "(\"status\" NOT LIKE 'A%')");
        assert_eq!(ok("\"order\" = 1"), "(\"order\" = 1)");
    }

    #[test]
    fn backslashes_use_escape_string_syntax() {
        assert_eq!(ok(r"status = 'a\'"), r#"("status" = E'a\\')"#);
    }

    #[test]
    fn injection_attempts_are_rejected() {
        assert!(err("status = 'x'; DROP TABLE orders").contains(";"));
        assert!(err("status = 'x' OR 1=1 --").contains("comment"));
        assert!(err("status = 'x' /* c */").contains("comment"));
        assert!(err("pg_sleep(1) IS NULL").contains("pg_sleep"));
        assert!(err("(SELECT 1) = 1").contains("subquer"));
        assert!(err("status = 'x' status").contains("unexpected"));
    }

    #[test]
    fn other_constructs_are_rejected_with_a_reason() {
        assert!(err("status = $$x$$").contains("dollar"));
        assert!(err("status = E'x'").contains("E''"));
        assert!(err("status::int = 1").contains("::"));
        assert!(err("CAST(status AS int) = 1").contains("cast"));
        assert!(err("nope = 1").contains("unknown column \"nope\""));
        assert!(err("orders.status = 'x'").contains("`.`"));
        assert!(err("total + 1 = 2").contains("+"));
        assert!(err("status IN (SELECT 'a')").contains("subquer"));
        assert!(err("status IN (status)").contains("constants"));
        assert!(err("status LIKE status").contains("string constant"));
        assert!(err("status ILIKE 'a'").contains("ILIKE"));
        assert!(err("total = $1").contains("$1"));
        assert!(err("EXISTS (SELECT 1)").contains("subquer"));
        assert!(err("").contains("cannot parse"));
        assert!(err("status = 'x' AND").contains("cannot parse"));
    }
}
