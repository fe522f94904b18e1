//! A short hash that stays the same across builds, platforms and Rust
//! versions (FNV-1a, 64 bits), for names derived from other names (long
//! index and Job names) and for digests of specs stored in the cluster: an
//! upgrade must not make them change.

use std::hash::Hasher;

pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(bytes);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_64() {
        // Published FNV-1a test vectors.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
