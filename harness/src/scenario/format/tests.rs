//! The format's checks, each shown to report its mistake where it is written.

use super::*;

const GOOD: &str = r#"
description = "a running VM with a data disk"

[[vm]]
name = "vm1"
memory_mib = 256
workload = { counter = true, journal = "data" }

[[vm.disk]]
name = "data"
format = "qcow2"
size = "64M"
filesystem = "ext4"
files = { "hello.txt" = "hello\n" }

[backup]
method = "saved-state"

[restore]
checks = ["same-boot", "files-match-seed"]
"#;

/// The 1-based line of the first line of `text` that starts with `start`.
fn line_of(text: &str, start: &str) -> usize {
    text.lines().position(|l| l.starts_with(start)).expect("the line is in the text") + 1
}

fn err(text: &str) -> ScenarioError {
    parse(Path::new("scenarios/x.toml"), text).unwrap_err()
}

#[test]
fn a_good_scenario_parses() {
    let s = parse(Path::new("scenarios/good.toml"), GOOD).unwrap();
    assert_eq!(s.name, "good");
    let vm = s.vms().next().unwrap();
    assert_eq!(vm.disks[0].get_ref().files["hello.txt"], "hello\n");
    assert_eq!(s.backup().method(), MethodChoice::SavedState);
}

#[test]
fn unknown_key_names_file_line_and_expected_keys() {
    let e = err(&GOOD.replace("memory_mib = 256", "memory_mb = 256"));
    assert_eq!((e.file.to_str(), e.line), (Some("scenarios/x.toml"), 6), "{e}");
    assert!(e.message.contains("unknown field `memory_mb`") && e.message.contains("memory_mib"), "{e}");
    assert!(e.to_string().starts_with("scenarios/x.toml:6:"), "{e}");
}

#[test]
fn wrong_type_points_at_the_value() {
    let e = err(&GOOD.replace("memory_mib = 256", "memory_mib = \"lots\""));
    assert_eq!(e.line, 6, "{e}");
    assert!(e.message.contains("u32") || e.message.contains("integer"), "{e}");
}

#[test]
fn unknown_enum_value_lists_the_choices() {
    let e = err(&GOOD.replace("format = \"qcow2\"", "format = \"vmdk\""));
    assert_eq!(e.line, 11, "{e}");
    assert!(e.message.contains("qcow2") && e.message.contains("vhdx"), "{e}");
}

#[test]
fn missing_image_is_reported_at_its_line() {
    let e = err(&GOOD.replace("memory_mib = 256", "memory_mib = 256\nimage = \"windows-2000\""));
    assert_eq!(e.line, 7, "{e}");
    assert!(e.message.contains("no guest image recipe \"windows-2000\""), "{e}");
}

#[test]
fn impossible_sizes_are_reported_at_their_line() {
    for bad in ["\"0\"", "\"64Q\"", "\"huge\"", "\"999T\"", "\"99999999999999999999G\""] {
        let e = err(&GOOD.replace("size = \"64M\"", &format!("size = {bad}")));
        assert_eq!(e.line, 12, "{bad}: {e}");
    }
}

#[test]
fn missing_required_key_is_named() {
    let e = err(&GOOD.replace("format = \"qcow2\"\n", ""));
    assert!(e.message.contains("missing field `format`"), "{e}");
}

#[test]
fn cross_references_are_checked() {
    let e = err(&GOOD.replace("journal = \"data\"", "journal = \"logs\""));
    assert!(e.message.contains("journal disk \"logs\""), "{e}");
    assert_eq!(e.line, 7);
    let e = err(&GOOD.replace("filesystem = \"ext4\"\n", ""));
    assert!(e.message.contains("has no filesystem"), "{e}");
    let e = err(&GOOD.replace("name = \"data\"", "name = \"root\""));
    assert!(e.message.contains("used twice"), "{e}");
}

