//! The `quiesce` binary as a user meets it: mistakes in scenario files, bad backups.

use std::process::Command;

fn quiesce() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quiesce"))
}

#[test]
fn a_scenario_with_a_mistake_names_file_and_line_and_boots_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "description = \"x\"\n\n[[vm]]\nname = \"vm1\"\n\n[[vm.disk]]\nname = \"d\"\nformat = \"qcow2\"\nsize = \"12 parsecs\"\n\n[backup]\n",
    )
    .unwrap();
    let reports = dir.path().join("reports");
    let out = quiesce().arg("run").arg(&bad).arg("--report-dir").arg(&reports).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{}:9:8: size \"12 parsecs\"", bad.display())), "{stderr}");
    assert!(stderr.contains("nothing was run"), "{stderr}");
    assert!(!reports.exists(), "a report folder means something ran");
}

#[test]
fn every_bad_file_is_reported_before_any_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), "description = \"a\"\nvm = 3\n[backup]\n").unwrap();
    std::fs::write(dir.path().join("b.toml"), "descripton = \"typo\"\n").unwrap();
    let out = quiesce().arg("run").arg(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("a.toml:2:"), "{stderr}");
    assert!(stderr.contains("b.toml:1:1: unknown field `descripton`"), "{stderr}");
}

#[test]
fn verify_refuses_a_folder_that_is_not_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let out = quiesce().arg("verify").arg(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a quiesce backup"), "{stderr}");
}

/// A real SIGINT to the harness between the freeze and the thaw: the guest is thawed, the
/// overlay merged, the VM running as before, no backup, and the exit code says interrupted.
#[test]
#[cfg_attr(not(feature = "vm-tests"), ignore = "boots a guest: cargo test --features vm-tests")]
fn sigint_between_freeze_and_thaw_puts_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sigint.toml");
    std::fs::write(
        &file,
        "description = \"real SIGINT after the freeze\"\n\n[[vm]]\nname = \"vm1\"\nworkload = { journal = \"data\" }\n\n\
         [[vm.disk]]\nname = \"data\"\nformat = \"qcow2\"\nsize = \"32M\"\nfilesystem = \"ext4\"\n\n\
         [[fault]]\nvm = \"vm1\"\nkind = \"sigint-after-freeze\"\n\n[backup]\nmethod = \"auto\"\nexpect = \"interrupted\"\n",
    )
    .unwrap();
    let reports = dir.path().join("reports");
    let out = quiesce().arg("run").arg(&file).arg("--report-dir").arg(&reports).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reports.join("sigint.json")).unwrap()).unwrap();
    let checks = report["checks"].as_array().unwrap();
    let passed = |name: &str| checks.iter().any(|c| c["check"] == name && c["passed"] == true);
    for c in [
        "backup-failed-as-expected",
        "every-vm-put-back",
        "no-backup-written",
        "guest-thawed",
        "no-overlays-left",
        "state-unchanged",
        "nothing-lost",
    ] {
        assert!(passed(c), "{c} did not pass: {report:#}");
    }
    assert_eq!(report["failure"], "interrupted in PrepareForSnapshot");
}

