//! Benchmarks. Each prints ratios against baselines measured in the same run on the same
//! machine; none asserts a wall-clock time.

pub mod blockcmp;
pub mod dd;
pub mod fill;
pub mod freeze;
pub mod libvirt;
pub mod manifest;
pub mod rng;
pub mod saved_state;
