use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};

use super::*;

const LONG: Duration = Duration::from_secs(120);

/// A raw image of `len` bytes with pseudo-random data in `data` (byte ranges), holes
/// elsewhere, and one data block of zeros.
fn image(path: &Path, len: u64, data: &[(u64, u64)]) -> Vec<u8> {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    let mut content = vec![0u8; len as usize];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for &(from, to) in data {
        for b in &mut content[from as usize..to as usize] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        f.write_all_at(&content[from as usize..to as usize], from).unwrap();
    }
    content
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[test]
fn copies_data_and_holes_with_the_hash_of_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    // Data across chunk boundaries, a hole between, an unaligned end, and zeros written
    // as data (which the copy leaves as a hole).
    let len = 3 * CHUNK as u64 + 12_345;
    let content = image(&src, len, &[(0, 5 << 20), (9 << 20, 2 * CHUNK as u64 + 100_000), (len - 5000, len)]);
    File::options().write(true).open(&src).unwrap().write_all_at(&vec![0u8; 1 << 20], 20 << 20).unwrap();
    let c = copy_raw(&src, &dst, LONG, &AtomicBool::new(false)).unwrap();
    assert_eq!(std::fs::read(&dst).unwrap(), content);
    assert_eq!(c.bytes, len);
    assert_eq!(c.sha256, sha(&content));
    let written = std::fs::metadata(&dst).unwrap().blocks() * 512;
    assert!(written < 20 << 20, "the copy is sparse: {written} bytes allocated");
    assert!(c.data_read < len, "holes are not read: {} of {len}", c.data_read);
}

#[test]
fn empty_and_all_hole_images_copy() {
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [("empty", 0u64), ("hole", 64 << 20)] {
        let (src, dst) = (dir.path().join(name), dir.path().join(format!("{name}.copy")));
        let content = image(&src, len, &[]);
        let c = copy_raw(&src, &dst, LONG, &AtomicBool::new(false)).unwrap();
        assert_eq!((c.bytes, c.sha256, c.data_read), (len, sha(&content), 0));
        assert_eq!(std::fs::metadata(&dst).unwrap().blocks(), 0);
    }
}

/// The proof is the copy read back: a byte changed in the copy after it was written fails
/// the copy, which is removed. (With the comparison taken out of `prove`, this fails.)
#[test]
fn a_copy_changed_after_it_is_written_fails_the_proof() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    image(&src, 2 * CHUNK as u64, &[(0, 2 * CHUNK as u64)]);
    let flip = |f: &File, offset: u64| {
        if offset == CHUNK as u64 {
            let mut b = [0u8];
            f.read_exact_at(&mut b, offset + 777).unwrap();
            f.write_all_at(&[b[0] ^ 0x20], offset + 777).unwrap();
        }
    };
    let e = copy_with(&src, &dst, LONG, &AtomicBool::new(false), &flip).unwrap_err();
    assert!(matches!(e, CopyError::Differs { offset, .. } if offset == CHUNK as u64 + 777), "{e:?}");
    assert!(!dst.exists());
    // Data written into what should stay a hole fails it too.
    let (src, dst) = (dir.path().join("c.raw"), dir.path().join("d.raw"));
    image(&src, 2 * CHUNK as u64, &[(0, 4096)]);
    let scribble = |f: &File, _| f.write_all_at(b"x", CHUNK as u64 + 1).unwrap();
    let e = copy_with(&src, &dst, LONG, &AtomicBool::new(false), &scribble).unwrap_err();
    assert!(matches!(e, CopyError::Differs { offset, .. } if offset == CHUNK as u64 + 1), "{e:?}");
    assert!(!dst.exists());
}

