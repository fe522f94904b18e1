//! Folding the changes a batch makes to one key into row operations that
//! have exactly the effect of applying them in order.
//!
//! The projector does not know whether a row exists before it writes, so the
//! fold tracks the outcome for both cases at once: what the changes amount to
//! if the row existed, and what they amount to if it did not. Only four
//! combinations of those two outcomes can arise, and each is expressible as
//! one SQL statement shape.
//!
//! Column operations compose (two additions are one addition of the sum,
//! two minimums one minimum of the smaller, …) where the sum or the order
//! can be computed here exactly as Postgres computes it. Where it cannot
//! (a double added twice to an unknown value, a text minimum, an addition
//! after a maximum) and at every change guarded by a condition on the row,
//! the key's fold is cut: the changes before are written in one round of
//! statements, the rest in later rounds. Rounds run in order in the
//! batch's transaction, each with one bulk statement per shape, so a key
//! cut into several rounds costs statements, not rows.

use std::collections::BTreeMap;

use serde_json::Value;

use eventplane_api::value::{add_values, compare_values};
use eventplane_api::{ColumnOp, ColumnType};

use crate::mapping::{ChangeKind, RowChange};

/// Column values as SQL text; `None` is NULL.
pub type Columns = BTreeMap<String, Option<String>>;

/// Changes to columns, by column.
pub type Patch = BTreeMap<String, Effect>;

/// How one column changes: `op` with an operand as the SQL text of the
/// column's type. Only `Set` has a null operand; an `Append` operand is the
/// JSON array of the values appended, a `Merge` operand a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    pub op: ColumnOp,
    pub ty: ColumnType,
    pub value: Option<String>,
}

/// A condition on the row, from handler `handler` of the spec, with its
/// slot values for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub handler: usize,
    pub params: Vec<Option<String>>,
}

impl Effect {
    pub fn set(ty: ColumnType, value: Option<String>) -> Effect {
        Effect {
            op: ColumnOp::Set,
            ty,
            value,
        }
    }

    fn operand(&self) -> &str {
        self.value.as_deref().unwrap_or("null")
    }

    /// The column's value after this effect when it held `old`; `None`
    /// when that cannot be computed here exactly.
    pub fn apply_to(&self, old: Option<&str>) -> Option<Option<String>> {
        let v = self.operand();
        Some(match (self.op, old) {
            (ColumnOp::Set, _) => self.value.clone(),
            (ColumnOp::SetIfNull, old) => Some(old.unwrap_or(v).to_string()),
            (_, None) => Some(v.to_string()),
            (ColumnOp::Add, Some(o)) => Some(add_values(self.ty, o, v)?),
            (ColumnOp::Min | ColumnOp::Max, Some(o)) => {
                // Text order depends on the column's collation.
                if self.ty == ColumnType::Text {
                    return None;
                }
                let ord = compare_values(self.ty, v, o)?;
                // LEAST and GREATEST keep the earlier of two equal values.
                let replace = match self.op {
                    ColumnOp::Min => ord.is_lt(),
                    _ => ord.is_gt(),
                };
                Some(if replace { v } else { o }.to_string())
            }
            (ColumnOp::Append, Some(o)) => {
                let mut items = match serde_json::from_str::<Value>(o).ok()? {
                    Value::Array(items) => items,
                    _ => Vec::new(),
                };
                let Value::Array(more) = serde_json::from_str(v).ok()? else {
                    return None;
                };
                items.extend(more);
                Some(Value::Array(items).to_string())
            }
            (ColumnOp::Merge, Some(o)) => {
                let mut object = match serde_json::from_str::<Value>(o).ok()? {
                    Value::Object(m) => m,
                    _ => serde_json::Map::new(),
                };
                let Value::Object(more) = serde_json::from_str(v).ok()? else {
                    return None;
                };
                object.extend(more);
                Some(Value::Object(object).to_string())
            }
        })
    }

