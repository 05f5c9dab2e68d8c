use std::os::unix::fs::symlink;

use serde_json::{json, Value};

use super::*;
use crate::backup::manifest::{sample_vm, DiskEntry};
use crate::qemu::DiskFormat;

/// A VM's folder as a backup writes it: one disk and the kernel and initrd under boot/.
fn vm(dir: &Path) -> VmBackup {
    std::fs::write(dir.join("d.raw"), b"disk bytes").unwrap();
    std::fs::create_dir_all(dir.join("boot")).unwrap();
    std::fs::write(dir.join("boot/vmlinuz"), b"a kernel").unwrap();
    std::fs::write(dir.join("boot/initrd.img"), b"an initrd").unwrap();
    let (sha256, bytes) = sha256_file(&dir.join("d.raw")).unwrap();
    let d = DiskEntry {
        node_name: "d".into(),
        format: DiskFormat::Raw,
        virtual_size: 10,
        file: "d.raw".into(),
        bytes,
        sha256,
    };
    sample_vm(vec![d])
}

/// A committed backup of one VM in a new temporary folder.
fn backup() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("b");
    let mut w = BackupWriter::create(&path, "10.0.2").unwrap();
    let d = w.vm_dir("vm1").unwrap();
    w.add(vm(&d));
    w.commit().unwrap();
    (root, path)
}

/// Rewrites the backup's manifest.json through `edit`.
fn edit_manifest(path: &Path, edit: impl FnOnce(&mut Value)) {
    let m = path.join("manifest.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&m, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn refused(path: &Path) -> (Option<String>, Named, String, PathProblem) {
    match Backup::open(path) {
        Err(FolderError::UnsafePath { vm, entry, file, problem, .. }) => (vm, entry, file, problem),
        other => panic!("expected a refused path, got {other:?}"),
    }
}

#[test]
fn commit_renames_into_place_and_verify_catches_a_flipped_byte() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("b1");
    let mut w = BackupWriter::create(&path, "10.0.2").unwrap();
    let d = w.vm_dir("vm1").unwrap();
    assert!(!path.exists(), "nothing is at the final path before commit");
    w.add(vm(&d));
    let b = w.commit().unwrap();
    let reopened = Backup::open(&path).unwrap();
    assert_eq!(reopened.manifest, b.manifest);
    assert!(reopened.verify().unwrap().is_empty());
    std::fs::write(path.join("vms/vm1/d.raw"), b"disk bytez").unwrap();
    let bad = reopened.verify().unwrap();
    assert_eq!(bad.len(), 1);
    assert!(bad[0].file.ends_with("vms/vm1/d.raw"));
    assert!(matches!(bad[0].found, Found::Sha256(_)));
    assert!(BackupWriter::create(&path, "x").is_err(), "an existing backup is never overwritten");
}

#[test]
fn every_file_of_the_backup_is_in_the_manifest_and_checked() {
    let (_root, path) = backup();
    let b = Backup::open(&path).unwrap();
    assert_eq!(b.manifest.format_version, 2);
    let files: Vec<&str> = b.manifest.vms[0].files.iter().map(|f| f.file.as_str()).collect();
    assert_eq!(files, ["boot/initrd.img", "boot/vmlinuz"], "disks and state are listed as such, not twice");
    let v = b.check().unwrap();
    assert_eq!((v.checked, v.mismatches.len(), v.warnings.len()), (3, 0, 0), "{v:?}");

    // One flipped bit in the kernel: same length, another content, and the file is named.
    let k = path.join("vms/vm1/boot/vmlinuz");
    std::fs::write(&k, b"a kernem").unwrap();
    let v = b.check().unwrap();
    assert_eq!(v.mismatches.len(), 1, "{v:?}");
    assert_eq!(v.mismatches[0].file, k);
    assert!(matches!(&v.mismatches[0].found, Found::Sha256(h) if h != &v.mismatches[0].expected));
    // A file of another length is not hashed; a missing one is said to be missing.
    std::fs::write(&k, b"a longer kernel").unwrap();
    std::fs::remove_file(path.join("vms/vm1/boot/initrd.img")).unwrap();
    let found: Vec<Found> = b.check().unwrap().mismatches.into_iter().map(|m| m.found).collect();
    assert_eq!(found, [Found::Missing, Found::Length { found: 15, expected: 8 }]);
}

