//! quiesce killed with SIGKILL in the middle of `quiesce backup --libvirt`, so no undo can
//! run: the domain stays on quiesce's overlays (its disks' sources point at them). The
//! recovery journal quiesce wrote before libvirt's snapshot lets `quiesce doctor` show it,
//! and `quiesce recover --libvirt` (or the next `quiesce backup --libvirt`) commit the
//! overlays back: the domain runs on its own images again, with what the guest wrote on
//! the overlays meanwhile. A journal that names overlays the domain no longer has is stale:
//! reported, removed, nothing touched; one that names a file quiesce does not make is
//! refused.
//!
//! Real libvirtd (started as the `libvirt` tests start it), real guest, real qemu-ga.
//! quiesce is held at a named step by the test-only `QUIESCE_TEST_HOLD_AT` (it says so on
//! stderr, then waits), so the SIGKILL lands while the overlays are on, with no sleep.
//! Skipped, saying why, where libvirt is not installed or this is not root.

use std::path::{Path, PathBuf};

use crate::common::state::{doctor, journals_in};
use crate::common::watch::{Output, Watched};
use crate::libvirt_common::{as_it_was, backup_args, look, quiesce, setup, start_domain, verify, BACKUP, T};
use quiesce::sys::{Spawn, Tool};
use quiesce_bench::libvirt::Libvirt;

/// Starts `quiesce backup` with `args`, its journals in `state`, held at step `hold`
/// ("VM: STEP"), and kills it with SIGKILL there. Returns what it said.
fn kill_when_held(args: &[String], state: &Path, hold: &str) -> String {
    let spawn = Spawn::new(quiesce()).args(args).env("QUIESCE_STATE_DIR", state).env("QUIESCE_TEST_HOLD_AT", hold);
    let mut w = Watched::start(spawn, Output::Stderr);
    let marker = format!("quiesce-held: {hold}");
    w.until(&format!("{marker:?}"), BACKUP, |l| l == marker);
    w.kill()
}

/// Runs quiesce with `args` to its end, its journals in `state`.
fn run(args: &[String], state: &Path) -> quiesce::sys::Output {
    let o = Tool::new(quiesce(), BACKUP).args(args).env("QUIESCE_STATE_DIR", state).output().unwrap();
    eprintln!("{}\n{}", o.stdout_text(), o.stderr);
    o
}

fn recover_args(lv: &Libvirt, name: &str) -> Vec<String> {
    ["recover", "--libvirt", name, "--connect", lv.uri()].map(str::to_owned).to_vec()
}

fn journals(state: &Path) -> Vec<PathBuf> {
    journals_in(state, "libvirt-journals")
}

