//! quiesce killed with SIGKILL in the middle of a backup of a VM it did not start, so no
//! undo can run: the guest stays frozen, overlays stay on its disks, a saved VM stays
//! stopped, a VM paused to finish a merge stays paused; or killed in the middle of an
//! in-place restore, leaving the VM paused on half-written disks. The recovery journal quiesce wrote before each change lets `quiesce doctor`
//! show them, and the next `quiesce backup` on that VM undo them before anything else.
//! A journal of another QEMU on the same socket path is stale: removed, nothing touched.
//!
//! Real QEMU, real guest, real qemu-ga. quiesce is held at a named step by the test-only
//! `QUIESCE_TEST_HOLD_AT` (it says so on stderr, then waits), so the kill lands exactly
//! there, with no sleep.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::state::{doctor, journals_in};
use crate::common::watch::{Output, Watched};
use crate::hand_started::{HandStarted, T};
use quiesce::image::qemu_img;
use quiesce::qemu::DiskFormat;
use quiesce::sys::{deadline, Process, Spawn, Tool};

/// A whole `quiesce backup` of a 256 MiB guest under TCG on a shared machine.
const BACKUP: Duration = Duration::from_secs(600);

fn quiesce() -> &'static str {
    env!("CARGO_BIN_EXE_quiesce")
}

/// `quiesce recover --qmp QMP [--agent AGENT]`, its journals in `state`.
fn recover(qmp: &Path, agent: Option<&Path>, state: &Path) -> quiesce::sys::Output {
    let mut t = Tool::new(quiesce(), BACKUP).args(["recover", "--qmp"]).arg(qmp).env("QUIESCE_STATE_DIR", state);
    if let Some(a) = agent {
        t = t.arg("--agent").arg(a);
    }
    let o = t.output().unwrap();
    eprintln!("recover:\n{}\n{}", o.stdout_text(), o.stderr);
    o
}

/// Starts `quiesce backup --qmp VM [args] out` with its journals in `state`, held at step
/// `hold` ("VM: STEP"), and kills it with SIGKILL there. Returns what it said.
fn kill_when_held(qmp: &Path, state: &Path, args: &[String], hold: &str, out: &Path) -> String {
    let spawn = Spawn::new(quiesce())
        .args(["backup", "--qmp"])
        .arg(qmp)
        .args(args)
        .arg(out)
        .env("QUIESCE_STATE_DIR", state)
        // Its run folder (transcript; Saved State's overlays), which SIGKILL leaves, goes
        // in the test's folder, removed with it.
        .env("TMPDIR", state)
        .env("QUIESCE_TEST_HOLD_AT", hold);
    let mut w = Watched::start(spawn, Output::Stderr);
    let marker = format!("quiesce-held: {hold}");
    w.until(&format!("{marker:?}"), BACKUP, |l| l == marker);
    w.kill()
}

/// Runs `quiesce backup` to its end, its journals in `state`.
fn backup(qmp: &Path, state: &Path, args: &[String], out: &Path) -> quiesce::sys::Output {
    let o = Tool::new(quiesce(), BACKUP)
        .args(["backup", "--qmp"])
        .arg(qmp)
        .args(args)
        .arg(out)
        .env("QUIESCE_STATE_DIR", state)
        .env("TMPDIR", state)
        .output()
        .unwrap();
    eprintln!("{}\n{}", o.stdout_text(), o.stderr);
    o
}

fn journals(state: &Path) -> Vec<PathBuf> {
    journals_in(state, "journals")
}

fn overlays_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("-overlay"))
        .collect()
}

fn verify(out: &Path) {
    let v = Tool::new(quiesce(), BACKUP).arg("verify").arg(out).output().unwrap();
    assert!(v.status.success(), "quiesce verify {}: {}{}", out.display(), v.stdout_text(), v.stderr);
}

