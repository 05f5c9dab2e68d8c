//! The tests that boot no guest (images made by qemu-img, the `quiesce` binary's errors,
//! reports, Windows disks and images built from stubs), in one test binary: linked once,
//! and their tests run in one pool of threads instead of one binary after another. The
//! three `cli` tests that boot a guest (and two that start QEMU) run with `vm-tests` only.
//!
//! Run one module's tests by its path: `cargo test --test host blockcmp::`.
//!
//! The fuzz tests stay a binary of their own (`tests/fuzz`): their counting allocator and
//! panic hook are process-wide, and would count what the tests beside them do.

#[path = "../common/mod.rs"]
mod common;

mod blockcmp;
mod cli;
mod manifest;
mod report;
mod windows_disk;
mod windows_image;