/// A kept backup verifies; one flipped byte in one of its disks is caught and named.
#[test]
#[cfg_attr(not(feature = "vm-tests"), ignore = "boots a guest: cargo test --features vm-tests")]
fn verify_catches_a_flipped_byte_in_a_kept_backup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keep.toml");
    std::fs::write(
        &file,
        "description = \"x\"\n\n[[vm]]\nname = \"vm1\"\nstate = \"paused\"\n\n[backup]\nmethod = \"saved-state\"\n",
    )
    .unwrap();
    let reports = dir.path().join("reports");
    let out = quiesce().arg("run").arg(&file).arg("--keep-backups").arg("--report-dir").arg(&reports).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let backup = reports.join("work").join("keep-backup");
    let ok = quiesce().arg("verify").arg(&backup).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("all checksums match"));

    let disk = backup.join("vms/vm1/root.qcow2");
    let mut bytes = std::fs::read(&disk).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&disk, bytes).unwrap();
    let bad = quiesce().arg("verify").arg(&backup).output().unwrap();
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("MISMATCH") && stdout.contains("vms/vm1/root.qcow2"), "{stdout}");

    // The boot files a restore boots are checked too.
    let kernel = backup.join("vms/vm1/boot/vmlinuz");
    let mut bytes = std::fs::read(&kernel).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&kernel, bytes).unwrap();
    let bad = quiesce().arg("verify").arg(&backup).output().unwrap();
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(&format!("MISMATCH {}", kernel.display())), "{stdout}");
    assert!(stdout.contains("2 of "), "{stdout}");
}

/// A backup of one VM written by quiesce's own writer, with no guest: a disk, a state and
/// the boot files, as a Saved State backup has them.
fn small_backup(dir: &std::path::Path) -> std::path::PathBuf {
    use quiesce::backup::folder::sha256_file;
    let path = dir.join("backup");
    let mut w = quiesce::backup::BackupWriter::create(&path, "10.0.2").unwrap();
    let vm_dir = w.vm_dir("vm1").unwrap();
    std::fs::create_dir_all(vm_dir.join("boot")).unwrap();
    for (f, content) in [
        ("root.qcow2", "a disk"),
        ("state.bin", "a state"),
        ("boot/vmlinuz", "a kernel"),
        ("boot/initrd.img", "an initrd"),
    ] {
        std::fs::write(vm_dir.join(f), content).unwrap();
    }
    let (disk_sha, disk_bytes) = sha256_file(&vm_dir.join("root.qcow2")).unwrap();
    let (state_sha, state_bytes) = sha256_file(&vm_dir.join("state.bin")).unwrap();
    let vm = serde_json::from_value(serde_json::json!({
        "name": "vm1", "method": "saved-state", "method_reason": "test", "run_state_before": "running",
        "machine": {"machine_type": "q35", "accel": "tcg", "memory_mib": 256, "cpus": 1, "agent": true,
                    "kernel": "boot/vmlinuz", "initrd": "boot/initrd.img", "append": "", "disk_order": ["root"]},
        "disks": [{"node_name": "root", "format": "qcow2", "virtual_size": 6, "file": "root.qcow2", "bytes": disk_bytes, "sha256": disk_sha}],
        "state": {"file": "state.bin", "bytes": state_bytes, "sha256": state_sha, "mapped_ram": false, "multifd_channels": null},
        "timings": {"capture_ms": 1.0},
    }))
    .unwrap();
    w.add(vm);
    w.commit().unwrap();
    path
}

fn edit_manifest(backup: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let m = backup.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&m, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn verify(backup: &std::path::Path) -> (Option<i32>, String, String) {
    let out = quiesce().arg("verify").arg(backup).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The attack of issue 14: a manifest that names a host file. verify refuses the backup,
/// naming the entry and the path, and hashes nothing.
#[test]
fn verify_refuses_a_manifest_that_names_a_host_file() {
    let dir = tempfile::tempdir().unwrap();
    let backup = small_backup(dir.path());
    assert_eq!(verify(&backup).0, Some(0));
    edit_manifest(&backup, |m| m["vms"][0]["disks"][0]["file"] = "../../../../etc/passwd".into());
    let (code, stdout, stderr) = verify(&backup);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(
            "VM vm1: the disk root is \"../../../../etc/passwd\", which is refused: it has a \"..\" component"
        ),
        "{stderr}"
    );
    assert!(!stdout.contains("MISMATCH") && !stdout.contains("checksums"), "nothing was hashed: {stdout}");

    let backup = small_backup(&dir.path().join("abs"));
    edit_manifest(&backup, |m| m["vms"][0]["state"]["file"] = "/etc/passwd".into());
    let (code, _, stderr) = verify(&backup);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("the saved state is \"/etc/passwd\", which is refused: it is absolute"), "{stderr}");

    // The same through diff, which reads a backup's disks.
    let other = small_backup(&dir.path().join("other"));
    let out = quiesce().arg("diff").arg(&other).arg(&backup).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("which is refused: it is absolute"), "{stderr}");
}

