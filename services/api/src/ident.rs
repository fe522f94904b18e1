//! Quoting of SQL identifiers.

/// Renders `s` as a double-quoted Postgres identifier.
///
/// Identifiers are validated before they get here, but every identifier is
/// still quoted so that a reserved word used as a column name (`order`,
/// `user`) works and a validation gap can never turn into SQL injection.
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_identifier_is_wrapped_in_double_quotes() {
        assert_eq!(quote_ident("orders"), "\"orders\"");
    }

    #[test]
    fn embedded_double_quotes_are_doubled() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            quote_ident("\"; DROP TABLE x; --"),
            "\"\"\"; DROP TABLE x; --\""
        );
    }
}
