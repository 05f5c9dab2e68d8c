//! A tiny deterministic generator (xorshift64): the same files every run, data nothing
//! compresses, and a failing test case that can be replayed.
//!
//! The one copy in the workspace: the tests use it as `common::rng`, and the benchmarks
//! (`bench/`, which fill their images with it) include this file by path. Keep it free of
//! `use super::...` so it compiles in both places.

pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