#[test]
fn the_attack_from_the_issue_is_refused_and_nothing_is_read() {
    let (_root, path) = backup();
    edit_manifest(&path, |m| m["vms"][0]["disks"][0]["file"] = json!("../../../../etc/passwd"));
    let (vm, entry, file, problem) = refused(&path);
    assert_eq!((vm.as_deref(), file.as_str()), (Some("vm1"), "../../../../etc/passwd"));
    assert_eq!(entry, Named::File(Entry::Disk("d".into())));
    assert_eq!(problem, PathProblem::NotPlain { component: "..".into() });
    let msg = Backup::open(&path).unwrap_err().to_string();
    assert!(msg.contains("VM vm1: the disk d is \"../../../../etc/passwd\", which is refused"), "{msg}");

    // A Backup made some other way is refused at the check too, before anything is read.
    let mut b = Backup::open(&backup().1).unwrap();
    b.manifest.vms[0].state = Some(crate::backup::manifest::StateEntry {
        file: "/etc/passwd".into(),
        bytes: 0,
        sha256: String::new(),
        mapped_ram: false,
        multifd_channels: None,
        inactive_until_continued: Vec::new(),
    });
    assert!(matches!(b.check(), Err(FolderError::UnsafePath { problem: PathProblem::Absolute, .. })));
    assert!(matches!(b.file_path("vm1", &Entry::State, "/etc/passwd"), Err(FolderError::UnsafePath { .. })));
}

#[test]
fn absolute_paths_and_climbing_names_are_refused_in_every_entry() {
    let cases: [(&str, &str, Named); 4] = [
        ("/machine/kernel", "/boot/vmlinuz", Named::File(Entry::Kernel)),
        ("/machine/initrd", "boot/../../../x", Named::File(Entry::Initrd)),
        ("/files/0/file", "/etc/shadow", Named::File(Entry::File)),
        ("/name", "..", Named::VmName),
    ];
    for (pointer, value, named) in cases {
        let (_root, path) = backup();
        edit_manifest(&path, |m| *m["vms"][0].pointer_mut(pointer).unwrap() = json!(value));
        let (_, entry, file, _) = refused(&path);
        assert_eq!((entry, file.as_str()), (named, value), "{pointer}");
    }
}

#[test]
fn a_link_inside_the_backup_is_refused_wherever_it_leads() {
    // A disk that is a link to a host file.
    let (_root, path) = backup();
    let disk = path.join("vms/vm1/d.raw");
    std::fs::remove_file(&disk).unwrap();
    symlink("/etc/passwd", &disk).unwrap();
    let (_, entry, _, problem) = refused(&path);
    assert_eq!(entry, Named::File(Entry::Disk("d".into())));
    assert_eq!(
        problem,
        PathProblem::Symlink { at: "vms/vm1/d.raw".into(), target: "/etc/passwd".into(), leads: paths::Leads::Outside }
    );

    // A VM folder that is a link to a copy of itself elsewhere.
    let (_root, path) = backup();
    let elsewhere = tempfile::tempdir().unwrap();
    let copy = elsewhere.path().join("vm1");
    std::fs::rename(path.join("vms/vm1"), &copy).unwrap();
    symlink(&copy, path.join("vms/vm1")).unwrap();
    let (_, _, _, problem) = refused(&path);
    assert!(
        matches!(problem, PathProblem::Symlink { ref at, leads: paths::Leads::Outside, .. } if at == "vms/vm1"),
        "{problem}"
    );

    // The manifest itself as a link: not read.
    let (_root, path) = backup();
    std::fs::rename(path.join("manifest.json"), elsewhere.path().join("m.json")).unwrap();
    symlink(elsewhere.path().join("m.json"), path.join("manifest.json")).unwrap();
    assert!(matches!(Backup::open(&path), Err(FolderError::NotABackup { why, .. }) if why.contains("symbolic link")));
}

#[test]
fn files_the_manifest_does_not_list_are_named_as_warnings() {
    let (_root, path) = backup();
    std::fs::write(path.join("vms/vm1/boot/extra.img"), b"?").unwrap();
    std::fs::create_dir_all(path.join("notes/deep")).unwrap();
    std::fs::write(path.join("notes/deep/a.txt"), b"?").unwrap();
    symlink("/etc", path.join("vms/etc-link")).unwrap();
    let v = Backup::open(&path).unwrap().check().unwrap();
    assert!(v.mismatches.is_empty(), "{v:?}");
    let w: Vec<String> = v.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        [
            "notes: a folder the manifest does not list (not part of the backup)",
            "vms/etc-link: a symbolic link the manifest does not list (not part of the backup)",
            "vms/vm1/boot/extra.img: a file the manifest does not list (not part of the backup)",
        ]
    );
    for i in 0..MAX_UNEXPECTED_LISTED + 5 {
        std::fs::write(path.join(format!("vms/vm1/x{i}")), b"").unwrap();
    }
    let v = Backup::open(&path).unwrap().check().unwrap();
    assert_eq!(v.warnings.len(), MAX_UNEXPECTED_LISTED + 1);
    assert_eq!(v.warnings.last(), Some(&Warning::MoreUnexpected { count: 8 }));
}

