//! The scenario runner's Windows path, driven end to end through the REAL runner with the
//! scripted peer of `windows_peer.rs` standing in for every Windows agent (see there for
//! what is real, what is scripted, and what was never tried).

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::windows_peer::{blank_image, passed, run_with_peer, windows_scenario, Peer};
use crate::qemu::stand_in::HOLD_LIMIT;
use crate::scenario::{self, Scenario};

#[test]
fn win_saved_state_running_runs_through_the_runner_with_a_scripted_agent() {
    let (path, text) = windows_scenario("win-saved-state-running.toml");
    let s = scenario::parse(&path, &text).unwrap();
    // Outside a stand-in scope, with no image built here, it is skipped with the build command.
    assert!(scenario::skip_reason(&s).is_some_and(|why| why.contains("quiesce image build windows")));
    let peer = Arc::new(Mutex::new(Peer::new()));
    let (report, _dir) = run_with_peer(&s, peer.clone());
    assert_eq!(report.skipped, None);
    assert!(report.passed, "{:#?}", (&report.error, &report.checks));
    for check in
        ["runs-on-after-backup", "blocks-match-backup", "same-boot", "counter-continues", "state-after-restore"]
    {
        assert_eq!(passed(&report, check), Some(true), "{check}: {:#?}", report.checks);
    }
    assert_eq!(report.vms[0].method.as_deref(), Some("saved-state"));
    let p = peer.lock().unwrap();
    // The runner asked "Windows" through PowerShell, with the recipe's own scripts.
    assert!(p.scripts.iter().any(|s| s.contains("C:\\quiesce\\workloads\\counter.ps1' -Action start")));
    assert!(p.scripts.iter().any(|s| s.contains("quiesce-boot")));
    assert_eq!(p.freezes, 0, "Saved State freezes nothing");
}

#[test]
fn win_hold_past_the_vss_limit_fails_the_backup_and_loses_nothing() {
    let (path, text) = windows_scenario("win-hold-past-vss-limit.toml");
    // No Windows writes the journal here: the host seeds the lines journal.ps1 would have
    // written, in its format (CRLF), and the runner reads them back from the NTFS disk on
    // the host while QEMU holds it, before the job and after it.
    let seeded = text.replace(
        "filesystem = \"ntfs\"\n",
        "filesystem = \"ntfs\"\nfiles = { \"journal\" = \"1\\r\\n2\\r\\n3\\r\\n4\\r\\n5\\r\\n\" }\n",
    );
    assert_ne!(seeded, text);
    let s = scenario::parse(&path, &seeded).unwrap();
    let peer = Arc::new(Mutex::new(Peer::new()));
    let (report, _dir) = run_with_peer(&s, peer.clone());
    assert_eq!(report.skipped, None);
    assert!(report.passed, "{:#?}", (&report.error, &report.checks));
    for check in [
        "backup-failed-as-expected",
        "every-vm-put-back",
        "no-backup-written",
        "no-overlays-left",
        "on-its-own-images",
        "guest-thawed",
        "nothing-lost",
    ] {
        assert_eq!(passed(&report, check), Some(true), "{check}: {:#?}", report.checks);
    }
    let failed = report.checks.iter().find(|c| c.check == "backup-failed-as-expected").unwrap();
    assert!(failed.detail.contains(HOLD_LIMIT), "{}", failed.detail);
    let journal = report.vms[0].journal.as_ref().expect("the journal was read back");
    assert_eq!((journal.before_job, journal.read_back, journal.lost), (Some(5), 5, 0));
    let p = peer.lock().unwrap();
    assert_eq!(p.freezes, 1);
    // Each host read of the journal came after a flush of its volume in the guest.
    assert!(p.scripts.iter().filter(|s| s.contains("journal.ps1' -Action flush -Path 'D:\\journal'")).count() >= 2);
}

