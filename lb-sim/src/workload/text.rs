//! Deterministic filler text of a given size in tokens.
//!
//! Sizes assume the simulator's stand-in tokenizer at its default 4 characters per token
//! (`--chars-per-token 4`): `take(n)` returns exactly `4 n` ASCII characters. Each
//! [`Words`] source is a stream: consecutive `take`s continue it, and two sources with the
//! same seed give the same text (that is how agents share a role prompt across workflows).

use super::Rng;

/// Characters per token the sizes are computed for (the simulator's default).
pub const CHARS_PER_TOKEN: usize = 4;

const LETTERS: &[u8] = b"etaoinshrdlucmfwypvbgkqjxz";

/// FNV-1a of some bytes (seeds derived from names).
pub fn fnv(bytes: &[u8]) -> u64 {
    crate::tokenizer::fnv1a64(bytes)
}

/// A stream of pseudo-random words.
#[derive(Debug, Clone)]
pub struct Words {
    rng: Rng,
}

impl Words {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
        }
    }

    /// The next `tokens × 4` characters of the stream: lowercase words and single spaces.
    pub fn take(&mut self, tokens: usize) -> String {
        let len = tokens * CHARS_PER_TOKEN;
        let mut out = String::with_capacity(len + 12);
        while out.len() < len {
            let bits = self.rng.next_u64();
            let n = 2 + (bits % 8) as usize;
            for i in 0..n {
                let idx = ((bits >> (8 + 5 * i)) & 0x1f) as usize % LETTERS.len();
                out.push(char::from(LETTERS[idx]));
            }
            out.push(' ');
        }
        out.truncate(len);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_determinism() {
        let mut a = Words::new(7);
        let mut b = Words::new(7);
        let x = a.take(100);
        assert_eq!(x.len(), 400);
        assert_eq!(x, b.take(100));
        assert_ne!(a.take(10), Words::new(8).take(10));
        assert!(x.bytes().all(|c| c == b' ' || c.is_ascii_lowercase()));
        assert_eq!(Words::new(1).take(0), "");
    }
}
