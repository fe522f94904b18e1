//! Folding the changes a batch makes to one key into a single row
//! operation that has exactly the effect of applying them in order.
//!
//! The projector does not know whether a row exists before it writes, so the
//! fold tracks the outcome for both cases at once: what the changes amount to
//! if the row existed, and what they amount to if it did not. Only four
//! combinations of those two outcomes can arise, and each is expressible as
//! one SQL statement shape.

use std::collections::BTreeMap;

use crate::mapping::{ChangeKind, RowChange};

pub type Columns = BTreeMap<String, Option<String>>;

/// The single operation that replaces a key's changes in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOp {
    /// Delete the row if it exists.
    Delete,
    /// Update these columns if the row exists.
    Update(Columns),
    /// Insert `insert` (other columns NULL) if the row is absent; otherwise
    /// apply `on_conflict`.
    Upsert {
        insert: Columns,
        on_conflict: Conflict,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// Update only these columns (empty: leave the row as it is).
    Set(Columns),
    /// The row was deleted and re-created in the batch: every non-key column
    /// takes the insert value or NULL.
    Replace,
}

/// The pair (outcome if the row existed, outcome if it was absent),
/// restricted to the combinations that can occur.
#[derive(Debug, Clone)]
enum State {
    /// Existed: patched with the map. Absent: still absent. Only updates so far.
    Updated(Columns),
    /// Existed: patched with `patch`. Absent: created with `row`.
    Upserted { patch: Columns, row: Columns },
    /// Existed or not, the row is gone.
    Deleted,
    /// Existed: replaced by the map. Absent: created with the same map.
    Recreated(Columns),
}

impl State {
    fn apply(self, change: ChangeKind) -> State {
        match (self, change) {
            (_, ChangeKind::Delete) => State::Deleted,
            (State::Updated(mut m), ChangeKind::Update(c)) => {
                m.extend(c);
                State::Updated(m)
            }
            (State::Updated(mut m), ChangeKind::Upsert(c)) => {
                m.extend(c.clone());
                State::Upserted { patch: m, row: c }
            }
            (
                State::Upserted { mut patch, mut row },
                ChangeKind::Update(c) | ChangeKind::Upsert(c),
            ) => {
                patch.extend(c.clone());
                row.extend(c);
                State::Upserted { patch, row }
            }
            (State::Deleted, ChangeKind::Update(_)) => State::Deleted,
            (State::Deleted, ChangeKind::Upsert(c)) => State::Recreated(c),
            (State::Recreated(mut m), ChangeKind::Update(c) | ChangeKind::Upsert(c)) => {
                m.extend(c);
                State::Recreated(m)
            }
        }
    }

    fn into_op(self) -> Option<RowOp> {
        match self {
            State::Updated(m) if m.is_empty() => None,
            State::Updated(m) => Some(RowOp::Update(m)),
            State::Deleted => Some(RowOp::Delete),
            State::Upserted { patch, row } => Some(RowOp::Upsert {
                insert: row,
                on_conflict: Conflict::Set(patch),
            }),
            State::Recreated(m) => Some(RowOp::Upsert {
                insert: m,
                on_conflict: Conflict::Replace,
            }),
        }
    }
}

