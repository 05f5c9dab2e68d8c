//! File manifests of a restored Windows boot disk, laid out as the Windows guest's answer
//! file lays it out (MBR: a small NTFS "System Reserved" partition, then the NTFS Windows
//! volume), built here on the host with ntfs-3g's mkntfs and ntfscp: the manifest reader
//! must find both volumes, each with its label, and the Windows volume's files.
//! No Windows guest made this disk (none can run here); its layout follows Setup's.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use quiesce::image::manifest::{self, EntryKind, FsKind, Limits};
use quiesce::image::qemu_img;
use quiesce::image::windows::disk;
use quiesce::qemu::DiskFormat;

const MIB: u64 = 1 << 20;

fn ok(c: &mut Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e} (ntfs-3g installed?)"));
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
}

/// An NTFS volume of `size` bytes labelled `label`, holding `files` at its top level.
fn ntfs(dir: &Path, name: &str, label: &str, size: u64, files: &[(&str, &str)]) -> Vec<u8> {
    let img = dir.join(format!("{name}.raw"));
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    ok(Command::new("mkntfs").args(["-F", "-Q", "-q", "-L", label]).arg(&img), "mkntfs");
    for (path, content) in files {
        let src = dir.join(format!("{name}-{path}"));
        std::fs::write(&src, content).unwrap();
        ok(Command::new("ntfscp").arg("-f").arg(&img).arg(&src).arg(format!("/{path}")), "ntfscp");
    }
    std::fs::read(&img).unwrap()
}

/// One MBR partition entry: bootable flag, type, first sector, sector count.
fn entry(boot: bool, ptype: u8, start: u64, len: u64) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0] = if boot { 0x80 } else { 0 };
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[4] = ptype;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&((start / 512) as u32).to_le_bytes());
    e[12..16].copy_from_slice(&((len / 512) as u32).to_le_bytes());
    e
}

#[test]
fn a_windows_boot_disk_with_system_reserved_is_read_volume_by_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (sr_at, sr_len, c_at, c_len) = (MIB, 16 * MIB, 17 * MIB, 48 * MIB);
    let sr = ntfs(dir.path(), "sr", disk::SYSTEM_RESERVED, sr_len, &[("bootmgr", "boot manager stand-in\n")]);
    let hello = "hello from C:\n";
    let c = ntfs(dir.path(), "c", "Windows", c_len, &[("hello.txt", hello), ("journal", "1\r\n2\r\n3\r\n")]);
    let raw = dir.path().join("disk.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(c_at + c_len + MIB).unwrap();
    let mut mbr = [0u8; 512];
    mbr[446..462].copy_from_slice(&entry(true, 0x07, sr_at, sr_len));
    mbr[462..478].copy_from_slice(&entry(false, 0x07, c_at, c_len));
    mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
    f.write_all_at(&mbr, 0).unwrap();
    f.write_all_at(&sr, sr_at).unwrap();
    f.write_all_at(&c, c_at).unwrap();
    drop(f);
    // As a restore holds it: qcow2.
    let restored = dir.path().join("restored.qcow2");
    qemu_img::convert(&raw, DiskFormat::Raw, &restored, DiskFormat::Qcow2).unwrap();

    let m = manifest::read_image(&restored, DiskFormat::Qcow2, &Limits::default()).unwrap();
    assert_eq!(m.filesystems.len(), 2, "{m:#?}");
    let sys = disk::system_reserved(&m).expect("System Reserved is read");
    assert_eq!((sys.partition, sys.kind), (Some(1), FsKind::Ntfs));
    assert!(sys.entries.iter().any(|e| e.path == "/bootmgr"), "{:?}", sys.entries);
    let win = disk::windows_volume(&m).expect("the Windows volume is read");
    assert_eq!((win.partition, win.kind, win.label.as_str()), (Some(2), FsKind::Ntfs, "Windows"));
    let e = win.entries.iter().find(|e| e.path == "/hello.txt").expect("C:'s file");
    assert_eq!((e.kind, e.size), (EntryKind::File, hello.len() as u64));
    assert_eq!(e.blake3.as_deref(), Some(blake3::hash(hello.as_bytes()).to_hex().as_str()));
    assert!(!win.entries.iter().any(|e| e.path == "/bootmgr"), "the volumes were mixed up");
    assert!(m.unread.is_empty(), "{:?}", m.unread);
}