#[test]
fn a_cancelled_or_late_copy_stops_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    image(&src, 4 * CHUNK as u64, &[(0, 4 * CHUNK as u64)]);
    let cancel = AtomicBool::new(false);
    let e = copy_with(&src, &dst, LONG, &cancel, &|_, _| cancel.store(true, Ordering::SeqCst)).unwrap_err();
    assert!(matches!(e, CopyError::Cancelled { .. }), "{e:?}");
    assert!(!dst.exists());
    let e = copy_raw(&src, &dst, Duration::ZERO, &AtomicBool::new(false)).unwrap_err();
    assert!(matches!(e, CopyError::TimedOut { .. }), "{e:?}");
    assert!(!dst.exists());
}

#[test]
fn errors_name_the_file_and_keep_what_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    let e = copy_raw(&src, &dst, LONG, &AtomicBool::new(false)).unwrap_err();
    assert!(matches!(&e, CopyError::Read { path, .. } if *path == src), "{e:?}");
    assert!(!dst.exists());
    // An existing copy is never overwritten, nor removed.
    image(&src, 4096, &[(0, 4096)]);
    std::fs::File::create(&dst).unwrap().write_all(b"keep").unwrap();
    let e = copy_raw(&src, &dst, LONG, &AtomicBool::new(false)).unwrap_err();
    assert!(matches!(&e, CopyError::Write { source, .. } if source.kind() == ErrorKind::AlreadyExists), "{e:?}");
    assert_eq!(std::fs::read(&dst).unwrap(), b"keep");
}

#[test]
fn zero_runs_are_left_out() {
    let mut d = vec![0u8; 5 * ZERO_BLOCK + 10];
    d[ZERO_BLOCK + 3] = 1;
    d[2 * ZERO_BLOCK] = 1;
    d[5 * ZERO_BLOCK + 9] = 1;
    assert_eq!(nonzero_runs(&d), vec![(ZERO_BLOCK, 3 * ZERO_BLOCK), (5 * ZERO_BLOCK, 5 * ZERO_BLOCK + 10)]);
    assert!(nonzero_runs(&vec![0u8; 3 * ZERO_BLOCK]).is_empty());
}

/// Times a copy of `$QUIESCE_COPY_SRC` (a big raw file, its cache dropped first) into its
/// folder; `cargo test --release -p quiesce --lib copy::tests::timed -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, on a file you name"]
fn timed() {
    let Some(src) = std::env::var_os("QUIESCE_COPY_SRC").map(PathBuf::from) else { return };
    let dst = src.with_extension("copy");
    let f = File::open(&src).unwrap();
    rustix::fs::fadvise(f.as_fd(), 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let t = Instant::now();
    let c = copy_raw(&src, &dst, Duration::from_secs(600), &AtomicBool::new(false)).unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "copied {} MB in {secs:.2} s ({:.0} MB/s), sha256 {}",
        c.bytes / 1_000_000,
        c.bytes as f64 / 1e6 / secs,
        c.sha256
    );
    std::fs::remove_file(&dst).unwrap();
}

/// A copy onto a full filesystem fails with "No space left on device" and leaves nothing:
/// a 16 MiB tmpfs takes the copy of a 32 MiB image (mounting it needs root; skipped, and
/// said so, without).
#[test]
fn a_copy_that_runs_out_of_space_fails_and_leaves_nothing() {
    use crate::sys::{deadline, Tool};
    let dir = tempfile::tempdir().unwrap();
    let (src, target) = (dir.path().join("a.raw"), dir.path().join("small"));
    std::fs::create_dir(&target).unwrap();
    image(&src, 32 << 20, &[(0, 32 << 20)]);
    let mounted =
        Tool::new("mount", deadline::MOUNT).args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"]).arg(&target).run();
    if let Err(e) = mounted {
        eprintln!("skipped: cannot mount a tmpfs here: {e}");
        return;
    }
    let dst = target.join("b.raw");
    let e = copy_raw(&src, &dst, LONG, &AtomicBool::new(false));
    let left = std::fs::read_dir(&target).unwrap().count();
    Tool::new("umount", deadline::MOUNT).arg(&target).run().unwrap();
    let e = e.unwrap_err();
    assert!(matches!(&e, CopyError::Write { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)), "{e:?}");
    assert_eq!(left, 0, "the partial copy is removed");
}