    /// One effect equal to this one followed by `next` on any value, when
    /// there is one.
    fn then(&self, next: &Effect) -> Option<Effect> {
        let with = |op, value: Option<String>| Effect {
            op,
            ty: self.ty,
            value,
        };
        match (self.op, next.op) {
            (_, ColumnOp::Set) => Some(next.clone()),
            (ColumnOp::Set, _) => Some(with(ColumnOp::Set, next.apply_to(self.value.as_deref())?)),
            // Floating-point addition is not associative.
            (ColumnOp::Add, ColumnOp::Add) if self.ty != ColumnType::Double => Some(with(
                ColumnOp::Add,
                Some(add_values(self.ty, self.operand(), next.operand())?),
            )),
            (ColumnOp::Min, ColumnOp::Min)
            | (ColumnOp::Max, ColumnOp::Max)
            | (ColumnOp::Append, ColumnOp::Append)
            | (ColumnOp::Merge, ColumnOp::Merge) => {
                Some(with(self.op, next.apply_to(Some(self.operand()))?))
            }
            (ColumnOp::SetIfNull, ColumnOp::SetIfNull) => Some(self.clone()),
            _ => None,
        }
    }
}

/// `patch` followed by `next`, when expressible as one patch.
fn compose(patch: &Patch, next: &Patch) -> Option<Patch> {
    let mut out = patch.clone();
    for (c, e) in next {
        let composed = match out.get(c) {
            None => e.clone(),
            Some(before) => before.then(e)?,
        };
        out.insert(c.clone(), composed);
    }
    Some(out)
}

/// The known row `row` (absent columns are NULL) after `next`.
fn evaluate(row: &Columns, next: &Patch) -> Option<Columns> {
    let mut out = row.clone();
    for (c, e) in next {
        let old = row.get(c).and_then(|v| v.as_deref());
        out.insert(c.clone(), e.apply_to(old)?);
    }
    Some(out)
}

/// What a key's changes amount to in a batch: one operation per round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOp {
    /// Delete the row if it exists.
    Delete,
    /// Change these columns if the row exists.
    Update(Patch),
    /// Insert `insert` (other columns NULL) if the row is absent; otherwise
    /// apply `on_conflict`.
    Upsert {
        insert: Columns,
        on_conflict: Conflict,
    },
    /// The operation, only where the guard holds on the row (for the
    /// insert of an upsert: on a row of nulls).
    Guarded(Guard, Box<RowOp>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// Change only these columns (empty: leave the row as it is).
    Set(Patch),
    /// The row was deleted and re-created in the batch: every non-key column
    /// takes the insert value or NULL.
    Replace,
}

/// The pair (outcome if the row existed, outcome if it was absent),
/// restricted to the combinations that can occur.
#[derive(Debug, Clone)]
enum State {
    /// Existed: patched with the map. Absent: still absent. Only updates so far.
    Updated(Patch),
    /// Existed: patched with `patch`. Absent: created with `row`.
    Upserted { patch: Patch, row: Columns },
    /// Existed or not, the row is gone.
    Deleted,
    /// Existed: replaced by the map. Absent: created with the same map.
    Recreated(Columns),
}

impl State {
    fn fresh() -> State {
        State::Updated(Patch::new())
    }

