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
