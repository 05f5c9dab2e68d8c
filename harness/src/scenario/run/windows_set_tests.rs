//! A backup set of one Windows and one Linux VM (`scenarios/windows/win-set-windows-and-linux.toml`),
//! driven through the REAL runner: all or nothing across the set, every guest thawed on
//! every path.
//!
//! THE WINDOWS MEMBER IS A SCRIPTED PEER, because no Windows guest can run where quiesce is
//! tested (see `windows_tests.rs` for what it replays and what it cannot show). The Linux
//! member is real: the Linux test guest with its real qemu-ga, booted under QEMU, frozen
//! with fsfreeze and thawed for real. QEMU does every block operation of both VMs for real.
//! These tests boot the Linux guest, so they run with `--features vm-tests`.

use std::sync::{Arc, Mutex};

use super::windows_peer::{passed, run_with_peer_but, windows_scenario, Peer};
use crate::qemu::stand_in::HOLD_LIMIT;
use crate::scenario::{self, Report};

/// The Linux member keeps its real agent: machines named so (the VM and its restore).
const REAL: &[&str] = &["lin1"];

/// The scenario file with its Windows journal seeded by the host in journal.ps1's format
/// (no Windows writes it here), and `extra` appended.
fn mixed(extra: &str, expect_failed: bool) -> scenario::Scenario {
    let (path, text) = windows_scenario("win-set-windows-and-linux.toml");
    let seeded = text.replacen(
        "filesystem = \"ntfs\"\n",
        "filesystem = \"ntfs\"\nfiles = { \"journal\" = \"1\\r\\n2\\r\\n3\\r\\n4\\r\\n\" }\n",
        1,
    );
    assert_ne!(seeded, text);
    let mut edited = seeded;
    if expect_failed {
        // A failed backup restores nothing.
        edited = edited[..edited.find("[restore]").unwrap()].to_owned();
        edited = edited.replace(
            "method = \"child-snapshot\"\n",
            "method = \"child-snapshot\"\nexpect = \"failed\"\nfreeze_deadline_ms = 90000\n",
        );
    }
    edited.push_str(extra);
    scenario::parse(&path, &edited).unwrap()
}

fn check_of(report: &Report, vm: &str, check: &str) -> Option<bool> {
    report.checks.iter().find(|c| c.vm == vm && c.check == check).map(|c| c.passed)
}

/// Both members are put back, each in its own way, and the Windows one is thawed.
fn assert_all_put_back(report: &Report, peer: &Peer) {
    assert!(report.passed, "{:#?}", (&report.error, &report.checks));
    for check in ["backup-failed-as-expected", "every-vm-put-back", "no-backup-written", "no-overlays-left"] {
        assert_eq!(passed(report, check), Some(true), "{check}: {:#?}", report.checks);
    }
    for vm in ["win1", "lin1"] {
        for check in ["guest-thawed", "on-its-own-images", "nothing-lost"] {
            assert_eq!(check_of(report, vm, check), Some(true), "{vm} {check}: {:#?}", report.checks);
        }
    }
    assert!(peer.frozen_at.is_none(), "the Windows member was left frozen");
}

#[test]
fn win_and_linux_set_backs_up_both_and_restores_both() {
    let s = mixed("", false);
    let peer = Arc::new(Mutex::new(Peer::new()));
    let (report, _dir) = run_with_peer_but(&s, peer.clone(), REAL);
    assert_eq!(report.skipped, None);
    assert!(report.passed, "{:#?}", (&report.error, &report.checks));
    for vm in ["win1", "lin1"] {
        for check in ["overlays-merged", "blocks-match-backup", "journal-intact", "state-after-restore"] {
            assert_eq!(check_of(&report, vm, check), Some(true), "{vm} {check}: {:#?}", report.checks);
        }
    }
    for vm in &report.vms {
        assert_eq!(vm.method.as_deref(), Some("child-snapshot"), "{}", vm.name);
    }
    let p = peer.lock().unwrap();
    assert_eq!(p.freezes, 1);
    assert!(p.frozen_at.is_none());
}

#[test]
fn win_member_past_the_vss_hold_fails_the_set_and_the_linux_member_is_put_back() {
    let s = mixed("\n[[fault]]\nvm = \"win1\"\nkind = \"hold-past-vss-limit\"\n", true);
    let peer = Arc::new(Mutex::new(Peer::new()));
    let (report, _dir) = run_with_peer_but(&s, peer.clone(), REAL);
    let p = peer.lock().unwrap();
    assert_all_put_back(&report, &p);
    let failed = report.checks.iter().find(|c| c.check == "backup-failed-as-expected").unwrap();
    assert!(failed.detail.contains(HOLD_LIMIT), "{}", failed.detail);
    assert_eq!(report.failure.as_deref().map(|f| f.starts_with("win1")), Some(true), "{:?}", report.failure);
    assert_eq!(p.freezes, 1);
}

#[test]
fn linux_member_failing_its_freeze_fails_the_set_and_the_windows_member_is_put_back() {
    // The real Linux guest's freeze hook vetoes the freeze. The Windows member is prepared
    // at the same time (frozen by VSS, its overlays put on, thawed): the set's undo must
    // merge its overlays back and leave it thawed (seen failing with that undo removed).
    let s = mixed("\n[[fault]]\nvm = \"lin1\"\nkind = \"agent-freeze-fails\"\n", true);
    let peer = Arc::new(Mutex::new(Peer::new()));
    let (report, _dir) = run_with_peer_but(&s, peer.clone(), REAL);
    let p = peer.lock().unwrap();
    assert_all_put_back(&report, &p);
    assert_eq!(report.failure.as_deref().map(|f| f.starts_with("lin1")), Some(true), "{:?}", report.failure);
    assert_eq!(p.freezes, 1, "the Windows member froze before the set failed");
}