    /// The state after `change`; `None` when it cannot be folded in.
    fn apply(&self, change: &ChangeKind) -> Option<State> {
        let absent = Columns::new();
        Some(match (self, change) {
            (_, ChangeKind::Delete) => State::Deleted,
            (State::Updated(p), ChangeKind::Update(c)) => State::Updated(compose(p, c)?),
            (State::Updated(p), ChangeKind::Upsert(c)) => State::Upserted {
                patch: compose(p, c)?,
                row: evaluate(&absent, c)?,
            },
            (State::Upserted { patch, row }, ChangeKind::Update(c) | ChangeKind::Upsert(c)) => {
                State::Upserted {
                    patch: compose(patch, c)?,
                    row: evaluate(row, c)?,
                }
            }
            (State::Deleted, ChangeKind::Update(_)) => State::Deleted,
            (State::Deleted, ChangeKind::Upsert(c)) => State::Recreated(evaluate(&absent, c)?),
            (State::Recreated(m), ChangeKind::Update(c) | ChangeKind::Upsert(c)) => {
                State::Recreated(evaluate(m, c)?)
            }
        })
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

/// The operation of a change that must be applied on its own.
fn guarded(guard: Guard, change: ChangeKind) -> Option<RowOp> {
    let op = match change {
        ChangeKind::Delete => RowOp::Delete,
        ChangeKind::Update(p) if p.is_empty() => return None,
        ChangeKind::Update(p) => RowOp::Update(p),
        ChangeKind::Upsert(p) => RowOp::Upsert {
            insert: evaluate(&Columns::new(), &p)?,
            on_conflict: Conflict::Set(p),
        },
    };
    Some(RowOp::Guarded(guard, Box::new(op)))
}

/// A batch folded: rounds of operations, each with at most one operation
/// per key, ordered by key. Round `i + 1` runs after round `i`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Folded {
    pub rounds: Vec<Vec<(String, RowOp)>>,
}

impl Folded {
    /// Every key written or deleted, once, in order.
    pub fn keys(&self) -> Vec<String> {
        let keys: std::collections::BTreeSet<&String> =
            self.rounds.iter().flatten().map(|(k, _)| k).collect();
        keys.into_iter().cloned().collect()
    }
}

#[derive(Default)]
struct KeyFold {
    done: Vec<RowOp>,
    state: Option<State>,
}

impl KeyFold {
    fn cut(&mut self) {
        if let Some(op) = self.state.take().and_then(State::into_op) {
            self.done.push(op);
        }
    }
}

/// Folds changes, in event order, into as few rounds of one operation per
/// key as the changes allow. Keys whose changes have no effect (only empty
/// updates) are left out.
pub fn fold(changes: impl IntoIterator<Item = RowChange>) -> Folded {
    let mut keys: BTreeMap<String, KeyFold> = BTreeMap::new();
    for change in changes {
        let k = keys.entry(change.key).or_default();
        if let Some(guard) = change.guard {
            k.cut();
            k.done.extend(guarded(guard, change.kind));
            continue;
        }
        let state = k.state.take().unwrap_or_else(State::fresh);
        k.state = Some(match state.apply(&change.kind) {
            Some(next) => next,
            None => {
                k.state = Some(state);
                k.cut();
                State::fresh()
                    .apply(&change.kind)
                    .expect("every change folds into a fresh state")
            }
        });
    }
    let mut rounds: Vec<Vec<(String, RowOp)>> = Vec::new();
    for (key, mut k) in keys {
        k.cut();
        for (i, op) in k.done.into_iter().enumerate() {
            if rounds.len() <= i {
                rounds.push(Vec::new());
            }
            rounds[i].push((key.clone(), op));
        }
    }
    Folded { rounds }
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

    /// Text columns set to the values.
    pub(crate) fn set(pairs: &[(&str, Option<&str>)]) -> Patch {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Effect::set(ColumnType::Text, v.map(str::to_string)),
                )
            })
            .collect()
    }

    fn ch(key: &str, kind: ChangeKind) -> RowChange {
        RowChange {
            key: key.into(),
            kind,
            guard: None,
        }
    }

    fn up(pairs: &[(&str, Option<&str>)]) -> ChangeKind {
        ChangeKind::Upsert(set(pairs))
    }

    fn upd(pairs: &[(&str, Option<&str>)]) -> ChangeKind {
        ChangeKind::Update(set(pairs))
    }

    /// The operations of a single key, round by round.
    fn fold1(kinds: Vec<ChangeKind>) -> Vec<RowOp> {
        fold(kinds.into_iter().map(|k| ch("k", k)))
            .rounds
            .into_iter()
            .flatten()
            .map(|(_, op)| op)
            .collect()
    }

    #[test]
    fn single_changes_map_directly() {
        assert_eq!(
            fold1(vec![up(&[("a", Some("1"))])]),
            [RowOp::Upsert {
                insert: cols(&[("a", Some("1"))]),
                on_conflict: Conflict::Set(set(&[("a", Some("1"))])),
            }]
        );
        assert_eq!(
            fold1(vec![upd(&[("a", None)])]),
            [RowOp::Update(set(&[("a", None)]))]
        );
        assert_eq!(fold1(vec![ChangeKind::Delete]), [RowOp::Delete]);
    }

    #[test]
    fn empty_updates_produce_nothing() {
        assert_eq!(fold1(vec![upd(&[]), upd(&[])]), []);
        assert!(fold(Vec::new()).rounds.is_empty());
    }

    #[test]
    fn update_then_upsert_patches_more_than_it_inserts() {
        assert_eq!(
            fold1(vec![upd(&[("a", Some("1"))]), up(&[("b", Some("2"))])]),
            [RowOp::Upsert {
                insert: cols(&[("b", Some("2"))]),
                on_conflict: Conflict::Set(set(&[("a", Some("1")), ("b", Some("2"))])),
            }]
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

    fn eff(op: ColumnOp, ty: ColumnType, v: &str) -> Effect {
        Effect {
            op,
            ty,
            value: Some(v.to_string()),
        }
    }

    fn patch(c: &str, e: Effect) -> Patch {
        [(c.to_string(), e)].into_iter().collect()
    }

    #[test]
    fn additions_fold_into_one_sum_and_counts_a_new_row() {
        let add =
            |v: &str| ChangeKind::Upsert(patch("n", eff(ColumnOp::Add, ColumnType::Numeric, v)));
        assert_eq!(
            fold1(vec![add("1.50"), add("2.5"), add("-1")]),
            [RowOp::Upsert {
                insert: cols(&[("n", Some("3.00"))]),
                on_conflict: Conflict::Set(patch(
                    "n",
                    eff(ColumnOp::Add, ColumnType::Numeric, "3.00")
                )),
            }]
        );
    }

    #[test]
    fn what_cannot_be_composed_is_cut_into_rounds() {
        let d = |v: &str| ChangeKind::Update(patch("d", eff(ColumnOp::Add, ColumnType::Double, v)));
        assert_eq!(fold1(vec![d("0.1"), d("0.2")]).len(), 2);
        let t = |op, v: &str| ChangeKind::Update(patch("t", eff(op, ColumnType::Text, v)));
        assert_eq!(
            fold1(vec![t(ColumnOp::Min, "a"), t(ColumnOp::Min, "b")]).len(),
            2
        );
        let n = |op, v: &str| ChangeKind::Update(patch("n", eff(op, ColumnType::Bigint, v)));
        assert_eq!(
            fold1(vec![
                n(ColumnOp::Min, "3"),
                n(ColumnOp::Min, "2"),
                n(ColumnOp::Add, "1")
            ]),
            [
                RowOp::Update(patch("n", eff(ColumnOp::Min, ColumnType::Bigint, "2"))),
                RowOp::Update(patch("n", eff(ColumnOp::Add, ColumnType::Bigint, "1"))),
            ]
        );
        let mut guarded = ch("k", upd(&[("a", Some("x"))]));
        guarded.guard = Some(Guard {
            handler: 0,
            params: vec![None],
        });
        let f = fold(vec![
            ch("k", upd(&[("b", Some("1"))])),
            guarded,
            ch("j", ChangeKind::Delete),
        ]);
        assert_eq!(f.rounds.len(), 2);
        assert_eq!(f.rounds[0].len(), 2, "other keys share the first round");
        assert!(matches!(f.rounds[1][0].1, RowOp::Guarded(..)));
        assert_eq!(f.keys(), ["j", "k"]);
    }

    // ---- Equivalence with applying changes one by one. ----

    /// a: text (set, setIfNull); n: bigint (set, add, min, max); d: double
    /// (add); j: jsonb (set, append, merge).
    const COLS: [&str; 4] = ["a", "d", "j", "n"];
    type Table = BTreeMap<String, Columns>;

    pub(crate) fn null_row() -> Columns {
        ["a", "b", "c", "d", "j", "n"]
            .iter()
            .map(|c| (c.to_string(), None))
            .collect()
    }

    /// The model of one effect, written independently of `Effect`.
    fn model(e: &Effect, old: Option<&str>) -> Option<String> {
        let v = e.value.as_deref();
        let json = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        match e.op {
            ColumnOp::Set => v.map(str::to_string),
            ColumnOp::SetIfNull => old.or(v).map(str::to_string),
            ColumnOp::Add if e.ty == ColumnType::Double => {
                let sum = old.map_or(0.0, |o| o.parse::<f64>().unwrap())
                    + v.unwrap().parse::<f64>().unwrap();
                Some(format!("{sum:?}"))
            }
            ColumnOp::Add => Some(
                (old.map_or(0, |o| o.parse::<i64>().unwrap()) + v.unwrap().parse::<i64>().unwrap())
                    .to_string(),
            ),
            ColumnOp::Min | ColumnOp::Max => {
                let v: i64 = v.unwrap().parse().unwrap();
                let r = match old.map(|o| o.parse::<i64>().unwrap()) {
                    None => v,
                    Some(o) if e.op == ColumnOp::Min => o.min(v),
                    Some(o) => o.max(v),
                };
                Some(r.to_string())
            }
            ColumnOp::Append => {
                let Value::Array(more) = json(v.unwrap()) else {
                    panic!()
                };
                let mut items = match old.map(json) {
                    Some(Value::Array(a)) => a,
                    _ => vec![],
                };
                items.extend(more);
                Some(Value::Array(items).to_string())
            }
            ColumnOp::Merge => {
                let Value::Object(more) = json(v.unwrap()) else {
                    panic!()
                };
                let mut m = match old.map(json) {
                    Some(Value::Object(m)) => m,
                    _ => Default::default(),
                };
                m.extend(more);
                Some(Value::Object(m).to_string())
            }
        }
    }

    fn patch_row(row: &mut Columns, p: &Patch) {
        for (c, e) in p {
            let new = model(e, row[c].as_deref());
            row.insert(c.clone(), new);
        }
    }

    /// The test guard: `a = param`, or `a IS NULL` for a null param.
    fn guard_holds(g: &Guard, row: &Columns) -> bool {
        match &g.params[0] {
            None => row["a"].is_none(),
            Some(x) => row["a"].as_ref() == Some(x),
        }
    }

    fn apply_change(t: &mut Table, c: &RowChange) {
        let row = t.get(&c.key).cloned();
        if let Some(g) = &c.guard
            && !guard_holds(g, row.as_ref().unwrap_or(&null_row()))
        {
            return;
        }
        match (&c.kind, row) {
            (ChangeKind::Upsert(p), row) => {
                let mut row = row.unwrap_or_else(null_row);
                patch_row(&mut row, p);
                t.insert(c.key.clone(), row);
            }
            (ChangeKind::Update(p), Some(mut row)) => {
                patch_row(&mut row, p);
                t.insert(c.key.clone(), row);
            }
            (ChangeKind::Update(_), None) => {}
            (ChangeKind::Delete, _) => {
                t.remove(&c.key);
            }
        }
    }

    pub(crate) fn apply_op(t: &mut Table, key: &str, op: &RowOp) {
        match op {
            RowOp::Guarded(g, op) => {
                let holds = guard_holds(g, t.get(key).unwrap_or(&null_row()));
                if holds {
                    apply_op(t, key, op);
                }
            }
            RowOp::Delete => {
                t.remove(key);
            }
            RowOp::Update(m) => {
                if let Some(row) = t.get_mut(key) {
                    patch_row(row, m);
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
                (Some(row), Conflict::Set(m)) => patch_row(row, m),
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

    /// A change of text columns a, b, c that sets them.
    pub(crate) fn random_change(rng: &mut Rng, keys: u64) -> RowChange {
        let key = format!("k{}", rng.below(keys));
        let mut m = Patch::new();
        for c in ["a", "b", "c"] {
            if rng.below(2) == 0 {
                let v = match rng.below(4) {
                    0 => None,
                    n => Some(format!("{c}{n}-{}", rng.below(100))),
                };
                m.insert(c.to_string(), Effect::set(ColumnType::Text, v));
            }
        }
        let kind = match rng.below(3) {
            0 => ChangeKind::Upsert(m),
            1 => ChangeKind::Update(m),
            _ => ChangeKind::Delete,
        };
        RowChange {
            key,
            kind,
            guard: None,
        }
    }

    fn random_effect(rng: &mut Rng, c: &str) -> Effect {
        let small = |rng: &mut Rng| (rng.below(11) as i64 - 5).to_string();
        let (op, ty, value) = match (c, rng.below(4)) {
            ("a", 0) => (
                ColumnOp::SetIfNull,
                ColumnType::Text,
                Some(format!("x{}", rng.below(3))),
            ),
            ("a", 1) => (ColumnOp::Set, ColumnType::Text, None),
            ("a", _) => (
                ColumnOp::Set,
                ColumnType::Text,
                Some(format!("x{}", rng.below(3))),
            ),
            ("n", 0) => (ColumnOp::Add, ColumnType::Bigint, Some(small(rng))),
            ("n", 1) => (ColumnOp::Min, ColumnType::Bigint, Some(small(rng))),
            ("n", 2) => (ColumnOp::Max, ColumnType::Bigint, Some(small(rng))),
            ("n", _) => (ColumnOp::Set, ColumnType::Bigint, Some(small(rng))),
            ("d", 0) => (ColumnOp::Set, ColumnType::Double, Some("0.1".into())),
            ("d", _) => {
                let v = ["0.1", "0.2", "0.3", "1e16", "-1e16", "1.0"][rng.below(6) as usize];
                (ColumnOp::Add, ColumnType::Double, Some(v.into()))
            }
            ("j", 0) => (
                ColumnOp::Append,
                ColumnType::Jsonb,
                Some(format!("[{}]", rng.below(5))),
            ),
            ("j", 1) => (
                ColumnOp::Merge,
                ColumnType::Jsonb,
                Some(format!("{{\"k{}\": {}}}", rng.below(3), rng.below(5))),
            ),
            ("j", 2) => (
                ColumnOp::Set,
                ColumnType::Jsonb,
                Some(["[1]", "{\"k0\": 9}", "5"][rng.below(3) as usize].into()),
            ),
            (_, _) => (ColumnOp::Set, ColumnType::Jsonb, None),
        };
        Effect { op, ty, value }
    }

    fn random_aggregate_change(rng: &mut Rng, keys: u64) -> RowChange {
        let key = format!("k{}", rng.below(keys));
        let mut m = Patch::new();
        for c in COLS {
            if rng.below(2) == 0 {
                m.insert(c.to_string(), random_effect(rng, c));
            }
        }
        let kind = match rng.below(5) {
            0 | 1 => ChangeKind::Upsert(m),
            2 | 3 => ChangeKind::Update(m),
            _ => ChangeKind::Delete,
        };
        let guard = (rng.below(5) == 0).then(|| Guard {
            handler: 0,
            params: vec![match rng.below(3) {
                0 => None,
                n => Some(format!("x{n}")),
            }],
        });
        RowChange { key, kind, guard }
    }

    fn initial_table(rng: &mut Rng, keys: u64) -> Table {
        let mut t = Table::new();
        for k in 0..keys {
            if rng.below(2) == 0 {
                let mut row = null_row();
                if rng.below(2) == 0 {
                    row.insert("a".into(), Some(format!("x{}", rng.below(3))));
                }
                row.insert("n".into(), Some(format!("{}", rng.below(7))));
                row.insert("d".into(), Some("0.7".into()));
                row.insert(
                    "j".into(),
                    Some(["[0]", "{\"k1\": 1}", "3"][rng.below(3) as usize].into()),
                );
                t.insert(format!("k{k}"), row);
            }
        }
        t
    }

    fn check(generate: fn(&mut Rng, u64) -> RowChange, seed: u64, runs: usize, max_len: u64) {
        let mut rng = Rng(seed);
        for _ in 0..runs {
            let keys = 1 + rng.below(3);
            let len = rng.below(max_len) as usize;
            let changes: Vec<RowChange> = (0..len).map(|_| generate(&mut rng, keys)).collect();
            let start = initial_table(&mut rng, keys);
            let mut expected = start.clone();
            for c in &changes {
                apply_change(&mut expected, c);
            }
            let mut actual = start.clone();
            let folded = fold(changes.clone());
            for round in &folded.rounds {
                for (key, op) in round {
                    apply_op(&mut actual, key, op);
                }
            }
            // jsonb compares as JSON.
            let norm = |t: Table| -> BTreeMap<String, BTreeMap<String, Option<Value>>> {
                t.into_iter()
                    .map(|(k, row)| {
                        let row = row
                            .into_iter()
                            .map(|(c, v)| {
                                let v = v.map(|v| {
                                    if c == "j" {
                                        serde_json::from_str(&v).unwrap()
                                    } else {
                                        Value::String(v)
                                    }
                                });
                                (c, v)
                            })
                            .collect();
                        (k, row)
                    })
                    .collect()
            };
            let (actual, expected) = (norm(actual), norm(expected));
            assert_eq!(
                actual, expected,
                "changes {changes:?} folded to {folded:?} from {start:?}"
            );
        }
    }

    #[test]
    fn folded_ops_equal_sequential_application_for_generated_batches() {
        check(random_change, 0x9E37_79B9_7F4A_7C15, 5000, 8);
    }

    #[test]
    fn folded_aggregates_and_guards_equal_sequential_application() {
        check(random_aggregate_change, 0x51CE_D00D_1234_5678, 20_000, 12);
    }
}
