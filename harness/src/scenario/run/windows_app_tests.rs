//! The Windows `app` workload (`scenarios/windows/win-app-sqlserver.toml`) through the REAL
//! runner: SQL Server's VSS writer found or not, its freeze events placed against the
//! backup, its rows, and DBCC CHECKDB of the restored database.
//!
//! A SCRIPTED PEER STANDS IN FOR WINDOWS AND FOR SQL SERVER, because no Windows guest can
//! run here (see `windows_tests.rs`). It answers `app-hook.ps1` as the hook would: with
//! SQL Server, its writer logs 3197 when the peer is frozen and 3198 when it is thawed;
//! without, `detect` says "absent". QEMU and the block work are real. What this cannot
//! show: that SQL Server's writer really takes part in qemu-ga's VSS snapshot, the hook's
//! PowerShell and sqlcmd, and CHECKDB on a restored NTFS disk.

use std::sync::{Arc, Mutex};

use super::windows_peer::{passed, run_with_peer, windows_scenario, Peer};
use crate::scenario;

fn sql_peer() -> Peer {
    let mut p = Peer::new();
    p.sql = Some("SQLEXPRESS".into());
    p
}

fn app_scenario() -> scenario::Scenario {
    let (path, text) = windows_scenario("win-app-sqlserver.toml");
    scenario::parse(&path, &text).unwrap()
}

#[test]
fn win_app_sql_server_freezes_with_vss_writes_on_and_its_restore_passes_checkdb() {
    let peer = Arc::new(Mutex::new(sql_peer()));
    let (report, _dir) = run_with_peer(&app_scenario(), peer.clone());
    assert_eq!(report.skipped, None);
    assert!(report.passed, "{:#?}", (&report.error, &report.checks));
    for check in ["overlays-merged", "app-froze-by-vss", "app-writes-on", "blocks-match-backup", "app-consistent"] {
        assert_eq!(passed(&report, check), Some(true), "{check}: {:#?}", report.checks);
    }
    let p = peer.lock().unwrap();
    assert_eq!(p.freezes, 1);
    assert_eq!(p.events.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [3197, 3198]);
    // CHECKDB ran in the restored guest, on the data disk's letter.
    assert_eq!(p.checked, ["D:\\"]);
}

#[test]
fn win_app_checkdb_errors_fail_app_consistent_in_sql_servers_words() {
    let mut p = sql_peer();
    p.checkdb_says = Some("Msg 8939, Level 16, State 98: Table error: page (1:153) failed".into());
    let peer = Arc::new(Mutex::new(p));
    let (report, _dir) = run_with_peer(&app_scenario(), peer);
    assert!(!report.passed);
    assert_eq!(report.error, None);
    let c = report.checks.iter().find(|c| c.check == "app-consistent").expect("app-consistent ran");
    assert!(!c.passed && c.detail.contains("Msg 8939"), "{c:?}");
    assert_eq!(passed(&report, "app-froze-by-vss"), Some(true));
}

#[test]
fn win_app_without_a_writer_in_the_image_is_skipped_saying_how_to_add_one() {
    let peer = Arc::new(Mutex::new(Peer::new()));
    let (report, _dir) = run_with_peer(&app_scenario(), peer.clone());
    let why = report.skipped.as_deref().expect("skipped");
    assert!(why.contains("install SQL Server Express"), "{why}");
    assert!(!report.passed && report.checks.is_empty() && report.error.is_none(), "{report:#?}");
    let p = peer.lock().unwrap();
    assert!(!p.app_started && p.freezes == 0, "nothing ran past the detection");
}
