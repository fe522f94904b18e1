//! Read-your-writes tokens. A token names the writing transaction and the
//! last position of an append; a projection has passed it once its
//! checkpoint `(tx_id, position)` is at or beyond the pair, because the
//! projector applies events in exactly that order.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Token {
    pub tx_id: i64,
    pub position: i64,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.tx_id, self.position)
    }
}

impl FromStr for Token {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("invalid token {s:?}: expected the `token` of a command response");
        let (tx, pos) = s.split_once('.').ok_or_else(invalid)?;
        let tx_id = tx.parse::<i64>().map_err(|_| invalid())?;
        let position = pos.parse::<i64>().map_err(|_| invalid())?;
        if tx_id < 0 || position < 0 {
            return Err(invalid());
        }
        Ok(Token { tx_id, position })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips() {
        let t = Token {
            tx_id: 812,
            position: 77,
        };
        assert_eq!(t.to_string().parse::<Token>(), Ok(t));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        for bad in ["", "12", "a.b", "1.-2", "-1.2", "1.2.3"] {
            assert!(bad.parse::<Token>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn tokens_order_by_transaction_then_position() {
        let a = Token {
            tx_id: 5,
            position: 900,
        };
        let b = Token {
            tx_id: 6,
            position: 1,
        };
        assert!(a < b);
    }
}
