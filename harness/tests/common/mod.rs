//! Shared by the end-to-end tests: boot the real Linux test guest under the accelerator
//! `auto` picks (TCG on these machines, KVM on a runner where it works).

#![allow(dead_code)]

pub mod bootdisk;
pub mod rng;
pub mod state;
pub mod watch;

use std::path::PathBuf;

use quiesce::qemu::{DiskConfig, DiskFormat};
use quiesce::testguest::{self, GuestOptions, TestGuest};

pub fn artifacts() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("quiesce-artifacts")
}

pub fn options(name: &str) -> GuestOptions {
    let mut o = GuestOptions::named(name);
    o.artifacts_dir = Some(artifacts());
    o
}

pub async fn boot(name: &str) -> TestGuest {
    boot_with(options(name)).await
}

/// Options for a 256 MiB guest with one data disk, whose serial (and node name) is "data".
pub fn with_data_disk(name: &str, path: PathBuf, format: DiskFormat) -> GuestOptions {
    let mut o = options(name);
    o.memory_mib = 256;
    o.extra_disks.push(DiskConfig { node_name: "data".into(), path, format, read_only: false });
    o
}

pub async fn boot_with(opts: GuestOptions) -> TestGuest {
    match testguest::boot(opts, &mut |s| eprintln!("  {s}")).await {
        Ok(g) => g,
        Err(e) => panic!("booting the test guest failed: {e}"),
    }
}

/// True if a process with this pid exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
