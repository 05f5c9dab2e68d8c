//! quiesce: reproduces VM backup scenarios on QEMU and proves that what it restores is right.
//!
//! The crate is in layers, lowest first; each module uses only modules of lower layers, so
//! no import cycle can form (the `layers` test checks every `crate::` path against this
//! table, and DEVELOPERS.md has the same one):
//!
//! | layer | module | holds |
//! |---|---|---|
//! | 0 | [`sys`] | the processes quiesce starts (process groups, pidfds, a deadline on every wait, `Tool` for helper programs), shell quoting, and every deadline (`sys::deadline`); the crate's only `unsafe` |
//! | 1 | [`qemu`] | the `Machine` guard, launch config, accelerator and capability probes, QMP and guest-agent clients, guest-exec |
//! | 2 | [`image`] | guest image recipes and their cache, seeded disks (ext4, FAT, NTFS), partition tables, `qemu-img`, file manifests (ext4 and NTFS read in pure Rust) |
//! | 3 | [`backup`] | the two methods, the six conditions, backup sets and their phases, run state, the backup folder and its manifest |
//! | 4 | [`verify`] | restore (to a new VM, or in place), block-level compare, checks inside a restored guest, deliberate corruption |
//! | 5 | [`scenario`] | the scenario format, the runner (`scenario/run/`), reports and fixtures |
//! | 6 | [`report`] | views of the JSON reports for people and CI: the JUnit file, the HTML page with SVG timelines, the summary table |
//! | 7 | `cli` | the `quiesce` binary (`src/main.rs` and `src/cli/`), over this library, and its progress line |
//!
//! Shared, beside the layers:
//!
//! - [`timeline`] and [`interrupt`] (layer 0, using nothing of the crate): every layer
//!   records its steps on the run's timeline (reports and fixtures are views of it), and
//!   races work that must not be left half-done against the run's interruption.
//! - [`workload`] (layer 2, over `qemu`): the guest workloads that make a backup's
//!   correctness visible (the RAM counter, the journal, the transactional app).
//! - [`testguest`] (layer 3, over `image` and `qemu`): boots quiesce's own Linux test guest.
//! - [`windows`] (layer 4, over `image`, `qemu` and `backup`): builds a Windows test guest's
//!   image from the user's ISOs, and tells when a Windows guest is ready for VSS.
//!
//! The benchmarks are a crate of their own (`bench/`, `quiesce-bench`) over this library's
//! public API; nothing here depends on them.

#![deny(unsafe_code)]

pub mod backup;
pub mod image;
pub mod interrupt;
pub mod qemu;
pub mod report;
pub mod scenario;
pub mod sys;
pub mod testguest;
pub mod timeline;
pub mod verify;
pub mod windows;
pub mod workload;

#[cfg(test)]
mod layers;