#[test]
fn faults_on_restored_files_need_a_disk_and_an_absolute_path() {
    let fault = "\n[[fault]]\nvm = \"vm1\"\nkind = \"flip-byte-in-restore\"\n";
    let flip = |extra: &str| format!("{GOOD}expect = \"mismatch\"\n{fault}{extra}");
    let ok = parse(Path::new("scenarios/x.toml"), &flip("disk = \"data\"\npath = \"/hello.txt\"\n")).unwrap();
    assert_eq!(ok.file.faults[0].get_ref().kind, FaultKind::FlipByteInRestore);
    let e = err(&format!("{GOOD}{fault}disk = \"data\"\npath = \"/hello.txt\"\n"));
    assert!(e.message.contains("set expect = \"mismatch\""), "{e}");
    let e = err(&flip("disk = \"data\"\n"));
    assert!(e.message.contains("needs disk"), "{e}");
    let e = err(&flip("disk = \"data\"\npath = \"hello.txt\"\n"));
    assert!(e.message.contains("absolute path") && e.line == 27, "{e}");
    let e = err(&flip("disk = \"nope\"\npath = \"/x\"\n"));
    assert!(e.message.contains("\"nope\" is not a data disk"), "{e}");
    let e = err(&format!("{GOOD}\n[[fault]]\nvm = \"vm1\"\nkind = \"save-fails\"\npath = \"/x\"\n"));
    assert!(e.message.contains("only faults on a restored file"), "{e}");
}

#[test]
fn manifests_and_rollback_are_checked_where_they_are_written() {
    let with = |extra: &str| GOOD.replace("checks = [\"same-boot\", \"files-match-seed\"]", extra);
    let e = err(&with("checks = [\"same-boot\"]\n[[restore.manifest]]\ndisk = \"data\""));
    assert!(e.message.contains("needs the check \"manifest-matches-backup\""), "{e}");
    let e = err(&with("checks = [\"manifest-matches-backup\"]"));
    assert!(e.message.contains("needs a [[restore.manifest]]") && e.line == 20, "{e}");
    let e = err(&with("checks = [\"same-boot\"]\nexpect = \"mismatch\""));
    assert!(e.message.contains("needs a fault on a restored file"), "{e}");
    let e = err(&with("checks = [\"manifest-matches-backup\"]\n[[restore.manifest]]\ndisk = \"logs\""));
    assert!(e.message.contains("no VM has a disk \"logs\"") && e.line == 22, "{e}");
    let e = err(&with("checks = [\"manifest-matches-backup\"]\n[[restore.manifest]]\nvm = \"vm9\"\ndisk = \"data\""));
    assert!(e.message.contains("no VM is named \"vm9\"") && e.line == 22, "{e}");
    let e = err(&with("checks = [\"manifest-matches-backup\"]\n[[restore.manifest]]\nvm = \"vm1\"\ndisk = \"logs\""));
    assert!(e.message.contains("VM \"vm1\" has no disk \"logs\"") && e.line == 23, "{e}");
    // Rollback cycles take their methods from [rollback]; their [backup] table is optional.
    let backup = "[backup]\nmethod = \"saved-state\"\n";
    let two = GOOD
        .replace("files = { \"hello.txt\" = \"hello\\n\" }", "files = { \"a.txt\" = \"a\", \"b.txt\" = \"b\" }")
        .replace(backup, "");
    let rb = |body: &str| format!("{two}\n[rollback]\n{body}");
    let good = rb("cycles = 5\nmethods = [\"child-snapshot\", \"saved-state\"]\ndisk = \"data\"\n");
    let s = parse(Path::new("scenarios/x.toml"), &good).unwrap();
    assert!(s.file.backup.is_none() && s.backup().expect == Expect::Success);
    let text = rb("cycles = 50\nmethods = [\"saved-state\"]\ndisk = \"data\"\n");
    let e = err(&text);
    assert!(e.message.contains("expected 1 to 20") && e.line == line_of(&text, "cycles = 50"), "{e}");
    let e = err(&rb("cycles = 2\nmethods = [\"auto\"]\ndisk = \"data\"\n"));
    assert!(e.message.contains("methods"), "{e}");
    let e = err(&rb("cycles = 2\nmethods = [\"saved-state\"]\ndisk = \"root\"\n"));
    assert!(e.message.contains("not a mounted ext4 data disk"), "{e}");
    // GOOD seeds one file only: a cycle needs one to change and one to remove.
    let one = GOOD.replace(backup, "");
    let e = err(&format!("{one}\n[rollback]\ncycles = 2\nmethods = [\"saved-state\"]\ndisk = \"data\"\n"));
    assert!(e.message.contains("two or more seeded files"), "{e}");
    // A [backup] table may still place the overlays, but a method there would mean nothing.
    let placed = format!("{good}\n[backup]\nsnapshot_dir = \"/var/tmp\"\n");
    assert!(parse(Path::new("scenarios/x.toml"), &placed).is_ok());
    let text = format!("{good}\n[backup]\nmethod = \"saved-state\"\n");
    let e = err(&text);
    assert!(e.message.contains("take their methods from [rollback]"), "{e}");
    assert_eq!((e.line, e.column), (line_of(&text, "method = \"saved"), 10), "{e}");
    let e = err(&format!("{good}\n[backup]\nexpect = \"failed\"\n"));
    assert!(e.message.contains("a backup expected to succeed"), "{e}");
    let paused = good.replace("memory_mib = 256", "memory_mib = 256\nstate = \"paused\"");
    let e = err(&paused);
    assert!(e.message.contains("must be running"), "{e}");
}

