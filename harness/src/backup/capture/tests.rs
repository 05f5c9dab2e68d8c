use std::os::unix::fs::FileExt;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::*;

fn disk(name: &str, path: &Path, format: DiskFormat) -> DiskConfig {
    DiskConfig { node_name: name.into(), path: path.to_owned(), format, read_only: false }
}

/// A raw image of `mib` MiB, its first half pseudo-random data, the rest a hole.
fn raw_image(path: &Path, mib: u64) -> Vec<u8> {
    let mut content = vec![0u8; (mib << 20) as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for c in content[..(mib << 19) as usize].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
    f.write_all_at(&content[..(mib << 19) as usize], 0).unwrap();
    content
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_disk_is_copied_proved_and_hashed_in_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("data.raw"), dir.path().join("out"));
    std::fs::create_dir(&out).unwrap();
    let content = raw_image(&src, 12);
    let copies = copy_disks_checked("vm", vec![disk("data", &src, DiskFormat::Raw)], &out).await.unwrap();
    let c = &copies[0];
    assert!(c.proved);
    assert_eq!(c.entry.file, "data.raw");
    assert_eq!((c.entry.bytes, c.entry.virtual_size), (12 << 20, 12 << 20));
    assert_eq!(c.entry.sha256, hex::encode(Sha256::digest(&content)));
    assert_eq!(std::fs::read(out.join("data.raw")).unwrap(), content);
    // The same sha256 the backup folder's check computes.
    assert_eq!(super::super::folder::sha256_file(&out.join("data.raw")).unwrap(), (c.entry.sha256.clone(), 12 << 20));
}

/// A disk qemu-img copies is proved by `qemu-img compare`, which fails a copy changed after
/// it was made; a raw disk's copy was proved as it was made.
#[tokio::test(flavor = "multi_thread")]
async fn copies_not_proved_as_made_are_proved_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("data.qcow2"), dir.path().join("out"));
    std::fs::create_dir(&out).unwrap();
    qemu_img::create(&src, DiskFormat::Qcow2, 4 << 20).unwrap();
    let disks = vec![disk("data", &src, DiskFormat::Qcow2)];
    let copies = copy_disks_checked("vm", disks.clone(), &out).await.unwrap();
    assert!(!copies[0].proved);
    prove_copies("vm", disks.clone(), &out, &copies).await.unwrap();
    let raw = dir.path().join("raw.raw");
    raw_image(&raw, 2);
    let changed = qemu_img::convert(&raw, DiskFormat::Raw, &out.join("data.qcow2.new"), DiskFormat::Qcow2);
    changed.unwrap();
    std::fs::rename(out.join("data.qcow2.new"), out.join("data.qcow2")).unwrap();
    let e = prove_copies("vm", disks, &out, &copies).await.unwrap_err();
    assert!(matches!(e, BackupError::CaptureMismatch { .. }), "{e:?}");
}

/// A copy of our own that reads back other than its source fails the backup as a capture
/// mismatch, the same error `qemu-img compare` gives.
#[test]
fn a_differing_own_copy_is_a_capture_mismatch() {
    let e = copy_error(
        "vm",
        &disk("data", Path::new("/x"), DiskFormat::Raw),
        copy::CopyError::Differs { path: "/y".into(), offset: 5 },
    );
    assert!(matches!(e, BackupError::CaptureMismatch { .. }), "{e:?}");
    let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
    let e = copy_error(
        "vm",
        &disk("data", Path::new("/x"), DiskFormat::Raw),
        copy::CopyError::Write { path: "/y".into(), source: full },
    );
    assert!(matches!(&e, BackupError::Copy { disk, .. } if disk == "data"), "{e:?}");
    assert!(e.to_string().contains("No space left on device"), "{e}");
}

/// Dropping the copy's future (an interrupted job) stops our own copy, and the drop returns
/// only once it has stopped and removed its partial copy.
#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_copy_stops_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("data.raw"), dir.path().join("out"));
    std::fs::create_dir(&out).unwrap();
    raw_image(&src, 256);
    let copy = copy_disks_checked("vm", vec![disk("data", &src, DiskFormat::Raw)], &out);
    assert!(tokio::time::timeout(Duration::from_millis(1), copy).await.is_err());
    assert!(!out.join("data.raw").exists());
}