/// Folds changes, in event order, into one operation per key, ordered by key.
/// Keys whose changes have no effect (only empty updates) are left out.
pub fn fold(changes: impl IntoIterator<Item = RowChange>) -> Vec<(String, RowOp)> {
    let mut states: BTreeMap<String, State> = BTreeMap::new();
    for change in changes {
        let state = states
            .remove(&change.key)
            .unwrap_or_else(|| State::Updated(Columns::new()));
        states.insert(change.key, state.apply(change.kind));
    }
    states
        .into_iter()
        .filter_map(|(k, s)| s.into_op().map(|op| (k, op)))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn cols(pairs: &[(&str, Option<&str>)]) -> Columns {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    }

    fn ch(key: &str, kind: ChangeKind) -> RowChange {
        RowChange {
            key: key.into(),
            kind,
        }
    }

    fn up(pairs: &[(&str, Option<&str>)]) -> ChangeKind {
        ChangeKind::Upsert(cols(pairs))
    }

    fn upd(pairs: &[(&str, Option<&str>)]) -> ChangeKind {
        ChangeKind::Update(cols(pairs))
    }

    fn fold1(kinds: Vec<ChangeKind>) -> Vec<RowOp> {
        fold(kinds.into_iter().map(|k| ch("k", k)))
            .into_iter()
            .map(|(_, op)| op)
            .collect()
    }

    #[test]
    fn single_changes_map_directly() {
        assert_eq!(
            fold1(vec![up(&[("a", Some("1"))])]),
            [RowOp::Upsert {
                insert: cols(&[("a", Some("1"))]),
                on_conflict: Conflict::Set(cols(&[("a", Some("1"))])),
            }]
        );
        assert_eq!(
            fold1(vec![upd(&[("a", None)])]),
            [RowOp::Update(cols(&[("a", None)]))]
        );
        assert_eq!(fold1(vec![ChangeKind::Delete]), [RowOp::Delete]);
    }

    #[test]
    fn empty_updates_produce_nothing() {
        assert_eq!(fold1(vec![upd(&[]), upd(&[])]), []);
        assert!(fold(Vec::new()).is_empty());
    }

    #[test]
    fn update_then_upsert_patches_more_than_it_inserts() {
        assert_eq!(
            fold1(vec![upd(&[("a", Some("1"))]), up(&[("b", Some("2"))])]),
            [RowOp::Upsert {
                insert: cols(&[("b", Some("2"))]),
                on_conflict: Conflict::Set(cols(&[("a", Some("1")), ("b", Some("2"))])),
            }]
        );
    }

    #[test]
    fn upsert_then_update_merges_into_both_outcomes() {
        assert_eq!(
            fold1(vec![
                up(&[("a", Some("1"))]),
                upd(&[("a", Some("2")), ("b", None)])
            ]),
            [RowOp::Upsert {
                insert: cols(&[("a", Some("2")), ("b", None)]),
                on_conflict: Conflict::Set(cols(&[("a", Some("2")), ("b", None)])),
            }]
        );
    }

    #[test]
    fn upsert_with_no_columns_does_nothing_on_conflict() {
        assert_eq!(
            fold1(vec![up(&[])]),
            [RowOp::Upsert {
                insert: cols(&[]),
                on_conflict: Conflict::Set(cols(&[])),
            }]
        );
    }

    #[test]
    fn delete_wins_over_earlier_changes_and_ignores_later_updates() {
        assert_eq!(
            fold1(vec![up(&[("a", Some("1"))]), ChangeKind::Delete]),
            [RowOp::Delete]
        );
        assert_eq!(
            fold1(vec![
                upd(&[("a", Some("1"))]),
                ChangeKind::Delete,
                upd(&[("a", Some("2"))])
            ]),
            [RowOp::Delete]
        );
        assert_eq!(
            fold1(vec![ChangeKind::Delete, ChangeKind::Delete]),
            [RowOp::Delete]
        );
    }

    #[test]
    fn delete_then_upsert_replaces_the_row() {
        assert_eq!(
            fold1(vec![
                upd(&[("a", Some("0"))]),
                ChangeKind::Delete,
                up(&[("a", Some("1"))]),
                upd(&[("b", Some("2"))]),
                up(&[("a", Some("3"))]),
            ]),
            [RowOp::Upsert {
                insert: cols(&[("a", Some("3")), ("b", Some("2"))]),
                on_conflict: Conflict::Replace,
            }]
        );
    }

    #[test]
    fn recreated_then_deleted_is_a_delete() {
        assert_eq!(
            fold1(vec![
                ChangeKind::Delete,
                up(&[("a", Some("1"))]),
                ChangeKind::Delete
            ]),
            [RowOp::Delete]
        );
    }

    #[test]
    fn keys_fold_independently_and_come_out_sorted() {
        let out = fold(vec![
            ch("b", up(&[("a", Some("1"))])),
            ch("a", ChangeKind::Delete),
            ch("b", upd(&[("a", Some("2"))])),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], ("a".to_string(), RowOp::Delete));
        assert_eq!(out[1].0, "b");
    }

    // ---- Equivalence with applying changes one by one. ----

    const COLS: [&str; 3] = ["a", "b", "c"];
    type Table = BTreeMap<String, Columns>;

    fn null_row() -> Columns {
        COLS.iter().map(|c| (c.to_string(), None)).collect()
    }

    fn apply_change(t: &mut Table, c: &RowChange) {
        match &c.kind {
            ChangeKind::Upsert(m) => t
                .entry(c.key.clone())
                .or_insert_with(null_row)
                .extend(m.clone()),
            ChangeKind::Update(m) => {
                if let Some(row) = t.get_mut(&c.key) {
                    row.extend(m.clone());
                }
            }
            ChangeKind::Delete => {
                t.remove(&c.key);
            }
        }
    }

    pub(crate) fn apply_op(t: &mut Table, key: &str, op: &RowOp) {
        match op {
            RowOp::Delete => {
                t.remove(key);
            }
            RowOp::Update(m) => {
                if let Some(row) = t.get_mut(key) {
                    row.extend(m.clone());
                }
            }
            RowOp::Upsert {
                insert,
                on_conflict,
            } => match (t.get_mut(key), on_conflict) {
                (None, _) => {
                    let mut row = null_row();
                    row.extend(insert.clone());
                    t.insert(key.to_string(), row);
                }
                (Some(row), Conflict::Set(m)) => row.extend(m.clone()),
                (Some(row), Conflict::Replace) => {
                    *row = null_row();
                    row.extend(insert.clone());
                }
            },
        }
    }

    /// Small deterministic generator (xorshift) so failures reproduce.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    pub(crate) fn random_change(rng: &mut Rng, keys: u64) -> RowChange {
        let key = format!("k{}", rng.below(keys));
        let mut m = Columns::new();
        for c in COLS {
            if rng.below(2) == 0 {
                let v = match rng.below(4) {
                    0 => None,
                    n => Some(format!("{c}{n}-{}", rng.below(100))),
                };
                m.insert(c.to_string(), v);
            }
        }
        let kind = match rng.below(3) {
            0 => ChangeKind::Upsert(m),
            1 => ChangeKind::Update(m),
            _ => ChangeKind::Delete,
        };
        RowChange { key, kind }
    }

    fn initial_table(rng: &mut Rng, keys: u64) -> Table {
        let mut t = Table::new();
        for k in 0..keys {
            if rng.below(2) == 0 {
                let mut row = null_row();
                row.insert("a".into(), Some(format!("init{k}")));
                t.insert(format!("k{k}"), row);
            }
        }
        t
    }

    #[test]
    fn folded_ops_equal_sequential_application_for_generated_batches() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..5000 {
            let keys = 1 + rng.below(3);
            let len = rng.below(8) as usize;
            let changes: Vec<RowChange> = (0..len).map(|_| random_change(&mut rng, keys)).collect();
            let start = initial_table(&mut rng, keys);

            let mut expected = start.clone();
            for c in &changes {
                apply_change(&mut expected, c);
            }
            let mut actual = start.clone();
            let ops = fold(changes.clone());
            for (key, op) in &ops {
                apply_op(&mut actual, key, op);
            }
            assert_eq!(
                actual, expected,
                "changes {changes:?} folded to {ops:?} from {start:?}"
            );
        }
    }

    #[test]
    fn every_start_state_is_covered_for_one_key() {
        // Exhaustive over all sequences of up to four changes drawn from a
        // small alphabet, against both an existing and an absent row.
        let alphabet = [
            up(&[("a", Some("1"))]),
            up(&[("b", Some("2"))]),
            upd(&[("a", Some("3"))]),
            upd(&[("c", None)]),
            ChangeKind::Delete,
        ];
        let mut seqs: Vec<Vec<ChangeKind>> = vec![vec![]];
        let mut level: Vec<Vec<ChangeKind>> = vec![vec![]];
        for _ in 0..4 {
            level = level
                .iter()
                .flat_map(|s| {
                    alphabet.iter().map(move |c| {
                        let mut s = s.clone();
                        s.push(c.clone());
                        s
                    })
                })
                .collect();
            seqs.extend(level.iter().cloned());
        }
        assert_eq!(seqs.len(), 1 + 5 + 25 + 125 + 625);
        for seq in seqs {
            for existed in [false, true] {
                let mut start = Table::new();
                if existed {
                    let mut row = null_row();
                    row.insert("b".into(), Some("old".into()));
                    row.insert("c".into(), Some("old".into()));
                    start.insert("k".into(), row);
                }
                let changes: Vec<RowChange> = seq.iter().cloned().map(|k| ch("k", k)).collect();
                let mut expected = start.clone();
                for c in &changes {
                    apply_change(&mut expected, c);
                }
                let mut actual = start.clone();
                for (key, op) in fold(changes) {
                    apply_op(&mut actual, &key, &op);
                }
                assert_eq!(actual, expected, "{seq:?}, existed: {existed}");
            }
        }
    }
}
