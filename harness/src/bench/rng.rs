//! A tiny deterministic generator (xorshift64): the same files every run, data nothing
//! compresses, and a failing test case that can be replayed. Shared by the benchmarks and
//! the tests.

pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
