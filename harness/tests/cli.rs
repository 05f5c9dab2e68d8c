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
