//! A libvirt domain quiesce did not define: the test defines a transient domain from the
//! cached Linux guest (its own copies of the files, a qcow2 overlay, the agent's channel),
//! with libvirtd started the way the benchmarks start it (quiesce-bench's `Libvirt`: the
//! running one if there is one, else one of its own in a mount namespace), and backs it up
//! with `quiesce backup --libvirt`. Afterwards the domain must be as it was: running, the
//! same disk sources, no snapshot in libvirt's records, no overlay file, the guest thawed.
//! The backup is verified and restored (blocks, files, guest). Skipped, saying why, where
//! libvirt is not installed or this is not root (libvirtd must be started as root here).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use quiesce::image::{qemu_img, recipe};
use quiesce::qemu::{Accel, DiskFormat};
use quiesce::sys::{deadline, Spawn, Tool};
use quiesce_bench::libvirt::{find_program, DomainSpec, Libvirt};
use serde_json::json;

const T: Duration = Duration::from_secs(60);
/// A whole `quiesce backup` or restore of a 256 MiB guest under TCG on a shared machine.
const BACKUP: Duration = Duration::from_secs(600);

fn quiesce() -> &'static str {
    env!("CARGO_BIN_EXE_quiesce")
}

/// Why this machine cannot run the test, if it cannot.
fn unavailable() -> Option<String> {
    for p in ["virsh", "libvirtd"] {
        if find_program(p).is_none() {
            return Some(format!("libvirt is not installed ({p} not found): apt-get install libvirt-daemon-system libvirt-clients (ci/setup-debian.sh does)"));
        }
    }
    if !nix::unistd::geteuid().is_root() && !Path::new("/run/libvirt/libvirt-sock").exists() {
        return Some("no libvirtd is running and starting one needs root".into());
    }
    None
}

/// The domain as quiesce must leave it: its state and each disk's source.
async fn look(lv: &Libvirt, name: &str) -> (String, String) {
    let state = lv.virsh(&["domstate", name], T).await.unwrap().trim().to_owned();
    let disks = lv.virsh(&["domblklist", name, "--details"], T).await.unwrap();
    (state, disks)
}

/// Asserts the domain is as it was: same state and disks, no snapshot recorded, no overlay
/// file left, the guest thawed and answering.
async fn as_it_was(lv: &Libvirt, name: &str, before: &(String, String), dir: &Path) {
    assert_eq!(&look(lv, name).await, before, "the domain is not as it was");
    let snaps = lv.virsh(&["snapshot-list", name, "--name"], T).await.unwrap();
    assert!(snaps.trim().is_empty(), "snapshots left in libvirt's records: {snaps}");
    let left: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("-quiesce-overlay-"))
        .collect();
    assert!(left.is_empty(), "overlays left: {left:?}");
    let frozen = lv.agent(name, &json!({"execute": "guest-fsfreeze-status"}), T).await.unwrap();
    assert_eq!(frozen, json!("thawed"));
    let up = lv.guest_sh(name, "cat /proc/uptime", T).await.expect("the guest still runs commands");
    assert!(!up.trim().is_empty());
}

fn backup_args(lv: &Libvirt, name: &str, method: &str, out: &Path) -> Vec<String> {
    let mut a: Vec<String> =
        ["backup", "--libvirt", name, "--connect", lv.uri(), "--method", method].map(str::to_owned).to_vec();
    a.push(out.display().to_string());
    a
}

fn backup(lv: &Libvirt, name: &str, method: &str, out: &Path) -> quiesce::sys::Output {
    let o = Tool::new(quiesce(), BACKUP).args(backup_args(lv, name, method, out)).output().unwrap();
    eprintln!("{}\n{}", o.stdout_text(), o.stderr);
    o
}