#[test]
fn win_child_snapshot_journal_restores_boots_and_is_checked_with_chkdsk() {
    let (path, text) = windows_scenario("win-child-snapshot-journal.toml");
    // The host seeds the journal (no Windows writes it here). The restored guest cannot be
    // shut down by a scripted agent, so the files are compared in the guest
    // (files-match-seed) and chkdsk is asked for, instead of the host-side manifests.
    let edited = text
        .replace(
            "files = { \"hello.txt\" = \"hello from the host\\n\" }",
            "files = { \"hello.txt\" = \"hello from the host\\n\", \"journal\" = \"1\\r\\n2\\r\\n3\\r\\n\" }",
        )
        .replace("\"manifest-matches-backup\"", "\"guest-fsck\"");
    let edited = edited[..edited.find("[[restore.manifest]]").unwrap()].to_owned();
    assert!(edited.contains("\"journal\" = ") && edited.contains("guest-fsck"), "{edited}");
    let s = scenario::parse(&path, &edited).unwrap();
    let mut p = Peer::new();
    p.files.insert("D:\\hello.txt".into(), "hello from the host\n".into());
    // The seeded journal is a seeded file too: this stand-in's journal does not grow.
    p.files.insert("D:\\journal".into(), "1\r\n2\r\n3\r\n".into());
    let peer = Arc::new(Mutex::new(p));
    let (report, _dir) = run_with_peer(&s, peer.clone());
    assert_eq!(report.skipped, None);
    assert!(report.passed, "{:#?}", (&report.error, &report.checks));
    for check in [
        "overlays-merged",
        "nothing-lost-after-backup",
        "blocks-match-backup",
        "state-after-restore",
        "guest-fsck",
        "files-match-seed",
        "journal-intact",
    ] {
        assert_eq!(passed(&report, check), Some(true), "{check}: {:#?}", report.checks);
    }
    assert_eq!(report.vms[0].method.as_deref(), Some("child-snapshot"));
    let p = peer.lock().unwrap();
    assert_eq!(p.freezes, 1);
    assert_eq!(p.programs, ["C:\\Windows\\System32\\chkdsk.exe D:"]);
    // The restored guest's data disk got its letter again before it was checked.
    assert!(p.scripts.iter().filter(|s| s.contains("Win32_Volume")).count() >= 2);
}

#[test]
fn win_saved_state_paused_stays_paused_and_continues_its_boot() {
    let (path, text) = windows_scenario("win-saved-state-paused.toml");
    let s = scenario::parse(&path, &text).unwrap();
    let (report, _dir) = run_with_peer(&s, Arc::new(Mutex::new(Peer::new())));
    assert!(report.passed, "{:#?}", (&report.error, &report.checks));
    for check in ["state-restored-after-backup", "blocks-match-backup", "same-boot", "state-after-restore"] {
        assert_eq!(passed(&report, check), Some(true), "{check}: {:#?}", report.checks);
    }
    assert_eq!(report.vms[0].state_after_backup.as_deref(), Some("paused"));
    assert_eq!(report.vms[0].method.as_deref(), Some("saved-state"));
}

#[test]
fn win_agent_stopped_falls_back_to_saved_state() {
    let (path, text) = windows_scenario("win-agent-stopped.toml");
    let s = scenario::parse(&path, &text).unwrap();
    let peer = Arc::new(Mutex::new(Peer::new()));
    let (report, _dir) = run_with_peer(&s, peer.clone());
    assert!(report.passed, "{:#?}", (&report.error, &report.checks));
    assert_eq!(passed(&report, "disks-match-backup"), Some(true));
    let vm = &report.vms[0];
    assert_eq!(vm.method.as_deref(), Some("saved-state"));
    assert!(vm
        .conditions
        .iter()
        .any(|(c, o)| c == "agent-can-freeze" && *o == crate::backup::conditions::Outcome::Failed));
    let p = peer.lock().unwrap();
    assert_eq!((p.stopped, p.freezes), (true, 0));
}

#[test]
fn win_vss_provider_unregistered_falls_back_in_the_agents_words() {
    let (path, text) = windows_scenario("win-vss-provider-unregistered.toml");
    let s = scenario::parse(&path, &text).unwrap();
    let peer = Arc::new(Mutex::new(Peer::new()));
    let (report, _dir) = run_with_peer(&s, peer.clone());
    assert!(report.passed, "{:#?}", (&report.error, &report.checks));
    for check in ["blocks-match-backup", "same-boot", "counter-continues"] {
        assert_eq!(passed(&report, check), Some(true), "{check}: {:#?}", report.checks);
    }
    let vm = &report.vms[0];
    assert_eq!(vm.method.as_deref(), Some("saved-state"));
    assert!(vm.method_reason.as_deref().is_some_and(|r| r.contains("VSS")), "{:?}", vm.method_reason);
    let p = peer.lock().unwrap();
    assert!(p.vss_init_failed && p.freezes == 0);
}

#[tokio::test]
async fn with_an_image_built_every_windows_scenario_runs() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let files: Vec<_> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/windows"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".toml"))
        .collect();
    assert!(files.len() >= 10, "{files:?}");
    let all: Vec<Scenario> = files
        .iter()
        .map(|f| {
            let (path, text) = windows_scenario(f);
            scenario::parse(&path, &text).unwrap()
        })
        .collect();
    let reasons =
        crate::windows::guest::with_image(image, async { all.iter().map(scenario::skip_reason).collect::<Vec<_>>() })
            .await;
    assert!(reasons.iter().all(Option::is_none), "{reasons:?}");
    // Without one, every one is skipped with the command that builds it.
    for s in &all {
        assert!(scenario::skip_reason(s).is_some_and(|why| why.contains("quiesce image build windows")), "{}", s.name);
    }
}