#[test]
fn a_format_1_backup_opens_and_says_its_boot_files_are_unchecked() {
    let (_root, path) = backup();
    edit_manifest(&path, |m| {
        m["format_version"] = json!(1);
        m["vms"][0].as_object_mut().unwrap().remove("files");
    });
    let b = Backup::open(&path).unwrap();
    let v = b.check().unwrap();
    assert_eq!((v.checked, v.mismatches.len()), (1, 0));
    let w: Vec<String> = v.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        [
            "vms/vm1/boot/vmlinuz: VM vm1's kernel has no checksum (manifest format 1); it is not checked",
            "vms/vm1/boot/initrd.img: VM vm1's initrd has no checksum (manifest format 1); it is not checked",
        ]
    );
    // Format 2 promises the checksum: a kernel without one is an edited manifest.
    edit_manifest(&path, |m| m["format_version"] = json!(2));
    assert!(matches!(Backup::open(&path), Err(FolderError::Unchecksummed { entry: Entry::Kernel, .. })));
}

#[test]
fn a_firmware_booted_vm_names_no_kernel_and_opens() {
    // A Windows guest is booted by SeaBIOS from its own disk: no kernel, no initrd.
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("b");
    let mut w = BackupWriter::create(&path, "10.0.2").unwrap();
    let d = w.vm_dir("vm1").unwrap();
    let mut v = vm(&d);
    (v.machine.kernel, v.machine.initrd) = (String::new(), String::new());
    v.files.retain(|f| !f.file.starts_with("boot/"));
    std::fs::remove_dir_all(d.join("boot")).unwrap();
    w.add(v);
    w.commit().unwrap();
    let b = Backup::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let checked = b.check().unwrap();
    assert_eq!((checked.checked, checked.mismatches.len(), checked.warnings.len()), (1, 0, 0));
    // Only a firmware boot names no kernel: a Linux guest's empty kernel alone is refused.
    edit_manifest(&path, |m| m["vms"][0]["machine"]["initrd"] = json!("boot/initrd.img"));
    assert!(Backup::open(&path).is_err());
}

#[test]
fn an_abandoned_writer_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let w = BackupWriter::create(&root.path().join("b2"), "10.0.2").unwrap();
    std::fs::write(w.vm_dir("vm1").unwrap().join("state.bin"), b"partial").unwrap();
    drop(w);
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[test]
fn open_rejects_other_folders_versions_and_huge_manifests() {
    let root = tempfile::tempdir().unwrap();
    assert!(matches!(Backup::open(root.path()), Err(FolderError::NotABackup { .. })));
    let m = root.path().join("manifest.json");
    std::fs::write(&m, br#"{"format_version": 99}"#).unwrap();
    assert!(matches!(Backup::open(root.path()), Err(FolderError::Version { found: 99, .. })));
    // Not truncated to 32 bits into a version that is read.
    std::fs::write(&m, br#"{"format_version": 4294967297}"#).unwrap();
    assert!(matches!(Backup::open(root.path()), Err(FolderError::Version { found: 4294967297, .. })));
    std::fs::write(&m, br#"{"format_version": "2"}"#).unwrap();
    assert!(matches!(Backup::open(root.path()), Err(FolderError::NotABackup { .. })));
    std::fs::File::create(&m).unwrap().set_len(MAX_MANIFEST_BYTES + 1).unwrap();
    let e = Backup::open(root.path()).unwrap_err().to_string();
    assert!(e.contains("larger than"), "{e}");
}

#[test]
fn two_vms_of_one_name_are_refused() {
    let (_root, path) = backup();
    edit_manifest(&path, |m| {
        let vm = m["vms"][0].clone();
        m["vms"].as_array_mut().unwrap().push(vm);
    });
    let e = Backup::open(&path).unwrap_err().to_string();
    assert!(e.contains("two VMs are named \"vm1\""), "{e}");
}
