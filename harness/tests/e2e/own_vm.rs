//! VMs quiesce did not start: a QEMU started here from a plain command line, as a person
//! starts one (`-drive if=virtio`, so QEMU names the nodes itself; its own QMP and agent
//! sockets; daemonized, so in a session and process group of its own), is backed up by the
//! `quiesce backup` binary. Afterwards it must be as it was: running, its counter going,
//! the guest thawed, no overlay node, the migration settings unchanged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::common::watch::{Output, Watched};
use crate::hand_started::{HandStarted, T};
use quiesce::sys::{deadline, Spawn, Tool};
use quiesce::workload;

/// A whole `quiesce backup` of a 256 MiB guest under TCG on a shared machine.
const BACKUP: Duration = Duration::from_secs(600);

fn quiesce() -> &'static str {
    env!("CARGO_BIN_EXE_quiesce")
}

/// Runs `quiesce backup` on `vm` to its end.
fn backup(vm: &HandStarted, extra: &[&str], out: &Path) -> quiesce::sys::Output {
    let mut args: Vec<String> = vec!["backup".into(), "--qmp".into(), vm.qmp().display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(out.display().to_string());
    let o = Tool::new(quiesce(), BACKUP).args(&args).output().unwrap();
    eprintln!("{}\n{}", o.stdout_text(), o.stderr);
    o
}

fn agent_args(vm: &HandStarted) -> Vec<String> {
    vec!["--agent".into(), vm.agent().display().to_string()]
}

fn verify(out: &Path) {
    let v = Tool::new(quiesce(), BACKUP).arg("verify").arg(out).output().unwrap();
    assert!(v.status.success(), "quiesce verify {}: {}{}", out.display(), v.stdout_text(), v.stderr);
}

/// `quiesce restore` of `backup` with every check passes them all.
fn restore_passes(backup: &Path) {
    let o = Tool::new(quiesce(), BACKUP)
        .arg("restore")
        .arg(backup)
        .args(["--check", "blocks", "--check", "files", "--check", "guest"])
        .output()
        .unwrap();
    let text = o.stdout_text();
    eprintln!("{text}\n{}", o.stderr);
    assert!(o.status.success(), "quiesce restore {} failed", backup.display());
    for check in ["blocks", "files", "guest"] {
        assert!(text.lines().any(|l| l.starts_with(&format!("check {check}")) && l.contains(" passed ")), "{text}");
    }
}

/// Nothing of a backup at `out`: neither the folder nor a partial one beside it.
fn no_backup_at(out: &Path) {
    assert!(!out.exists(), "{} was left", out.display());
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let partial: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!(".{name}.partial")))
        .collect();
    assert!(partial.is_empty(), "a partial backup was left: {partial:?}");
}