#[test]
fn backup_is_required_but_in_rollback_scenarios() {
    let e = err(&GOOD.replace("[backup]\nmethod = \"saved-state\"\n", ""));
    assert!(e.message.contains("missing table [backup]"), "{e}");
    assert!(e.to_string().starts_with("scenarios/x.toml:1:1: "), "{e}");
}

#[test]
fn ntfs_seeds_are_flat_and_unmounted_disks_take_no_journal() {
    let e = err(&GOOD
        .replace("filesystem = \"ext4\"\nfiles = { \"hello.txt\"", "filesystem = \"ntfs\"\nfiles = { \"a/hello.txt\""));
    assert!(e.message.contains("top level only"), "{e}");
    let e = err(&GOOD.replace("filesystem = \"ext4\"\n", "filesystem = \"ext4\"\nmount = false\n"));
    assert!(e.message.contains("no mounted"), "{e}");
}

#[test]
fn sizes() {
    assert_eq!(parse_size("64M"), Ok(64 << 20));
    assert_eq!(parse_size("1G"), Ok(1 << 30));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("-1M").is_err());
    assert!(parse_size("1.5G").is_err());
}

#[test]
fn faults_that_defeat_checks_need_mismatch_those_checks_and_child_snapshot() {
    let snap = GOOD.replace("method = \"saved-state\"", "method = \"child-snapshot\"");
    let fault = |kind: &str| format!("\n[[fault]]\nvm = \"vm1\"\nkind = \"{kind}\"\n");
    let with = |checks: &str, expect: &str, kind: &str| {
        snap.replace("checks = [\"same-boot\", \"files-match-seed\"]", &format!("checks = {checks}\n{expect}"))
            + &fault(kind)
    };
    let ok = parse(Path::new("x.toml"), &with("[\"fs-quiesced\"]", "expect = \"mismatch\"", "skip-freeze")).unwrap();
    assert_eq!(ok.defeated_by("vm1", Check::FsQuiesced), Some(FaultKind::SkipFreeze));
    assert_eq!(ok.defeated_by("vm1", Check::FilesMatchSeed), None);
    let e = err(&with("[\"fs-quiesced\"]", "", "skip-freeze"));
    assert!(e.message.contains("skip-freeze makes checks fail: set expect = \"mismatch\""), "{e}");
    let e = err(&with("[\"same-boot\"]", "expect = \"mismatch\"", "skip-freeze-hooks"));
    assert!(e.message.contains("list at least one of [\"app-consistent\"]"), "{e}");
    let saved = with("[\"fs-quiesced\"]", "expect = \"mismatch\"", "skip-freeze")
        .replace("method = \"child-snapshot\"", "method = \"saved-state\"");
    assert!(err(&saved).message.contains("set method = \"child-snapshot\""));
    // Check names as reports show them are those the file uses.
    for c in [Check::FsQuiesced, Check::JournalCutAtFreeze, Check::AutoRecoverable, Check::GuestFsck] {
        let parsed: Check = toml::Value::String(c.name().into()).try_into().unwrap();
        assert_eq!(parsed, c);
    }
    assert_eq!(FaultKind::ALL.len(), 18);
    for &k in FaultKind::ALL {
        let parsed: FaultKind = toml::Value::String(k.name().into()).try_into().unwrap();
        assert_eq!(parsed, k);
    }
    // The names a file gives, as its authors wrote them (kebab-case of the variant).
    assert_eq!(FaultKind::QemuKilledAfterPrepare.name(), "qemu-killed-after-prepare");
    assert_eq!(FaultKind::VssProviderUnregistered.name(), "vss-provider-unregistered");
}

