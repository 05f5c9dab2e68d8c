//! quiesce's benchmarks, kept out of the library: each runs quiesce's own code (through the
//! `quiesce` crate's public API) beside a baseline measured in the same run on the same
//! machine (dd, a plain QMP migrate, libvirt, `qemu-img compare`, a sequential read), and
//! prints the ratios. None asserts a wall-clock time. The `quiesce-bench` binary
//! (`src/main.rs`) is their command line.
//!
//! The libvirt driver the comparisons need ([`libvirt`]) lives here, not in the library:
//! nothing but a benchmark has a use for it.

#![deny(unsafe_code)]

pub mod blockcmp;
pub mod dd;
pub mod disk;
pub mod fill;
pub mod freeze;
pub mod libvirt;
pub mod manifest;
pub mod saved_state;
pub mod set_load;
pub mod stats;
pub mod suite;

/// The deterministic generator the disk benchmarks fill their files with. One copy serves
/// the harness's tests and these benchmarks; it lives with the tests, which are the other
/// user, since the library itself has no use for it.
#[path = "../../harness/tests/common/rng.rs"]
pub mod rng;
