//! A libvirt domain quiesce did not define: the test defines a transient domain from the
//! cached Linux guest (its own copies of the files, a qcow2 overlay, the agent's channel),
//! with libvirtd started the way the benchmarks start it (quiesce-bench's `Libvirt`: the
//! running one if there is one, else one of its own in a mount namespace), and backs it up
//! with `quiesce backup --libvirt`. Afterwards the domain must be as it was: running, the
//! same disk sources, no snapshot in libvirt's records, no overlay file, the guest thawed.
//! The backup is verified and restored (blocks, files, guest): by each method, a Saved State
//! restored through libvirt beside the running domain. A paused domain stays paused. A set
//! of two domains is backed up all or nothing (one made to fail for real: nothing is left
//! on either). Skipped, saying why, where libvirt is not installed or this is not root
//! (libvirtd must be started as root here).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use quiesce::image::{qemu_img, recipe};
use quiesce::qemu::{Accel, DiskFormat};
use quiesce::sys::{deadline, Spawn, Tool};
use quiesce_bench::libvirt::{find_program, DomainSpec, Libvirt};
use serde_json::json;

use crate::common::watch::{Output, Watched};
use crate::libvirt_common::*;

/// `quiesce restore` of `backup` (with `extra` arguments) passes blocks, files and guest.
fn restore_passes(backup: &Path, extra: &[&str]) {
    let o = quiesce_tool()
        .arg("restore")
        .arg(backup)
        .args(["--check", "blocks", "--check", "files", "--check", "guest"])
        .args(extra)
        .output()
        .unwrap();
    let text = o.stdout_text();
    eprintln!("{text}\n{}", o.stderr);
    assert!(o.status.success(), "quiesce restore {} failed", backup.display());
    for check in ["blocks", "files", "guest"] {
        assert!(text.lines().any(|l| l.starts_with(&format!("check {check}")) && l.contains(" passed ")), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirt_domain_is_backed_up_through_libvirt_and_left_as_it_was() {
    let (mut lv, image, accel) = match setup().await {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED a_libvirt_domain_is_backed_up_through_libvirt_and_left_as_it_was: {why}");
            return;
        }
    };
    let dir = tempfile::Builder::new().prefix("quiesce-libvirt-test-").tempdir().unwrap();
    let name = format!("quiesce-test-{}", std::process::id());
    start_domain(&lv, &image, accel, dir.path(), &name).await;
    lv.guest_sh(&name, "echo before-backup > /root/marker && sync", T).await.unwrap();
    let before = look(&lv, &name).await;
    assert_eq!(before.0, "running");
    let out = tempfile::tempdir().unwrap();

    for (method, chosen) in
        [("auto", "child-snapshot"), ("child-snapshot", "child-snapshot"), ("saved-state", "saved-state")]
    {
        let dest = out.path().join(method);
        let up = uptime(&lv, &name).await;
        let o = backup(&lv, &name, method, &dest);
        assert!(o.status.success(), "quiesce backup --libvirt --method {method} failed");
        let text = o.stdout_text();
        assert!(text.contains(&format!("method {chosen}")), "{text}");
        for c in quiesce::backup::conditions::Condition::ALL {
            assert!(text.contains(&format!("  {} ", c.name())), "no verdict on {}: {text}", c.name());
        }
        as_it_was(&lv, &name, &before, dir.path()).await;
        // Still running, its clock going on.
        assert!(uptime(&lv, &name).await > up, "the guest's uptime did not go on after --method {method}");
        verify(&dest);
    }
    let manifest = std::fs::read_to_string(out.path().join("saved-state/manifest.json")).unwrap();
    assert!(manifest.contains("state.libvirt") && manifest.contains("libvirt-domain.xml"), "{manifest}");

    // A paused domain stays paused: auto falls back to Saved State (vm-running fails) and
    // saves it with no overlay; it is paused afterwards, and runs on when continued.
    lv.virsh(&["suspend", &name], T).await.unwrap();
    let paused = look(&lv, &name).await;
    assert_eq!(paused.0, "paused");
    let dest = out.path().join("paused");
    let o = backup(&lv, &name, "auto", &dest);
    assert!(o.status.success(), "quiesce backup of the paused domain failed");
    let text = o.stdout_text();
    assert!(text.contains("method saved-state (fell back to Saved State: ") && text.contains("vm-running"), "{text}");
    assert_eq!(look(&lv, &name).await, paused, "the paused domain is not as it was");
    verify(&dest);
    let manifest = std::fs::read_to_string(dest.join("manifest.json")).unwrap();
    assert!(
        manifest.contains("\"run_state_before\": \"paused\"") || manifest.contains("\"run_state_before\":\"paused\""),
        "{manifest}"
    );
    lv.virsh(&["resume", &name], T).await.unwrap();
    as_it_was(&lv, &name, &before, dir.path()).await;

    // A domain libvirt does not know: libvirt's own words, and nothing else happens.
    let o = backup(&lv, "no-such-domain-quiesce", "auto", &out.path().join("none"));
    assert_eq!(o.code(), Some(1));
    assert!(o.stderr.contains("dumpxml no-such-domain-quiesce") && o.stderr.contains("failed"), "{}", o.stderr);
    no_backup_at(&out.path().join("none"));

    // SIGINT once the overlays exist: the domain is put back and no backup is left.
    for (method, after) in [
        ("child-snapshot", "snapshot with the freeze (libvirt): done"),
        ("saved-state", "save the state, overlays on (libvirt checkpoint): done"),
    ] {
        let dest = out.path().join(format!("interrupted-{method}"));
        let (code, said) = interrupt_after(&lv, &name, method, after, &dest);
        assert_eq!(code, Some(130), "quiesce did not report the interruption:\n{said}");
        assert!(said.contains("put back as it was"), "{said}");
        no_backup_at(&dest);
        as_it_was(&lv, &name, &before, dir.path()).await;
    }

    // The Saved State backup restores through libvirt, beside the domain itself, and passes
    // blocks, files and guest; so does the disk-only one, into quiesce's own QEMU.
    restore_passes(&out.path().join("saved-state"), &["--connect", lv.uri()]);
    restored_on_its_own_overlays(&lv, &out.path().join("saved-state"), &before);
    restore_passes(&out.path().join("auto"), &[]);
    // This test's domains only (a restore names its domain after the backed-up one): on a
    // libvirtd shared with other tests (a system one), their domains are listed too.
    let left = lv.virsh(&["list", "--all", "--name"], T).await.unwrap();
    let ours: Vec<&str> = left.split_whitespace().filter(|d| d.starts_with(name.as_str())).collect();
    assert_eq!(ours, [name.as_str()], "the restore left a domain: {left}");
    as_it_was(&lv, &name, &before, dir.path()).await;

    // The test defined the domain, so the test destroys it (quiesce never does).
    lv.destroy(&name).await.unwrap();
    let problems = tokio::task::spawn_blocking(move || lv.stop()).await.unwrap();
    assert!(problems.is_empty(), "libvirt clean-up: {problems:?}");
}

/// A Saved State restore kept running (`--keep-running`) runs on overlays of its own (not
/// the original domain's images, which the saved XML names), and Ctrl-C destroys it.
fn restored_on_its_own_overlays(lv: &Libvirt, backup: &Path, original: &(String, String)) {
    let spawn = Spawn::new(quiesce()).arg("restore").arg(backup).args(["--connect", lv.uri(), "--keep-running"]);
    let mut w = Watched::start(spawn, Output::Stdout);
    let line = w.until("that the restored domain runs", BACKUP, |l| l.starts_with("libvirt domain "));
    let name = line["libvirt domain ".len()..].split_whitespace().next().unwrap().to_owned();
    let mut child = w.child;
    let rt = tokio::runtime::Handle::current();
    let disks = tokio::task::block_in_place(|| rt.block_on(lv.virsh(&["domblklist", &name, "--details"], T))).unwrap();
    child.signal_group(nix::sys::signal::Signal::SIGINT);
    let status = child.wait_timeout(BACKUP).expect("quiesce restore ends after SIGINT");
    assert!(status.success(), "quiesce restore --keep-running after Ctrl-C: {status:?}");
    let src = disks.split_whitespace().last().unwrap_or("").to_owned();
    assert!(src.contains("-restore-libvirt-") && src.ends_with("/vda.qcow2"), "the restored domain runs on {disks}");
    assert!(!original.1.contains(&src), "the restored domain runs on the original's image: {disks}");
    let left = tokio::task::block_in_place(|| rt.block_on(lv.virsh(&["list", "--all", "--name"], T))).unwrap();
    assert!(!left.contains(&name), "the restored domain {name} was left after Ctrl-C: {left}");
}

/// Sets and clears the immutable attribute of a folder (even root cannot create a file in
/// it): the way the test makes one domain's snapshot fail for real. Cleared on drop.
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Option<Immutable> {
        let chattr = find_program("chattr")?;
        Tool::new(chattr, T).arg("+i").arg(dir).run().ok()?;
        Some(Immutable(dir.to_owned()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        if let Some(chattr) = find_program("chattr") {
            let _ = Tool::new(chattr, T).arg("-i").arg(&self.0).run();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_of_libvirt_domains_is_backed_up_all_or_nothing() {
    let (mut lv, image, accel) = match setup().await {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED a_set_of_libvirt_domains_is_backed_up_all_or_nothing: {why}");
            return;
        }
    };
    // Each domain in a folder of its own: its overlays go there.
    let dirs = [
        tempfile::Builder::new().prefix("quiesce-libvirt-set-a-").tempdir().unwrap(),
        tempfile::Builder::new().prefix("quiesce-libvirt-set-b-").tempdir().unwrap(),
    ];
    let names = [format!("quiesce-set-a-{}", std::process::id()), format!("quiesce-set-b-{}", std::process::id())];
    for (d, n) in dirs.iter().zip(&names) {
        start_domain(&lv, &image, accel, d.path(), n).await;
    }
    let mut before = Vec::new();
    for n in &names {
        before.push(look(&lv, n).await);
    }
    let out = tempfile::tempdir().unwrap();
    let set_args = |method: &str, dest: &Path| {
        let mut a: Vec<String> = vec!["backup".into()];
        for n in &names {
            a.extend(["--libvirt".into(), n.clone()]);
        }
        a.extend(["--connect", lv.uri(), "--method", method].map(str::to_owned));
        a.push(dest.display().to_string());
        a
    };

    // Both, one backup.
    let dest = out.path().join("both");
    let o = quiesce_tool().args(set_args("auto", &dest)).output().unwrap();
    eprintln!("{}\n{}", o.stdout_text(), o.stderr);
    assert!(o.status.success(), "the set's backup failed");
    for step in ["PrepareForSnapshot: done", "Freeze: done", "Thaw: done", "PostSnapshot: done"] {
        assert!(o.stderr.contains(step), "no {step:?}: {}", o.stderr);
    }
    verify(&dest);
    let manifest = std::fs::read_to_string(dest.join("manifest.json")).unwrap();
    for n in &names {
        assert!(manifest.contains(&format!("\"{n}\"")), "{n} is not in the backup: {manifest}");
    }
    for ((n, b), d) in names.iter().zip(&before).zip(&dirs) {
        as_it_was(&lv, n, b, d.path()).await;
    }

    // The second domain's snapshot fails (its folder takes no overlay): the first, already
    // snapshotted, is put back too, and no backup is left.
    match Immutable::set(dirs[1].path()) {
        None => eprintln!("SKIPPED the all-or-nothing half: chattr +i does not work here"),
        Some(guard) => {
            let dest = out.path().join("one-fails");
            let o = quiesce_tool().args(set_args("child-snapshot", &dest)).output().unwrap();
            drop(guard);
            eprintln!("{}\n{}", o.stdout_text(), o.stderr);
            assert_eq!(o.code(), Some(1), "the set's backup did not fail");
            assert!(o.stderr.contains("PrepareForSnapshot failed"), "{}", o.stderr);
            assert!(o.stderr.contains("no domain was backed up"), "{}", o.stderr);
            assert!(o.stderr.contains(&format!("{}: put back as it was", names[0])), "{}", o.stderr);
            no_backup_at(&dest);
            for ((n, b), d) in names.iter().zip(&before).zip(&dirs) {
                as_it_was(&lv, n, b, d.path()).await;
            }
        }
    }

    for n in &names {
        lv.destroy(n).await.unwrap();
    }
    let problems = tokio::task::spawn_blocking(move || lv.stop()).await.unwrap();
    assert!(problems.is_empty(), "libvirt clean-up: {problems:?}");
}

/// Starts `quiesce backup --libvirt`, sends its process group SIGINT once its stderr
/// shows `after`, and returns its exit code and what it printed.
fn interrupt_after(lv: &Libvirt, name: &str, method: &str, after: &str, out: &Path) -> (Option<i32>, String) {
    let mut child = Spawn::new(quiesce())
        .args(backup_args(lv, name, method, out))
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