fn no_backup_at(out: &Path) {
    assert!(!out.exists(), "{} was left", out.display());
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let partial = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(&format!(".{name}.partial")));
    assert!(!partial, "a partial backup was left beside {}", out.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirt_domain_is_backed_up_through_libvirt_and_left_as_it_was() {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED a_libvirt_domain_is_backed_up_through_libvirt_and_left_as_it_was: {why}");
        return;
    }
    let image = recipe::ensure("linux", false, &mut |s| eprintln!("  {s}")).expect("the test guest image");
    let accel = quiesce::testguest::accel_for(&image, None).expect("an accelerator").accel;
    // Where KVM does not work, libvirt must not see /dev/kvm (see quiesce-bench's notes).
    let mask_kvm = accel != Accel::Kvm && Path::new("/dev/kvm").exists();
    let mut lv = Libvirt::start(mask_kvm, &mut |s| eprintln!("  {s}")).await.expect("libvirtd answers");
    eprintln!("libvirt: {}", lv.how);
    let dir = tempfile::Builder::new().prefix("quiesce-libvirt-test-").tempdir().unwrap();
    // The domain's own copies of the cached files (hard links where they can be).
    let own = |from: &Path, to: &str| {
        let to = dir.path().join(to);
        std::fs::hard_link(from, &to).or_else(|_| std::fs::copy(from, &to).map(|_| ())).unwrap();
        to
    };
    let base = own(&image.root, "base.img");
    let overlay = dir.path().join("root.qcow2");
    qemu_img::create_overlay(&base, DiskFormat::Raw, &overlay).unwrap();
    let boot = image.kernel_boot();
    let name = format!("quiesce-test-{}", std::process::id());
    let qemu = quiesce::qemu::config::default_qemu_binary();
    let emulator = if qemu.starts_with('/') { PathBuf::from(&qemu) } else { find_program(&qemu).unwrap() };
    let spec = DomainSpec {
        name: name.clone(),
        kvm: accel == Accel::Kvm,
        emulator,
        memory_mib: 256,
        cpus: 1,
        kernel: own(&boot.kernel, "vmlinuz"),
        initrd: own(&boot.initrd, "initrd.img"),
        cmdline: boot.append.clone(),
        overlay,
        backing: base,
        backing_format: "raw".into(),
        data_disks: vec![],
        serial_log: dir.path().join("serial.log"),
    };
    lv.create(&spec).await.expect("the domain starts");
    lv.wait_agent(&name, &spec.serial_log, deadline::BOOT_TO_AGENT).await.expect("its agent answers");
    lv.guest_sh(&name, "echo before-backup > /root/marker && sync", T).await.unwrap();
    let before = look(&lv, &name).await;
    assert_eq!(before.0, "running");
    let out = tempfile::tempdir().unwrap();

    for method in ["auto", "child-snapshot"] {
        let dest = out.path().join(method);
        let o = backup(&lv, &name, method, &dest);
        assert!(o.status.success(), "quiesce backup --libvirt --method {method} failed");
        let text = o.stdout_text();
        assert!(text.contains("method child-snapshot"), "{text}");
        for c in quiesce::backup::conditions::Condition::ALL {
            assert!(text.contains(&format!("  {} ", c.name())), "no verdict on {}: {text}", c.name());
        }
        as_it_was(&lv, &name, &before, dir.path()).await;
        let v = Tool::new(quiesce(), BACKUP).arg("verify").arg(&dest).output().unwrap();
        assert!(v.status.success(), "quiesce verify: {}{}", v.stdout_text(), v.stderr);
    }

    // Saved State is refused for a domain, clearly, touching nothing.
    let dest = out.path().join("saved-state");
    let o = backup(&lv, &name, "saved-state", &dest);
    assert_eq!(o.code(), Some(1));
    assert!(o.stderr.contains("Saved State is not offered for a libvirt domain"), "{}", o.stderr);
    no_backup_at(&dest);
    as_it_was(&lv, &name, &before, dir.path()).await;

    // A domain libvirt does not know: libvirt's own words, and nothing else happens.
    let o = backup(&lv, "no-such-domain-quiesce", "auto", &out.path().join("none"));
    assert_eq!(o.code(), Some(1));
    assert!(o.stderr.contains("dumpxml no-such-domain-quiesce") && o.stderr.contains("failed"), "{}", o.stderr);
    no_backup_at(&out.path().join("none"));

    // SIGINT once the overlays exist: the domain is put back and no backup is left.
    let dest = out.path().join("interrupted");
    let (code, said) = interrupt_after(&lv, &name, "snapshot with the freeze (libvirt): done", &dest);
    assert_eq!(code, Some(130), "quiesce did not report the interruption:\n{said}");
    assert!(said.contains("put back as it was"), "{said}");
    no_backup_at(&dest);
    as_it_was(&lv, &name, &before, dir.path()).await;

    // The backup restores into a new QEMU and passes blocks, files and guest.
    let o = Tool::new(quiesce(), BACKUP)
        .arg("restore")
        .arg(out.path().join("auto"))
        .args(["--check", "blocks", "--check", "files", "--check", "guest"])
        .output()
        .unwrap();
    let text = o.stdout_text();
    eprintln!("{text}\n{}", o.stderr);
    assert!(o.status.success(), "quiesce restore failed");
    for check in ["blocks", "files", "guest"] {
        assert!(text.lines().any(|l| l.starts_with(&format!("check {check}")) && l.contains(" passed ")), "{text}");
    }

    // The test defined the domain, so the test destroys it (quiesce never does).
    lv.destroy(&name).await.unwrap();
    let problems = tokio::task::spawn_blocking(move || lv.stop()).await.unwrap();
    assert!(problems.is_empty(), "libvirt clean-up: {problems:?}");
}