/// The node names attached to the VM's devices.
async fn on_top(vm: &HandStarted) -> Vec<String> {
    let blocks = vm.qmp_ask("query-block", Value::Null).await;
    blocks.as_array().unwrap().iter().filter_map(|b| b["inserted"]["node-name"].as_str().map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_frozen_on_overlays_is_undone_by_the_next_backup() {
    let vm = HandStarted::start("rec-frozen").await;
    let before = vm.state().await;
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let args: Vec<String> =
        ["--agent", &vm.agent().display().to_string(), "--method", "child-snapshot"].map(str::to_owned).to_vec();
    // At the start of the thaw: the transaction ran (overlays on top), the guest is frozen.
    kill_when_held(&vm.qmp(), state.path(), &args, "rec-frozen: thaw", &out.path().join("killed"));

    // The leftovers are real: a frozen guest, the overlay on top of the disk, its file.
    let a = vm.agent_conn().await;
    a.wait_ready(T).await.unwrap();
    assert_eq!(a.execute_raw("guest-fsfreeze-status", Value::Null, T).await.unwrap(), json!("frozen"));
    drop(a);
    let top = on_top(&vm).await;
    assert!(top.iter().any(|n| n.ends_with("-snap")), "no overlay on top: {top:?}");
    assert_eq!(overlays_in(vm.dir.path()).len(), 1);
    assert_eq!(journals(state.path()).len(), 1);

    // doctor shows them, and touches nothing.
    let d = doctor(state.path());
    assert!(d.contains("VM rec-frozen") && d.contains(": live, left by a killed quiesce"), "{d}");
    assert!(d.contains("the guest frozen") && d.contains("-snap"), "{d}");
    assert_eq!(journals(state.path()).len(), 1);

    // The next backup undoes them first, then backs up.
    let after = out.path().join("after");
    let o = backup(&vm.qmp(), state.path(), &args, &after);
    assert!(o.status.success(), "the backup after the kill failed");
    let text = o.stdout_text();
    assert!(text.contains("of a killed quiesce named"), "{text}");
    assert!(text.contains("guest was frozen: thawed"), "{text}");
    assert!(text.contains("merged and removed"), "{text}");
    assert_eq!(vm.state().await, before, "the VM is not as it was");
    assert!(overlays_in(vm.dir.path()).is_empty(), "overlays left: {:?}", overlays_in(vm.dir.path()));
    assert!(journals(state.path()).is_empty(), "journal left: {:?}", journals(state.path()));
    vm.assert_alive().await;
    verify(&after);
    assert!(doctor(state.path()).starts_with("journals      none"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_saved_leaves_the_vm_stopped_until_the_next_backup() {
    let vm = HandStarted::start("rec-saved").await;
    let before = vm.state().await;
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let args: Vec<String> =
        ["--agent", &vm.agent().display().to_string(), "--method", "saved-state"].map(str::to_owned).to_vec();
    // Its state saved, its disks inactive, the overlays made but not on yet.
    let hold = "rec-saved: activate the disks (still stopped)";
    kill_when_held(&vm.qmp(), state.path(), &args, hold, &out.path().join("killed"));

    let status = vm.qmp_ask("query-status", Value::Null).await;
    assert_eq!((status["running"].clone(), status["status"].clone()), (json!(false), json!("postmigrate")));
    let nodes = vm.qmp_ask("query-named-block-nodes", json!({"flat": true})).await;
    assert!(nodes.as_array().unwrap().iter().any(|n| n["node-name"].as_str().is_some_and(|s| s.ends_with("-snap"))));

    let d = doctor(state.path());
    assert!(d.contains(": live, left by a killed quiesce") && d.contains("the VM stopped for Saved State"), "{d}");

    let after = out.path().join("after");
    let o = backup(&vm.qmp(), state.path(), &args, &after);
    assert!(o.status.success(), "the backup after the kill failed");
    let text = o.stdout_text();
    assert!(text.contains("VM left postmigrate by a Saved State: put back"), "{text}");
    assert!(text.contains("not in use: removed"), "{text}");
    assert!(text.contains("migration settings changed by the save: put back"), "{text}");
    assert_eq!(vm.state().await, before, "the VM is not as it was");
    assert!(overlays_in(vm.dir.path()).is_empty(), "overlays left: {:?}", overlays_in(vm.dir.path()));
    assert!(journals(state.path()).is_empty());
    vm.assert_alive().await;
    verify(&after);
}

/// A QEMU the test started, stopped when dropped.
struct Bare(Process);

impl Drop for Bare {
    fn drop(&mut self) {
        self.0.terminate(deadline::QEMU_QUIT);
    }
}

/// A QEMU with no guest (`-S`: it never runs), on `dir/qmp.sock`, over `dir/disk.qcow2`.
fn bare_qemu(dir: &Path) -> Bare {
    let d = dir.display();
    Tool::new("qemu-system-x86_64", deadline::QMP_CONNECT)
        .args(["-name", "stale", "-M", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults", "-S"])
        .args(["-drive", &format!("file={d}/disk.qcow2,if=virtio,format=qcow2")])
        .args(["-qmp", &format!("unix:{d}/qmp.sock,server=on,wait=off"), "-pidfile", &format!("{d}/qemu.pid")])
        .arg("-daemonize")
        .run()
        .expect("QEMU starts");
    let pid: u32 = std::fs::read_to_string(dir.join("qemu.pid")).unwrap().trim().parse().unwrap();
    Bare(Process::open(pid).expect("QEMU runs"))
}

async fn qmp_state(qmp: &Path) -> Value {
    let ask = |c: &'static str, a: Value| async move {
        let s = tokio::net::UnixStream::connect(qmp).await.unwrap();
        let t = quiesce::qemu::Transcript::create(&qmp.with_file_name("test-qmp.log")).unwrap();
        let q = quiesce::qemu::Qmp::connect(s, t, deadline::QMP_CONNECT).await.unwrap();
        q.execute_raw(c, a, deadline::QMP_COMMAND).await.unwrap()
    };
    let nodes = ask("query-named-block-nodes", json!({"flat": true})).await;
    let mut nodes: Vec<String> =
        nodes.as_array().unwrap().iter().map(|n| format!("{} {}", n["node-name"], n["file"])).collect();
    nodes.sort();
    json!({"status": ask("query-status", Value::Null).await["status"], "nodes": nodes})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_of_another_qemu_on_the_same_socket_is_stale_and_touches_nothing() {
    let dir = tempfile::Builder::new().prefix("quiesce-stale-").tempdir().unwrap();
    qemu_img::create(&dir.path().join("disk.qcow2"), DiskFormat::Qcow2, 64 << 20).unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let first = bare_qemu(dir.path());
    let args: Vec<String> = ["--method", "saved-state"].map(str::to_owned).to_vec();
    kill_when_held(&qmp, state.path(), &args, "stale: save state (migrate to file)", &out.path().join("killed"));
    assert_eq!(journals(state.path()).len(), 1);
    // The journal names the save under way (a paused VM's disks are copied while it stays
    // stopped, so no overlay is made).
    let journal = std::fs::read_to_string(&journals(state.path())[0]).unwrap();
    assert!(journal.contains("\"saving\": true"), "{journal}");
    let left = overlays_in(dir.path());
    let named: Value = serde_json::from_str(&journal).unwrap();
    // That QEMU ends; another starts on the same socket path.
    assert!(first.0.terminate(deadline::QEMU_QUIT));
    let d = doctor(state.path());
    assert!(d.contains("VM stale") && d.contains(": stale, its QEMU is gone"), "{d}");
    let second = bare_qemu(dir.path());
    let before = qmp_state(&qmp).await;

    // Child VM Snapshot is refused (no agent) after the journal was dealt with: the run
    // does nothing but find the journal stale.
    let o = backup(&qmp, state.path(), &["--method".into(), "child-snapshot".into()], &out.path().join("b"));
    let text = o.stdout_text();
    assert!(text.contains("stale recovery journal") && text.contains("removed, no VM touched"), "{text}");
    assert!(journals(state.path()).is_empty());
    assert_eq!(qmp_state(&qmp).await, before, "the other QEMU was touched");
    assert_eq!(overlays_in(dir.path()), left, "a file the stale journal named was touched");
    // `quiesce recover` (the replay alone) finds nothing left to do.
    let r = Tool::new(quiesce(), BACKUP)
        .args(["recover", "--qmp"])
        .arg(&qmp)
        .env("QUIESCE_STATE_DIR", state.path())
        .output()
        .unwrap();
    assert!(
        r.status.success() && r.stdout_text().contains("no recovery journal: nothing to undo"),
        "{}{}",
        r.stdout_text(),
        r.stderr
    );
    assert_eq!(qmp_state(&qmp).await, before);
    // The files it named are still there (the reserve is 64 MiB): the test removes them.
    let reserve = PathBuf::from(named["left"]["reserve"].as_str().expect("a merge reserve named"));
    assert!(reserve.exists(), "{} was touched", reserve.display());
    std::fs::remove_dir_all(reserve.parent().unwrap()).unwrap();
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_paused_to_finish_a_merge_is_merged_and_resumed_by_recover() {
    let vm = HandStarted::start("rec-merge").await;
    // A guest that writes faster than a merge limited to 64 KiB/s: 1 MiB rewritten and
    // fsynced, over and over (it waits out the freeze, and the pause, by itself).
    let a = vm.agent_conn().await;
    let writer = "setsid sh -c 'while :; do dd if=/dev/urandom of=/root/busy bs=64k count=16 conv=fsync 2>/dev/null; \
                  done' </dev/null >/dev/null 2>&1 &";
    quiesce::qemu::exec::sh(&a, writer, T).await.unwrap();
    drop(a);
    let before = vm.state().await;
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let agent = vm.agent().display().to_string();
    let args: Vec<String> =
        ["--agent", &agent, "--method", "child-snapshot", "--merge-speed", "65536", "--merge-converge", "3"]
            .map(str::to_owned)
            .to_vec();
    // The merge did not converge: the VM is paused for it to finish, and quiesce dies there.
    let hold = "rec-merge: finish the merge of virtio0 paused";
    kill_when_held(&vm.qmp(), state.path(), &args, hold, &out.path().join("killed"));

    // The leftovers are real: the VM paused, the overlay still on top, the pause journaled.
    let status = vm.qmp_ask("query-status", Value::Null).await;
    assert_eq!((status["running"].clone(), status["status"].clone()), (json!(false), json!("paused")));
    let top = on_top(&vm).await;
    assert!(top.iter().any(|n| n.ends_with("-snap")), "no overlay on top: {top:?}");
    let journal = std::fs::read_to_string(&journals(state.path())[0]).unwrap();
    assert!(journal.contains("\"merge_paused\": true"), "{journal}");
    let d = doctor(state.path());
    assert!(d.contains(": live, left by a killed quiesce") && d.contains("the VM paused to finish a merge"), "{d}");

    // `quiesce recover` merges, then resumes the VM: it ran before the backup.
    let r = recover(&vm.qmp(), Some(&vm.agent()), state.path());
    assert!(r.status.success(), "quiesce recover failed");
    let text = r.stdout_text();
    assert!(text.contains("merged and removed"), "{text}");
    assert!(text.contains("VM paused to finish a merge: merged, then resumed"), "{text}");
    assert_eq!(vm.state().await, before, "the VM is not as it was");
    assert!(overlays_in(vm.dir.path()).is_empty(), "overlays left: {:?}", overlays_in(vm.dir.path()));
    assert!(journals(state.path()).is_empty(), "journal left: {:?}", journals(state.path()));
    vm.assert_alive().await;
}

/// The pid of a `qemu-img` child of process `parent`, if it has one.
fn qemu_img_child(parent: u32) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(close) = stat.rfind(')') else { continue };
        let comm = stat.get(stat.find('(').unwrap_or(0) + 1..close).unwrap_or("");
        let ppid = stat[close + 1..].split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
        if comm == "qemu-img" && ppid == Some(parent) {
            return Some(pid);
        }
    }
    None
}

/// What process `pid` has written so far (`wchar` of /proc/PID/io), if it still runs.
fn written_by(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).and_then(|v| v.trim().parse().ok())
}

/// Polls `what` every few milliseconds until it gives a value, for at most `within`: a
/// wait for a condition another process makes, with a deadline.
fn poll<T>(within: Duration, mut what: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(v) = what() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Starts `quiesce restore BACKUP --in-place --qmp VM` and kills it (SIGKILL, quiesce's
/// process alone) once its qemu-img has written the first MiB of the backup's disk onto the
/// VM's. Returns what it said. qemu-img must die with it (it must not go on writing
/// behind a killed quiesce, racing the next run).
fn kill_mid_write(backup: &Path, qmp: &Path, state: &Path, disk_step: &str) -> String {
    let spawn = Spawn::new(quiesce())
        .arg("restore")
        .arg(backup)
        .args(["--in-place", "--qmp"])
        .arg(qmp)
        .env("QUIESCE_STATE_DIR", state)
        .env("QUIESCE_TRACE_STEPS", "1");
    let mut w = Watched::start(spawn, Output::Stderr);
    let marker = format!("quiesce-step: {disk_step}");
    w.until("that it began writing", BACKUP, |l| l == marker);
    let Watched { mut child, seen, .. } = w;
    let quiesce_pid = child.pid();
    let writer = poll(Duration::from_secs(60), || {
        let pid = qemu_img_child(quiesce_pid)?;
        (written_by(pid)? > 1 << 20).then_some(pid)
    });
    let Some(writer) = writer else {
        child.kill();
        panic!("no qemu-img of quiesce wrote a MiB; quiesce said:\n{seen}");
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(quiesce_pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let status = child.wait_timeout(deadline::KILLED_EXIT).expect("quiesce dies of SIGKILL");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{seen}");
    let gone = poll(deadline::KILLED_EXIT, || (!Path::new(&format!("/proc/{writer}")).exists()).then_some(()));
    assert!(gone.is_some(), "qemu-img (pid {writer}) goes on writing behind a killed quiesce");
    eprintln!("{seen}");
    seen
}

/// Flips one byte of `file` at `at` (twice: back as it was).
fn flip(file: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_write_of_an_in_place_restore_is_rolled_forward_never_resumed_half_written() {
    let vm = HandStarted::start("rec-inplace").await;
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let b = out.path().join("b");
    let agent = vm.agent().display().to_string();
    let o = backup(&vm.qmp(), state.path(), &["--agent".into(), agent, "--method".into(), "child-snapshot".into()], &b);
    assert!(o.status.success(), "the backup failed");
    // After the backup the guest writes a file the restore must take away.
    let a = vm.agent_conn().await;
    let boot_before = quiesce::workload::boot_id(&a).await.unwrap();
    quiesce::qemu::exec::sh(&a, "dd if=/dev/urandom of=/root/after-backup bs=1M count=32 conv=fsync 2>/dev/null", T)
        .await
        .unwrap();
    drop(a);
    let backup = quiesce::backup::Backup::open(&b).unwrap();
    let d = &backup.vm("rec-inplace").unwrap().disks[0];
    let image = backup.file_path("rec-inplace", &quiesce::backup::manifest::Entry::Disk(d.node_name.clone()), &d.file);
    let (image, format, disk) = (image.unwrap(), d.format, d.node_name.clone());
    kill_mid_write(&b, &vm.qmp(), state.path(), &format!("rec-inplace: write disk {disk} of the backup"));

    // Left: the VM paused on a half-written disk, the restore journaled.
    let status = vm.qmp_ask("query-status", Value::Null).await;
    assert_eq!((status["running"].clone(), status["status"].clone()), (json!(false), json!("paused")));
    let (root, img) = (vm.root(), image.clone());
    let c =
        tokio::task::spawn_blocking(move || quiesce::verify::blockcmp::compare(&root, DiskFormat::Qcow2, &img, format))
            .await
            .unwrap()
            .unwrap();
    assert!(!c.identical, "the disk was written whole before the kill: no half-written disk to test with");
    let journal = std::fs::read_to_string(&journals(state.path())[0]).unwrap();
    assert!(journal.contains("\"in_place\"") && journal.contains("rec-inplace"), "{journal}");
    let doc = doctor(state.path());
    assert!(doc.contains("an in-place restore of VM rec-inplace"), "{doc}");

    // The backup no longer verifies: recover refuses to finish, says why, and leaves the VM
    // paused with its journal.
    let at = std::fs::metadata(&image).unwrap().len() / 2;
    flip(&image, at);
    let r = recover(&vm.qmp(), None, state.path());
    assert!(!r.status.success(), "recover finished from a backup that does not verify");
    assert!(r.stderr.contains("no longer verifies") && r.stderr.contains("the VM is left paused"), "{}", r.stderr);
    assert_eq!(vm.qmp_ask("query-status", Value::Null).await["status"], json!("paused"));
    assert_eq!(journals(state.path()).len(), 1);

    // Whole again: recover writes the backup again, compares it, and only then resumes.
    flip(&image, at);
    let r = recover(&vm.qmp(), None, state.path());
    assert!(r.status.success(), "quiesce recover failed");
    let text = r.stdout_text();
    assert!(text.contains("in-place restore finished") && text.contains("resumed"), "{text}");
    assert!(text.contains("identical to it, block for block"), "{text}");
    assert!(journals(state.path()).is_empty(), "journal left: {:?}", journals(state.path()));
    assert_eq!(vm.qmp_ask("query-status", Value::Null).await["running"], json!(true));
    let a = vm.agent_conn().await;
    a.wait_ready(deadline::BOOT_TO_AGENT).await.expect("the rolled-forward guest boots");
    assert_ne!(quiesce::workload::boot_id(&a).await.unwrap(), boot_before, "the guest was not restarted");
    let gone = quiesce::qemu::exec::sh(&a, "test ! -e /root/after-backup", T).await;
    assert!(gone.is_ok(), "a file written after the backup survived the roll forward: {gone:?}");
    drop(a);

    // Killed mid-write again, and its backup altered: an in-place restore from another
    // backup (a copy) takes the journal over, and the VM runs again as it did before the
    // first restore paused it.
    let b2 = out.path().join("b2");
    Tool::new("cp", BACKUP).arg("-a").arg(&b).arg(&b2).run().unwrap();
    kill_mid_write(&b, &vm.qmp(), state.path(), &format!("rec-inplace: write disk {disk} of the backup"));
    assert_eq!(vm.qmp_ask("query-status", Value::Null).await["status"], json!("paused"));
    flip(&image, at);
    let o = Tool::new(quiesce(), BACKUP)
        .arg("restore")
        .arg(&b2)
        .args(["--in-place", "--check", "blocks", "--qmp"])
        .arg(vm.qmp())
        .env("QUIESCE_STATE_DIR", state.path())
        .output()
        .unwrap();
    let text = o.stdout_text();
    eprintln!("{text}\n{}", o.stderr);
    assert!(o.status.success(), "the in-place restore that takes over failed");
    assert!(o.stderr.contains("cannot be finished; this restore takes it over"), "{}", o.stderr);
    assert!(text.contains("check blocks  passed") && text.contains("was reset and runs again"), "{text}");
    assert!(journals(state.path()).is_empty(), "journal left: {:?}", journals(state.path()));
    assert_eq!(vm.qmp_ask("query-status", Value::Null).await["running"], json!(true));
}