/// A link inside the backup is refused wherever it leads: a disk linked to a host file, a
/// VM folder linked to a folder elsewhere.
#[test]
fn verify_refuses_links_out_of_the_backup() {
    let dir = tempfile::tempdir().unwrap();
    let backup = small_backup(&dir.path().join("a"));
    let disk = backup.join("vms/vm1/root.qcow2");
    std::fs::remove_file(&disk).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &disk).unwrap();
    let (code, _, stderr) = verify(&backup);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("vms/vm1/root.qcow2 is a symbolic link to \"/etc/passwd\", which leads outside the backup"),
        "{stderr}"
    );

    let backup = small_backup(&dir.path().join("b"));
    let elsewhere = dir.path().join("elsewhere");
    std::fs::rename(backup.join("vms/vm1"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, backup.join("vms/vm1")).unwrap();
    let (code, _, stderr) = verify(&backup);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("vms/vm1 is a symbolic link to"), "{stderr}");
}

/// Every file is checked (a flipped byte in the kernel is named); a file the manifest does
/// not list is a warning that names it, and verify still passes.
#[test]
fn verify_checks_boot_files_and_warns_of_unlisted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let backup = small_backup(dir.path());
    std::fs::write(backup.join("vms/vm1/boot/notes.txt"), "?").unwrap();
    let (code, stdout, stderr) = verify(&backup);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("1 VMs, 4 files, all checksums match"), "{stdout}");
    assert!(
        stderr.contains("warning: vms/vm1/boot/notes.txt: a file the manifest does not list (not part of the backup)"),
        "{stderr}"
    );
    std::fs::write(backup.join("vms/vm1/boot/vmlinuz"), "a kernem").unwrap();
    let (code, stdout, _) = verify(&backup);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("MISMATCH {}: expected sha256", backup.join("vms/vm1/boot/vmlinuz").display())),
        "{stdout}"
    );
}

#[test]
fn diff_blocks_finds_what_lies_below_the_files() {
    use quiesce::image::seed::{self, DiskSeed};
    use quiesce::qemu::DiskFormat;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let make = |sub: &str| {
        let d = dir.path().join(sub);
        std::fs::create_dir(&d).unwrap();
        let mut seed = DiskSeed::ext4("data", DiskFormat::Raw, 16 << 20);
        seed.files.insert("hello.txt".into(), "hello\n".into());
        seed::create(&d, &seed).unwrap()
    };
    let (a, b) = (make("a"), make("b"));
    // One byte in the last, free, block: no file changes, but the disks differ.
    let at = (16 << 20) - 100;
    std::fs::OpenOptions::new().write(true).open(&b).unwrap().write_all_at(&[0x5a], at).unwrap();
    let files_only = quiesce().arg("diff").arg(&a).arg(&b).output().unwrap();
    let stdout = String::from_utf8_lossy(&files_only.stdout);
    assert_eq!(files_only.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("identical"), "{stdout}");
    let blocks = quiesce().arg("diff").arg("--blocks").arg(&a).arg(&b).output().unwrap();
    let stdout = String::from_utf8_lossy(&blocks.stdout);
    assert_eq!(blocks.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(&format!("= blocks: differ at byte {at}")), "{stdout}");
    assert!(stdout.contains("1 disk(s) differ block by block"), "{stdout}");
}

