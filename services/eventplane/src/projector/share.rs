//! How the live projector processes of a database split its projections:
//! rendezvous hashing, so every process computes the same owner for each
//! projection from the same member list, the split is even, and a member
//! joining or leaving moves only the projections it takes or gives up.

use eventplane_plan::stable_hash;

/// The member that should apply `projection`; `None` without members.
pub fn owner<'a>(projection: &str, members: &'a [String]) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|member| (weight(projection, member), member.as_str()))
        .map(String::as_str)
}

/// FNV-1a spreads names that differ only in their last characters poorly
/// (`projector-1`, `projector-2`), so its output goes through the
/// SplitMix64 finalizer, which lets every input bit reach every output bit.
fn weight(projection: &str, member: &str) -> u64 {
    let mut x = stable_hash(format!("{member}\u{0}{projection}").as_bytes());
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("projector-{i}")).collect()
    }

    fn projections(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("projection-{i}")).collect()
    }

    #[test]
    fn every_member_computes_the_same_owner_whatever_the_order() {
        let m = members(3);
        let mut reversed = m.clone();
        reversed.reverse();
        for p in projections(50) {
            assert_eq!(owner(&p, &m), owner(&p, &reversed));
        }
        assert_eq!(owner("orders", &[]), None);
    }

    #[test]
    fn the_split_is_even() {
        let m = members(3);
        let ps = projections(300);
        for member in &m {
            let mine = ps
                .iter()
                .filter(|p| owner(p, &m) == Some(member.as_str()))
                .count();
            assert!((70..=130).contains(&mine), "{member} owns {mine} of 300");
        }
    }

    #[test]
    fn a_member_leaving_moves_only_its_own_projections() {
        let before = members(3);
        let after: Vec<String> = before[..2].to_vec();
        for p in projections(100) {
            let was = owner(&p, &before).unwrap();
            if was != "projector-2" {
                assert_eq!(owner(&p, &after), Some(was), "{p} moved");
            }
        }
    }
}
