//! Rollback cycles of a Windows VM (`scenarios/windows/win-rollback-cycles.toml`) through
//! the REAL runner: Child VM Snapshot and Saved State in turn, each restored to a new VM
//! and in place onto the VM's own disks, verified block by block and file by file.
//!
//! A SCRIPTED PEER STANDS IN FOR WINDOWS, because no Windows guest can run here (see
//! `windows_tests.rs`). QEMU, the backups, both restores, the block comparisons and the
//! NTFS manifests are real. The peer cannot write a disk QEMU holds, so the cycle's changes
//! to the data disk (asked of "Windows" by the runner's PowerShell) are written by the test
//! when that machine powers off: with ntfs-3g, through FUSE, into the image QEMU has let go
//! of. What reads the disk next sees what a guest that wrote and powered off would have
//! left. This needs FUSE (`/dev/fuse`, ntfs-3g): the test says so if the mount fails.
//! Never tried this way: the PowerShell itself, `Write-VolumeCache`, and whether Windows'
//! own NTFS writes read back as these do.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use super::windows_peer::{passed, run_with_peer, windows_scenario, GuestWrite, Peer};
use crate::qemu::stand_in::PowerOff;
use crate::qemu::{DiskFormat, MachineConfig};
use crate::scenario;

/// Runs a helper under a deadline (every wait has one); panics with its words if it fails.
fn run(secs: u32, program: &str, args: &[&str]) {
    let out = Command::new("timeout").arg(secs.to_string()).arg(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `writes` into the NTFS data disk at `image`: converted to raw, mounted with
/// ntfs-3g (FUSE), changed, unmounted, and written back into the image.
fn write_into(image: &Path, format: DiskFormat, writes: &[GuestWrite]) {
    let tmp = tempfile::tempdir().unwrap();
    let (raw, mnt) = (tmp.path().join("disk.raw"), tmp.path().join("mnt"));
    std::fs::create_dir(&mnt).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let fmt = format.driver();
    run(120, "qemu-img", &["convert", "-f", fmt, "-O", "raw", &s(image), &s(&raw)]);
    run(30, "ntfs-3g", &[&s(&raw), &s(&mnt)]);
    let applied = std::panic::catch_unwind(|| {
        for w in writes {
            match w {
                GuestWrite::Create(p, text) => std::fs::write(mnt.join(p), text).unwrap(),
                GuestWrite::Append(p, text) => {
                    use std::io::Write;
                    let mut f = std::fs::OpenOptions::new().append(true).open(mnt.join(p)).unwrap();
                    f.write_all(text.as_bytes()).unwrap();
                }
                GuestWrite::Remove(p) => std::fs::remove_file(mnt.join(p)).unwrap(),
                GuestWrite::Mkdir(p) => std::fs::create_dir(mnt.join(p)).unwrap(),
            }
        }
    });
    run(30, "fusermount", &["-u", &s(&mnt)]);
    applied.unwrap();
    run(120, "qemu-img", &["convert", "-n", "-f", "raw", "-O", fmt, &s(&raw), &s(image)]);
}

/// The power-off hook: what the peer's guest on that machine was asked to write goes onto
/// its data disk (`D:` is its first disk after `root`).
pub(super) fn power_off(peer: Arc<Mutex<Peer>>) -> PowerOff {
    Arc::new(move |cfg: &MachineConfig| {
        let writes = peer.lock().unwrap().pending.remove(&cfg.name).unwrap_or_default();
        if writes.is_empty() {
            return;
        }
        let d = cfg.disks.iter().find(|d| d.node_name != "root").expect("a data disk");
        write_into(&d.path, d.format, &writes);
    })
}

#[test]
fn win_rollback_cycles_restore_to_a_new_vm_and_in_place_by_both_methods() {
    let (path, text) = windows_scenario("win-rollback-cycles.toml");
    // Two cycles give one of each method; the third would repeat the first.
    let edited = text.replace("cycles = 3", "cycles = 2");
    assert_ne!(edited, text);
    let s = scenario::parse(&path, &edited).unwrap();
    let peer = Arc::new(Mutex::new(Peer::new()));
    let (report, _dir) = run_with_peer(&s, peer.clone());
    assert_eq!(report.skipped, None);
    assert!(report.passed, "{:#?}", (&report.error, &report.checks));
    for n in 1..=2 {
        for what in ["backup", "mutated", "new-vm-blocks", "new-vm-manifest", "in-place-blocks", "in-place-manifest"] {
            let check = format!("cycle-{n}-{what}");
            assert_eq!(passed(&report, &check), Some(true), "{check}: {:#?}", report.checks);
        }
    }
    assert_eq!(passed(&report, "cycle-1-fs-quiesced"), None, "NTFS cannot be judged: not claimed");
    assert_eq!(passed(&report, "cycle-2-in-place-same-boot"), Some(true), "{:#?}", report.checks);
    assert_eq!(report.vms[0].method.as_deref(), Some("child-snapshot, saved-state"));
    let p = peer.lock().unwrap();
    // Cycle 1 froze for its Child VM Snapshot and for each in-place read; cycle 2 froze for the read.
    assert!(p.freezes >= 3, "{}", p.freezes);
    assert!(p.frozen_at.is_none());
    assert!(p.pending.is_empty(), "every change reached a disk: {:?}", p.pending);
    // Each cycle powered the new VM off, then the VM itself for the in-place restore.
    assert_eq!(p.powered_off, ["win1-restored-1", "win1", "win1-restored-2", "win1"]);
    // The cycle's changes were asked of Windows in PowerShell, on the data disk's letter.
    assert!(p.scripts.iter().any(|s| s.contains("Remove-Item -LiteralPath 'D:\\c.txt'")));
}

#[test]
fn win_child_snapshot_vhdx_restored_files_match_the_backup_point_after_power_off() {
    // The scenario as it is (but for its RAM: see `STAND_IN_RAM_MIB`): its restored guest
    // "powers off" (QEMU quits in the peer's place) before the NTFS manifests are compared
    // on the host.
    let (path, text) = windows_scenario("win-child-snapshot-vhdx.toml");
    let s = scenario::parse(&path, &text).unwrap();
    let mut p = Peer::new();
    p.files.insert("D:\\hello.txt".into(), "hello\n".into());
    p.files.insert("D:\\report.txt".into(), "quarterly numbers\n".into());
    let peer = Arc::new(Mutex::new(p));
    let (report, _dir) = run_with_peer(&s, peer.clone());
    assert!(report.passed, "{:#?}", (&report.error, &report.checks));
    for check in ["blocks-match-backup", "files-match-seed", "manifest-matches-backup data"] {
        assert_eq!(passed(&report, check), Some(true), "{check}: {:#?}", report.checks);
    }
    assert_eq!(report.vms[0].backup_disks.iter().find(|d| d.name == "data").map(|d| d.format.as_str()), Some("vhdx"));
    assert_eq!(peer.lock().unwrap().powered_off, ["win1-restored"]);
}