/// Starts `quiesce backup --libvirt`, sends its process group SIGINT once its stderr
/// shows `after`, and returns its exit code and what it printed.
fn interrupt_after(lv: &Libvirt, name: &str, after: &str, out: &Path) -> (Option<i32>, String) {
    let mut child = Spawn::new(quiesce())
        .args(backup_args(lv, name, "child-snapshot", out))
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

/// The measurements behind the choice of libvirt's APIs over QMP passed through libvirt
/// (README, "Back up a libvirt domain"). Not a check: run it by hand with `--ignored
/// --nocapture` to see the numbers on a machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn measure_virsh_paths() {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let image = recipe::ensure("linux", false, &mut |s| eprintln!("  {s}")).unwrap();
    let accel = quiesce::testguest::accel_for(&image, None).unwrap().accel;
    let mask_kvm = accel != Accel::Kvm && Path::new("/dev/kvm").exists();
    let mut lv = Libvirt::start(mask_kvm, &mut |s| eprintln!("  {s}")).await.unwrap();
    let dir = tempfile::Builder::new().prefix("quiesce-libvirt-measure-").tempdir().unwrap();
    let overlay = dir.path().join("root.qcow2");
    qemu_img::create_overlay(&image.root, DiskFormat::Raw, &overlay).unwrap();
    let boot = image.kernel_boot();
    let name = format!("quiesce-measure-{}", std::process::id());
    let qemu = quiesce::qemu::config::default_qemu_binary();
    let emulator = if qemu.starts_with('/') { PathBuf::from(&qemu) } else { find_program(&qemu).unwrap() };
    let spec = DomainSpec {
        name: name.clone(),
        kvm: accel == Accel::Kvm,
        emulator,
        memory_mib: 256,
        cpus: 1,
        kernel: boot.kernel.clone(),
        initrd: boot.initrd.clone(),
        cmdline: boot.append.clone(),
        overlay: overlay.clone(),
        backing: image.root.clone(),
        backing_format: "raw".into(),
        data_disks: vec![],
        serial_log: dir.path().join("serial.log"),
    };
    lv.create(&spec).await.unwrap();
    lv.wait_agent(&name, &spec.serial_log, deadline::BOOT_TO_AGENT).await.unwrap();
    let log = Path::new("/var/log/libvirt/qemu").join(format!("{name}.log"));
    let taints = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().filter(|l| l.contains("tainted")).map(str::to_owned).collect::<Vec<_>>()
    };
    let time = |label: &str, runs: u32, took: Duration| {
        eprintln!("MEASURE {label}: {:.1} ms per call ({runs} calls)", took.as_secs_f64() * 1000.0 / f64::from(runs));
    };
    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        lv.virsh(&["domstate", &name], T).await.unwrap();
    }
    time("virsh domstate (a libvirt API call)", n, t.elapsed());
    eprintln!("MEASURE taint lines before any passthrough: {:?}", taints());
    let t = Instant::now();
    for _ in 0..n {
        lv.agent(&name, &json!({"execute": "guest-ping"}), T).await.unwrap();
    }
    time("virsh qemu-agent-command guest-ping", n, t.elapsed());
    eprintln!("MEASURE taint lines after qemu-agent-command: {:?}", taints());
    let t = Instant::now();
    for _ in 0..n {
        lv.virsh(&["qemu-monitor-command", &name, "{\"execute\":\"query-status\"}"], T).await.unwrap();
    }
    time("virsh qemu-monitor-command query-status", n, t.elapsed());
    eprintln!("MEASURE taint lines after qemu-monitor-command: {:?}", taints());
    // An overlay added behind libvirt's back: does its XML know of it?
    let side = dir.path().join("side.qcow2");
    let add = json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "quiesce-side",
        "file": {"driver": "file", "filename": side.display().to_string()}}});
    qemu_img::create_overlay(&image.root, DiskFormat::Raw, &side).unwrap();
    let r = lv.virsh(&["qemu-monitor-command", &name, &add.to_string()], T).await;
    eprintln!("MEASURE blockdev-add through the monitor: {r:?}");
    let xml = lv.virsh(&["dumpxml", &name], T).await.unwrap();
    eprintln!("MEASURE the XML names the node added behind libvirt's back: {}", xml.contains("side.qcow2"));
    let del = json!({"execute": "blockdev-del", "arguments": {"node-name": "quiesce-side"}});
    let _ = lv.virsh(&["qemu-monitor-command", &name, &del.to_string()], T).await;
    // Events: does a monitor client through libvirt see a block job's events?
    let events_log = dir.path().join("events.log");
    let mut events = Spawn::new(find_program("virsh").unwrap())
        .args(["-c", lv.uri(), "qemu-monitor-event", &name, "--loop", "--timeout", "60", "--timestamp"])
        .stdout(std::fs::File::create(&events_log).unwrap())
        .spawn()
        .unwrap();
    // libvirt's own snapshot with the freeze, and its commit back.
    let snap = dir.path().join("snap.qcow2");
    let t = Instant::now();
    lv.virsh(
        &[
            "snapshot-create-as",
            &name,
            "--name",
            "m",
            "--disk-only",
            "--quiesce",
            "--atomic",
            "--no-metadata",
            "--diskspec",
            &format!("vda,snapshot=external,file={}", snap.display()),
        ],
        T,
    )
    .await
    .unwrap();
    time("virsh snapshot-create-as --disk-only --quiesce (freeze, overlay, thaw)", 1, t.elapsed());
    let t = Instant::now();
    lv.virsh(&["blockcommit", &name, "vda", "--active", "--shallow", "--pivot", "--wait"], BACKUP).await.unwrap();
    time("virsh blockcommit --active --shallow --pivot", 1, t.elapsed());
    events.signal_group(nix::sys::signal::Signal::SIGTERM);
    events.wait_timeout(T);
    let seen = std::fs::read_to_string(&events_log).unwrap_or_default();
    let names: Vec<&str> = seen
        .lines()
        .filter_map(|l| {
            l.split_whitespace().find(|w| w.chars().all(|c| c.is_ascii_uppercase() || c == '_') && w.len() > 3)
        })
        .collect();
    eprintln!("MEASURE qemu-monitor-event during the snapshot and commit: {names:?}");
    eprintln!("MEASURE taint lines at the end: {:?}", taints());
    lv.destroy(&name).await.unwrap();
    let problems = tokio::task::spawn_blocking(move || lv.stop()).await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}