#[test]
fn a_huge_value_is_not_repeated_in_full_and_a_huge_file_is_not_read() {
    // Found by the fuzz test (harness/tests/fuzz): serde repeats an unknown value whole.
    let long = "x".repeat(100_000);
    let text = format!("description = \"x\"\n[[vm]]\nname = \"vm1\"\n[backup]\nmethod = \"{long}\"\n");
    let e = parse(Path::new("s.toml"), &text).unwrap_err();
    assert_eq!((e.line, e.column), (5, 10), "{e}");
    assert!(e.message.len() < 1100 && e.message.ends_with("bytes)"), "{}", e.message.len());
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    std::fs::write(&big, format!("description = \"{}\"\n", "x".repeat(MAX_FILE_BYTES as usize))).unwrap();
    let e = load(&big).unwrap_err();
    assert!(e.message.contains("larger than"), "{e}");
}

#[test]
fn a_file_that_ends_where_a_value_belongs_says_so() {
    // Found by the fuzz test: toml gives this mistake no message of its own.
    let e = parse(Path::new("s.toml"), "description = \"x\"\n[[vm]]\nname = ").unwrap_err();
    assert_eq!(e.line, 3, "{e}");
    assert!(!e.message.is_empty(), "{e:?}");
}

/// The fuzz test's find, small: an inline table of duplicate keys, which toml builds whole
/// before it sees the duplicate (1 MiB of it held 150 MB). Past the bound on items it is
/// refused before toml sees it, at the first item past the bound.
#[test]
fn too_many_items_are_refused_where_the_bound_is_passed() {
    let head = "description = \"x\"\nw = { ";
    let text = format!("{head}{}z = 1 }}\n", "r = true,".repeat(MAX_ITEMS));
    let e = err(&text);
    // `head` has 3 items and each `r = true,` 2: item 10,001 is the `,` of pair 4,999.
    let column = "w = { ".len() + 4998 * "r = true,".len() + "r = true".len() + 1;
    assert_eq!((e.line, e.column), (2, column), "{e}");
    assert!(e.message.contains("more than 10000 keys, values and tables"), "{e}");
    // Within the bound, toml's own error is reported.
    let text = format!("{head}{}z = 1 }}\n", "r = true,".repeat(100));
    assert!(err(&text).message.contains("duplicate key `r`"), "{}", err(&text));
    // A file larger than a scenario file may be is refused whole, as `load` does.
    let e = err(&format!("description = \"{}\"", "x".repeat(MAX_FILE_BYTES as usize)));
    assert_eq!((e.line, e.column), (1, 1), "{e}");
    assert!(e.message.contains("larger than 1048576 bytes"), "{e}");
}
