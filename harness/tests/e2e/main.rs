//! The end-to-end tests on real guests, behind the `vm-tests` feature: one test binary whose
//! modules were each a test binary of their own. cargo runs test binaries one after another,
//! and most held one or two tests, so on a 2-core machine one core idled for most of their
//! time and each was linked on its own; here libtest runs all their tests in one pool of
//! threads (`--test-threads`, by default one per core) and the binary is linked once.
//!
//! Run one module's tests by its path: `cargo test --features vm-tests --test e2e agent::`.
//!
//! Tests of different modules now run at the same time: each boots its own guests, QEMUs,
//! libvirtd (in a mount namespace of its own) and temp folders, and names what it looks for
//! by them (a pid, a folder, a domain's name), never by a scan of everything running.

#[path = "../common/mod.rs"]
mod common;
mod hand_started;
mod libvirt_common;

mod agent;
mod child_snapshot;
mod frozen_refusals;
mod guard;
mod journal;
mod killed;
mod libvirt;
mod libvirt_recovery;
mod ntfs;
mod old_qemu;
mod own_image;
mod own_vm;
mod qmp;
mod quiesce_proof;
mod recovery;
mod saved_state;
