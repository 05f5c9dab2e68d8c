//! VMs quiesce did not start: a QEMU started here from a plain command line, as a person
//! starts one (`-drive if=virtio`, so QEMU names the nodes itself; its own QMP and agent
//! sockets; daemonized, so in a session and process group of its own), is backed up by the
//! `quiesce backup` binary. Afterwards it must be as it was: running, its counter going,
//! the guest thawed, no overlay node, the migration settings unchanged.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use quiesce::image::qemu_img;
use quiesce::image::recipe;
use quiesce::qemu::{DiskFormat, GuestAgent, Qmp, Transcript};
use quiesce::sys::{deadline, Process, Spawn, Tool};
use quiesce::workload;

const T: Duration = Duration::from_secs(60);
/// A whole `quiesce backup` of a 256 MiB guest under TCG on a shared machine.
const BACKUP: Duration = Duration::from_secs(600);

/// A QEMU started by hand (by the test), stopped when dropped: quiesce never stops it.
pub struct HandStarted {
    pub dir: tempfile::TempDir,
    pub process: Process,
}

impl HandStarted {
    pub fn qmp(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    pub fn agent(&self) -> PathBuf {
        self.dir.path().join("qga.sock")
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root.qcow2")
    }

    /// Starts the cached Linux test guest as a person would, and waits for its agent.
    pub async fn start(name: &str) -> HandStarted {
        let image = recipe::ensure("linux", false, &mut |s| eprintln!("  {s}")).expect("the test guest image");
        let accel = quiesce::testguest::accel_for(&image, None).expect("an accelerator").accel;
        let dir = tempfile::Builder::new().prefix(&format!("quiesce-own-{name}-")).tempdir().unwrap();
        // The VM's own copies (hard links where they can be) of the cached files: the shared
        // cache may replace its image while the VM runs, and a person's VM owns its files.
        let own = |from: &Path, name: &str| {
            let to = dir.path().join(name);
            std::fs::hard_link(from, &to).or_else(|_| std::fs::copy(from, &to).map(|_| ())).unwrap();
            to
        };
        let base = own(&image.root, "base.img");
        let root = dir.path().join("root.qcow2");
        qemu_img::create_overlay(&base, DiskFormat::Raw, &root).unwrap();
        let mut boot = image.kernel_boot();
        boot.kernel = own(&boot.kernel, "vmlinuz");
        boot.initrd = own(&boot.initrd, "initrd.img");
        let d = dir.path().display();
        let args: Vec<String> = vec![
            "-name".into(),
            name.into(),
            "-M".into(),
            "q35".into(),
            "-accel".into(),
            accel.as_str().into(),
            "-m".into(),
            "256".into(),
            "-display".into(),
            "none".into(),
            "-nodefaults".into(),
            "-kernel".into(),
            boot.kernel.display().to_string(),
            "-initrd".into(),
            boot.initrd.display().to_string(),
            "-append".into(),
            boot.append.clone(),
            "-drive".into(),
            format!("file={},if=virtio,format=qcow2", root.display()),
            "-qmp".into(),
            format!("unix:{d}/qmp.sock,server=on,wait=off"),
            "-chardev".into(),
            format!("socket,path={d}/qga.sock,server=on,wait=off,id=qga0"),
            "-device".into(),
            "virtio-serial-pci".into(),
            "-device".into(),
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
            "-serial".into(),
            format!("file:{d}/serial.log"),
            "-pidfile".into(),
            format!("{d}/qemu.pid"),
            // The parent exits once the sockets exist: no waiting for files to appear.
            "-daemonize".into(),
        ];
        Tool::new("qemu-system-x86_64", deadline::QMP_CONNECT).args(&args).run().expect("QEMU starts");
        let pid: u32 = std::fs::read_to_string(dir.path().join("qemu.pid")).unwrap().trim().parse().unwrap();
        let process = Process::open(pid).expect("QEMU is running");
        let vm = HandStarted { dir, process };
        let a = vm.agent_conn().await;
        a.wait_ready(deadline::BOOT_TO_AGENT).await.expect("the guest agent answers");
        workload::start_counter(&a).await.unwrap();
        drop(a);
        vm
    }

    /// A connection to the guest agent; drop it before quiesce runs (the agent's socket
    /// serves one client at a time).
    pub async fn agent_conn(&self) -> GuestAgent {
        let s = tokio::net::UnixStream::connect(self.agent()).await.unwrap();
        let t = Transcript::create(&self.dir.path().join("test-agent.log")).unwrap();
        GuestAgent::new(s, t)
    }

    /// Asks QEMU `command` on a connection of its own, closed afterwards.
    pub async fn qmp_ask(&self, command: &str, args: Value) -> Value {
        let s = tokio::net::UnixStream::connect(self.qmp()).await.unwrap();
        let t = Transcript::create(&self.dir.path().join("test-qmp.log")).unwrap();
        let q = Qmp::connect(s, t, deadline::QMP_CONNECT).await.unwrap();
        q.execute_raw(command, args, deadline::QMP_COMMAND).await.unwrap()
    }

    /// What must be the same before and after a backup: run state, block nodes (by driver
    /// and file: no overlay left), the migration settings a save changes.
    pub async fn state(&self) -> Value {
        let status = self.qmp_ask("query-status", Value::Null).await;
        let nodes = self.qmp_ask("query-named-block-nodes", json!({"flat": true})).await;
        let mut nodes: Vec<String> =
            nodes.as_array().unwrap().iter().map(|n| format!("{} {} ro={}", n["drv"], n["file"], n["ro"])).collect();
        nodes.sort();
        let caps = self.qmp_ask("query-migrate-capabilities", Value::Null).await;
        let params = self.qmp_ask("query-migrate-parameters", Value::Null).await;
        json!({"status": status["status"], "running": status["running"], "nodes": nodes, "caps": caps,
               "bandwidth": params["max-bandwidth"], "channels": params["multifd-channels"]})
    }

    /// The guest is thawed and its counter moves past its last value.
    pub async fn assert_alive(&self) {
        let a = self.agent_conn().await;
        a.wait_ready(T).await.unwrap();
        let frozen = a.execute_raw("guest-fsfreeze-status", Value::Null, T).await.unwrap();
        assert_eq!(frozen, json!("thawed"));
        let c = workload::read_counter(&a).await.unwrap();
        workload::wait_counter_above(&a, c, T).await.expect("the counter goes on");
    }
}

impl Drop for HandStarted {
    fn drop(&mut self) {
        // The test started it, so the test stops it (quiesce never does).
        self.process.terminate(deadline::QEMU_QUIT);
    }
}

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
    let mut child = Spawn::new(quiesce())
        .args(["backup", "--qmp"])
        .arg(vm.qmp())
        .arg("--agent")
        .arg(vm.agent())
        .args(["--method", method])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.take_stderr().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let start = Instant::now();
    loop {
        let left = BACKUP.saturating_sub(start.elapsed());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no {after:?} from quiesce; it said:\n{seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(after) {
            break;
        }
    }
    child.signal_group(nix::sys::signal::Signal::SIGINT);
    let status = child.wait_timeout(BACKUP).expect("quiesce ends after SIGINT");
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        seen.push_str(&line);
        seen.push('\n');
    }
    eprintln!("{seen}");
    (status.code(), seen)
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