/// What the guest reads of `file` from its disk (its page cache dropped first, so the read
/// goes to the disk the domain runs on now).
async fn read_from_disk(lv: &Libvirt, name: &str, file: &str) -> String {
    let cmd = format!("sync && echo 3 > /proc/sys/vm/drop_caches && cat {file}");
    lv.guest_sh(name, &cmd, T).await.expect("the guest runs commands").trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_the_domain_on_overlays_is_undone_by_recover_and_by_the_next_backup() {
    let (mut lv, image, accel) = match setup().await {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED sigkill_with_the_domain_on_overlays_is_undone_by_recover_and_by_the_next_backup: {why}");
            return;
        }
    };
    let dir = tempfile::Builder::new().prefix("quiesce-libvirt-recovery-").tempdir().unwrap();
    let name = format!("quiesce-lvrec-{}", std::process::id());
    start_domain(&lv, &image, accel, dir.path(), &name).await;
    let before = look(&lv, &name).await;
    assert_eq!(before.0, "running");
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let hold = format!("{name}: copy the disks");
    let mut saved_journal = None;

    // Killed while the disks are copied, so on quiesce's overlays: by each method, undone
    // once by `quiesce recover`, once by the next backup.
    for (round, method) in [(1, "child-snapshot"), (2, "saved-state")] {
        let killed = backup_args(&lv, &name, method, &out.path().join(format!("killed-{round}")));
        kill_when_held(&killed, state.path(), &hold);
        let on = look(&lv, &name).await;
        assert!(on.1.contains("-quiesce-overlay-"), "the domain is not on quiesce's overlays: {}", on.1);
        let js = journals(state.path());
        assert_eq!(js.len(), 1, "one journal for the domain: {js:?}");
        if round == 1 {
            saved_journal = Some(std::fs::read(&js[0]).unwrap());
            let doc = doctor(state.path());
            assert!(doc.contains(&format!("libvirt domain {name} (")), "{doc}");
            assert!(doc.contains("live, left by a killed quiesce") && doc.contains("vda"), "{doc}");
        }
        // The guest writes on the overlay, after the kill.
        let file = format!("/root/after-kill-{round}");
        let text = format!("written-on-the-overlay-{round}");
        lv.guest_sh(&name, &format!("echo {text} > {file} && sync"), T).await.unwrap();

        let o = if round == 1 {
            run(&recover_args(&lv, &name), state.path())
        } else {
            run(&backup_args(&lv, &name, "auto", &out.path().join("next")), state.path())
        };
        assert!(o.status.success(), "round {round}: the run after the kill failed");
        let said = o.stdout_text();
        assert!(said.contains("recovery journal") && said.contains("disk vda still on"), "{said}");
        assert!(said.contains("committed back and deleted"), "{said}");
        as_it_was(&lv, &name, &before, dir.path()).await;
        assert!(journals(state.path()).is_empty(), "a journal was left: {:?}", journals(state.path()));
        assert_eq!(read_from_disk(&lv, &name, &file).await, text, "what the guest wrote meanwhile is lost");
    }
    verify(&out.path().join("next"));

    // The first round's journal again: its overlays are on no disk now, so it is stale:
    // reported and removed, and the file at its overlay's path is not touched.
    let saved = saved_journal.unwrap();
    let rec: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    let overlay = PathBuf::from(rec["overlays"][0]["overlay"].as_str().unwrap());
    std::fs::write(&overlay, b"not quiesce's any more").unwrap();
    let jdir = state.path().join("libvirt-journals");
    std::fs::create_dir_all(&jdir).unwrap();
    let own_name = jdir.join(format!("{}.json", journal_stem(&lv, &name).await));
    std::fs::write(&own_name, &saved).unwrap();
    let listed = doctor(state.path());
    assert!(listed.contains("stale, the domain shows none of it"), "{listed}");
    let o = run(&recover_args(&lv, &name), state.path());
    assert!(o.status.success());
    let said = o.stdout_text();
    assert!(said.contains("stale recovery journal") && said.contains("nothing touched"), "{said}");
    assert!(!own_name.exists(), "the stale journal was kept");
    assert_eq!(std::fs::read(&overlay).unwrap(), b"not quiesce's any more", "a stale journal's file was touched");
    std::fs::remove_file(&overlay).unwrap();
    as_it_was(&lv, &name, &before, dir.path()).await;

    // A journal naming a file quiesce does not make: refused, moved aside, nothing touched.
    let mut evil = rec.clone();
    evil["overlays"][0]["overlay"] = serde_json::json!("/etc/passwd");
    std::fs::write(&own_name, serde_json::to_vec(&evil).unwrap()).unwrap();
    let o = run(&recover_args(&lv, &name), state.path());
    let said = o.stdout_text();
    assert!(said.contains("unreadable recovery journal") && said.contains("not a file quiesce makes"), "{said}");
    assert!(Path::new("/etc/passwd").exists());
    as_it_was(&lv, &name, &before, dir.path()).await;

    lv.destroy(&name).await.unwrap();
    let problems = tokio::task::spawn_blocking(move || lv.stop()).await.unwrap();
    assert!(problems.is_empty(), "libvirt clean-up: {problems:?}");
}

/// The journal's file name for `name` on `lv`'s connection, as quiesce names it.
async fn journal_stem(lv: &Libvirt, name: &str) -> String {
    let uri = lv.virsh(&["uri"], T).await.unwrap().trim().to_owned();
    let uuid = lv.virsh(&["domuuid", name], T).await.unwrap().trim().to_ascii_lowercase();
    let path = quiesce::backup::libvirt::journal::journal_path(&uri, &uuid).unwrap();
    path.file_stem().unwrap().to_string_lossy().into_owned()
}