/// `quiesce report DIR` rebuilds the page and the JUnit file from the JSON reports a run
/// left, and prints the summary: one row per VM, and the counts.
#[test]
fn report_rebuilds_the_page_and_junit_from_json_reports() {
    let dir = tempfile::tempdir().unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reports");
    for e in std::fs::read_dir(&data).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "json") {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    let junit = dir.path().join("out/junit.xml");
    let out = quiesce().arg("report").arg(dir.path()).arg("--junit").arg(&junit).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("5 passed, 2 failed, 1 skipped"), "{stdout}");
    // The set of three VMs: a row each, with its own method.
    let set: Vec<&str> = stdout.lines().skip_while(|l| !l.starts_with("set-three-vms-mixed")).take(3).collect();
    assert!(set[0].contains("web") && set[0].contains("child-snapshot"), "{stdout}");
    assert!(set[2].contains("batch") && set[2].contains("saved-state") && set[2].contains("none (paused)"), "{stdout}");
    let page = std::fs::read_to_string(dir.path().join("index.html")).unwrap();
    assert!(page.contains(r#"id="s-qemu-killed-unexpectedly" data-status="failed""#));
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains(r#"<testcase name="windows-child-snapshot" classname="quiesce.scenarios""#), "{xml}");

    // A file in the folder that is not a report is named, and nothing is written over.
    std::fs::write(dir.path().join("notes.json"), "{\"hello\": 1}").unwrap();
    let bad = quiesce().arg("report").arg(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("notes.json: not a quiesce scenario report"), "{stderr}");
}

/// `quiesce run --junit FILE` on a real guest: the JUnit file has the scenario as a passed
/// test case with its time, and the report folder has the page with the VM's timeline.
#[test]
#[cfg_attr(not(feature = "vm-tests"), ignore = "boots a guest: cargo test --features vm-tests")]
fn run_writes_junit_and_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("paused.toml");
    std::fs::write(
        &file,
        "description = \"a paused VM saved\"\n\n[[vm]]\nname = \"vm1\"\nstate = \"paused\"\n\n[backup]\nmethod = \"saved-state\"\n",
    )
    .unwrap();
    let reports = dir.path().join("reports");
    let junit = dir.path().join("ci/junit.xml");
    let out = quiesce()
        .arg("run")
        .arg(&file)
        .arg("--report-dir")
        .arg(&reports)
        .arg("--junit")
        .arg(&junit)
        .env("CI", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // In CI, plain progress lines: the scenario, its steps, its result.
    assert!(stderr.contains("[1/1] paused\n") && stderr.contains("[1/1] paused: passed ("), "{stderr}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    let back = quick_junit::Report::deserialize_from_str(&xml).unwrap();
    let case = &back.test_suites[0].test_cases[0];
    assert_eq!(case.name.as_str(), "paused");
    assert!(matches!(case.status, quick_junit::TestCaseStatus::Success { .. }), "{xml}");
    assert!(case.time.is_some_and(|t| t.as_secs_f64() > 0.5), "{xml}");
    let page = std::fs::read_to_string(reports.join("index.html")).unwrap();
    assert!(page.contains(r#"id="s-paused" data-status="passed""#), "{page}");
    assert!(page.contains(r#"<svg class="timeline" data-vm="vm1""#) && page.contains("none: the VM was paused"));
}

/// A QEMU as a person starts one, with the disks given and no guest: `-S`, so no CPU ever
/// runs and it starts at once even under TCG. Enough for what quiesce must refuse before
/// it touches a VM. The test started it, so the test stops it.
struct PausedQemu {
    dir: std::path::PathBuf,
    process: quiesce::sys::Process,
}

impl PausedQemu {
    fn start(dir: &std::path::Path, disks: &[&str]) -> PausedQemu {
        use quiesce::sys::{deadline, Tool};
        let d = dir.display();
        let mut args: Vec<String> = ["-name", "mine", "-M", "q35", "-accel", "tcg", "-S", "-display", "none"]
            .into_iter()
            .map(String::from)
            .collect();
        args.extend(["-nodefaults".into(), "-qmp".into(), format!("unix:{d}/qmp.sock,server=on,wait=off")]);
        args.extend(disks.iter().map(|s| s.to_string()));
        args.extend(["-pidfile".into(), format!("{d}/qemu.pid"), "-daemonize".into()]);
        Tool::new("qemu-system-x86_64", deadline::QMP_CONNECT).args(&args).run().expect("QEMU starts");
        let pid: u32 = std::fs::read_to_string(dir.join("qemu.pid")).unwrap().trim().parse().unwrap();
        PausedQemu { dir: dir.to_owned(), process: quiesce::sys::Process::open(pid).unwrap() }
    }

    fn qmp(&self) -> std::path::PathBuf {
        self.dir.join("qmp.sock")
    }

    /// What quiesce must leave as it found it: run state and block nodes.
    async fn state(&self) -> serde_json::Value {
        use quiesce::qemu::{Qmp, Transcript};
        use quiesce::sys::deadline;
        let s = tokio::net::UnixStream::connect(self.qmp()).await.unwrap();
        let t = Transcript::create(&self.dir.join("test-qmp.log")).unwrap();
        let q = Qmp::connect(s, t, deadline::QMP_CONNECT).await.unwrap();
        let status = q.execute_raw("query-status", serde_json::Value::Null, deadline::QMP_COMMAND).await.unwrap();
        let nodes =
            q.execute_raw("query-named-block-nodes", serde_json::json!({"flat": true}), deadline::QMP_COMMAND).await;
        let mut nodes: Vec<String> = nodes
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|n| format!("{} {} {} ro={} active={}", n["node-name"], n["drv"], n["file"], n["ro"], n["active"]))
            .collect();
        nodes.sort();
        serde_json::json!({"status": status["status"], "nodes": nodes})
    }
}

impl Drop for PausedQemu {
    fn drop(&mut self) {
        self.process.terminate(quiesce::sys::deadline::QEMU_QUIT);
    }
}

fn qcow2(path: &std::path::Path, size: u64) -> std::path::PathBuf {
    quiesce::image::qemu_img::create(path, quiesce::qemu::DiskFormat::Qcow2, size).unwrap();
    path.to_owned()
}

fn sha(path: &std::path::Path) -> String {
    quiesce::backup::folder::sha256_file(path).unwrap().0
}

/// `quiesce restore BACKUP --in-place --qmp SOCKET` is refused, and the VM and its images
/// left as they were, when the VM's disks differ from the backup's in number, format or
/// size: the message says what differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "vm-tests"), ignore = "starts QEMU (no guest): cargo test --features vm-tests")]
async fn in_place_restore_onto_another_layout_is_refused_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A backup of one 1 MiB qcow2 disk, "root".
    let backup = small_backup(dir.path());
    let opened = quiesce::backup::Backup::open(&backup).unwrap();
    let disk = qcow2(&opened.vm_dir("vm1").join(&opened.vm("vm1").unwrap().disks[0].file), 1 << 20);
    let (disk_sha, disk_bytes) = quiesce::backup::folder::sha256_file(&disk).unwrap();
    edit_manifest(&backup, |m| {
        let d = &mut m["vms"][0]["disks"][0];
        (d["sha256"], d["bytes"], d["virtual_size"]) =
            (disk_sha.clone().into(), disk_bytes.into(), (1u64 << 20).into());
    });
    let (code, out, err) = verify(&backup);
    assert_eq!(code, Some(0), "the test's backup does not verify: {out}{err}");

    let drive = |p: &std::path::Path, fmt: &str| format!("file={},if=virtio,format={fmt}", p.display());
    // What differs, the VM's disks (size, format), and what the refusal must say.
    let cases = [
        ("number", vec![(1 << 20, "qcow2"), (1 << 20, "qcow2")], "the backup has 1 disks, the VM 2"),
        ("format", vec![(1 << 20, "raw")], "is qcow2 in the backup, but the VM's disk"),
        ("size", vec![(2 << 20, "qcow2")], "is 1048576 bytes in the backup, but the VM's disk"),
    ];
    for (what, disks, says) in cases {
        let vm_dir = dir.path().join(what);
        std::fs::create_dir(&vm_dir).unwrap();
        let mut images = Vec::new();
        let mut args = Vec::new();
        for (i, (size, fmt)) in disks.iter().enumerate() {
            let p = vm_dir.join(format!("d{i}.{fmt}"));
            match *fmt {
                "raw" => quiesce::image::qemu_img::create(&p, quiesce::qemu::DiskFormat::Raw, *size).unwrap(),
                _ => drop(qcow2(&p, *size)),
            }
            args.extend(["-drive".to_owned(), drive(&p, fmt)]);
            images.push(p);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let vm = PausedQemu::start(&vm_dir, &args);
        let before = vm.state().await;
        let hashes: Vec<String> = images.iter().map(|p| sha(p)).collect();
        let o = quiesce().arg("restore").arg(&backup).args(["--in-place", "--qmp"]).arg(vm.qmp()).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains("does not match the backup, so nothing was touched"), "{what}: {stderr}");
        assert!(stderr.contains(says), "{what}: {stderr}");
        assert_eq!(vm.state().await, before, "{what}: the VM was touched");
        assert_eq!(images.iter().map(|p| sha(p)).collect::<Vec<_>>(), hashes, "{what}: an image was written");
    }
    assert_eq!(sha(&disk), disk_sha, "the backup's image was written");
}

/// `quiesce backup` of a VM with a disk quiesce cannot read (behind a throttle filter; an
/// image deleted under the running QEMU) is refused with the disk and the reason named,
/// no backup folder, and the VM as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "vm-tests"), ignore = "starts QEMU (no guest): cargo test --features vm-tests")]
async fn a_disk_quiesce_cannot_read_is_refused_and_the_vm_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let throttled_dir = dir.path().join("throttled");
    std::fs::create_dir(&throttled_dir).unwrap();
    let img = qcow2(&throttled_dir.join("t.qcow2"), 1 << 20);
    let throttled = [
        "-object".to_owned(),
        "throttle-group,id=tg0,x-bps-total=1048576".to_owned(),
        "-blockdev".to_owned(),
        format!("driver=file,filename={},node-name=f0", img.display()),
        "-blockdev".to_owned(),
        "driver=qcow2,file=f0,node-name=q0".to_owned(),
        "-blockdev".to_owned(),
        "driver=throttle,throttle-group=tg0,file=q0,node-name=slow".to_owned(),
        "-device".to_owned(),
        "virtio-blk-pci,drive=slow".to_owned(),
    ];
    let gone_dir = dir.path().join("gone");
    std::fs::create_dir(&gone_dir).unwrap();
    let gone = qcow2(&gone_dir.join("g.qcow2"), 1 << 20);
    let deleted = ["-drive".to_owned(), format!("file={},if=virtio,format=qcow2", gone.display())];
    let cases: [(&std::path::Path, &[String], String); 2] = [
        (&throttled_dir, &throttled, "its node slow is a throttle node".to_owned()),
        (&gone_dir, &deleted, format!("quiesce cannot read its image {}", gone.display())),
    ];
    for (vm_dir, args, says) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let vm = PausedQemu::start(vm_dir, &args);
        if vm_dir == gone_dir {
            // QEMU keeps it open; the path no longer leads to it.
            std::fs::remove_file(&gone).unwrap();
        }
        let before = vm.state().await;
        let out = vm_dir.join("backup");
        let o =
            quiesce().args(["backup", "--method", "saved-state", "--qmp"]).arg(vm.qmp()).arg(&out).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&says), "{stderr}");
        assert!(!out.exists(), "a backup folder was left");
        assert_eq!(vm.state().await, before, "the VM was touched");
    }
}