/// Overlay files quiesce made in `dir` and left there.
fn overlays_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("-overlay"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_started_qemu_is_backed_up_by_each_method_and_left_as_it_was() {
    let vm = HandStarted::start("own").await;
    let before = vm.state().await;
    assert_eq!(before["running"], json!(true));
    let out = tempfile::tempdir().unwrap();
    let a = vm.agent_conn().await;
    let boot_before = workload::boot_id(&a).await.unwrap();
    drop(a);
    let agent = agent_args(&vm);
    let agent: Vec<&str> = agent.iter().map(String::as_str).collect();
    for (method, expect) in [("auto", "method child-snapshot"), ("saved-state", "method saved-state")] {
        let dest = out.path().join(method);
        let mut extra = agent.clone();
        extra.extend(["--method", method]);
        let o = backup(&vm, &extra, &dest);
        assert!(o.status.success(), "quiesce backup --method {method} failed");
        let text = o.stdout_text();
        assert!(text.contains(expect), "{text}");
        // The six verdicts, each printed.
        for c in quiesce::backup::conditions::Condition::ALL {
            assert!(text.contains(&format!("  {} ", c.name())), "no verdict on {}: {text}", c.name());
        }
        assert_eq!(vm.state().await, before, "the VM is not as it was after a {method} backup");
        assert!(overlays_in(vm.dir.path()).is_empty());
        vm.assert_alive().await;
        verify(&dest);
    }
    // Its own target folder exists now: refused, and the VM untouched.
    let again = backup(&vm, &agent, &out.path().join("auto"));
    assert!(!again.status.success() && again.stderr.contains("exists already"), "{}", again.stderr);

    // Without its agent: Saved State, the failed condition named.
    let o = backup(&vm, &[], &out.path().join("no-agent"));
    assert!(o.status.success());
    let text = o.stdout_text();
    assert!(text.contains("method saved-state (fell back to Saved State: agent-can-freeze:"), "{text}");
    assert_eq!(vm.state().await, before);
    vm.assert_alive().await;

    // Each backup restores into a new QEMU and passes blocks, files and guest.
    for b in ["auto", "saved-state", "no-agent"] {
        restore_passes(&out.path().join(b));
    }

    // A socket that is not QMP (the agent's): refused, clearly, and the VM untouched.
    let o = Tool::new(quiesce(), BACKUP)
        .args(["backup", "--qmp"])
        .arg(vm.agent())
        .arg(out.path().join("not-qmp"))
        .output()
        .unwrap();
    assert_eq!(o.code(), Some(1));
    assert!(o.stderr.contains("does not speak QMP"), "{}", o.stderr);
    no_backup_at(&out.path().join("not-qmp"));
    assert_eq!(vm.state().await, before);
    vm.assert_alive().await;

    // Rolled back in place: a file written after the backup is gone, the guest rebooted.
    let a = vm.agent_conn().await;
    quiesce::qemu::exec::sh(&a, "echo after > /root/after-backup && sync", T).await.unwrap();
    drop(a);
    let o = Tool::new(quiesce(), BACKUP)
        .arg("restore")
        .arg(out.path().join("auto"))
        .args(["--in-place", "--check", "blocks", "--qmp"])
        .arg(vm.qmp())
        .output()
        .unwrap();
    let text = o.stdout_text();
    eprintln!("{text}\n{}", o.stderr);
    assert!(o.status.success(), "quiesce restore --in-place failed");
    assert!(text.contains("check blocks  passed"), "{text}");
    let a = vm.agent_conn().await;
    a.wait_ready(deadline::BOOT_TO_AGENT).await.expect("the rolled-back guest boots");
    assert_ne!(workload::boot_id(&a).await.unwrap(), boot_before, "the guest was not restarted");
    let gone = quiesce::qemu::exec::sh(&a, "test ! -e /root/after-backup", T).await;
    assert!(gone.is_ok(), "a file written after the backup survived the rollback: {gone:?}");
    assert_eq!(vm.state().await["running"], json!(true));
}

/// Starts `quiesce backup`, sends it SIGINT once its stderr shows `after`, and returns
/// its exit code and what it printed.
fn interrupt_after(vm: &HandStarted, method: &str, after: &str, out: &Path) -> (Option<i32>, String) {
    let spawn = Spawn::new(quiesce())
        .args(["backup", "--qmp"])
        .arg(vm.qmp())
        .arg("--agent")
        .arg(vm.agent())
        .args(["--method", method])
        .arg(out);
    let mut w = Watched::start(spawn, Output::Stderr);
    w.until(&format!("{after:?}"), BACKUP, |l| l.contains(after));
    w.child.signal_group(nix::sys::signal::Signal::SIGINT);
    let status = w.child.wait_timeout(BACKUP).expect("quiesce ends after SIGINT");
    w.drain(Duration::from_secs(5));
    eprintln!("{}", w.seen);
    (status.code(), w.seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_mid_backup_leaves_the_vm_as_it_was_and_no_backup() {
    let vm = HandStarted::start("own-int").await;
    let before = vm.state().await;
    let out = tempfile::tempdir().unwrap();
    // Child VM Snapshot: interrupted once the overlays exist, before or while the guest is
    // frozen; Saved State: once the VM is stopped, while its state is saved. Then each
    // method once its disks are being copied out (after the set's Thaw phase): the undo
    // must find no `qemu-img` still reading the images, or QEMU cannot take their write
    // lock back (Saved State's `cont`, Child VM Snapshot's merge).
    let cases = [
        ("child-snapshot", "prepare overlays: done"),
        ("saved-state", "stop: done"),
        ("child-snapshot", "Thaw: done"),
        ("saved-state", "Thaw: done"),
    ];
    for (i, (method, after)) in cases.into_iter().enumerate() {
        let dest = out.path().join(format!("{method}-{i}"));
        let (code, said) = interrupt_after(&vm, method, after, &dest);
        assert_eq!(code, Some(130), "quiesce did not report the interruption:\n{said}");
        assert!(said.contains("no VM was backed up"), "{said}");
        if after == "Thaw: done" {
            assert!(said.contains("interrupted in PostSnapshot"), "the copy-out window was missed:\n{said}");
        }
        no_backup_at(&dest);
        assert!(overlays_in(vm.dir.path()).is_empty(), "overlays left: {:?}", overlays_in(vm.dir.path()));
        assert_eq!(vm.state().await, before, "the VM is not as it was after SIGINT in {method} after {after:?}");
        vm.assert_alive().await;
    }
}
