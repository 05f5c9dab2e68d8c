//! Block-level comparison of real images made by qemu-img and qemu-io: every format, backing
//! chains, holes against zeros, one flipped byte, different sizes, an image a running QEMU
//! process holds. No guest boots; images are a few tens of MiB.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use quiesce::qemu::DiskFormat;
use quiesce::sys::{deadline, Tool};
use quiesce::verify::blockcmp::{self, BlockCompareError, BlockComparison, Options, ReadPath};

use crate::common::rng::XorShift;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 24 * MIB;

/// A sparse raw image of `size` bytes with pseudo-random data in a few regions (one not
/// cluster-aligned) and holes elsewhere.
fn raw_image(path: &Path, size: u64) -> Vec<u8> {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut disk = vec![0u8; size as usize];
    for (at, len) in [(0, 64 << 10), (3 * MIB + 4096, 300_000), (10 * MIB, 4 * MIB), (size - MIB, 65536)] {
        for b in &mut disk[at as usize..(at + len) as usize] {
            *b = rng.next_u64() as u8;
        }
    }
    write_sparse(path, &disk);
    disk
}

/// Writes `disk` leaving its all-zero 4 KiB blocks as holes.
fn write_sparse(path: &Path, disk: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(disk.len() as u64).unwrap();
    for (i, block) in disk.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, i as u64 * 4096).unwrap();
        }
    }
}

/// How long qemu-io may take to open an image: what a `qemu-img` metadata step is given.
const QEMU_IO: Duration = deadline::QEMU_IMG_METADATA;

/// `qemu-img args... paths...`, under the deadline of a whole-image copy (the longest any
/// of its uses here needs); it must succeed.
fn qemu_img(args: &[&str], paths: &[&Path]) {
    let out = Tool::new("qemu-img", deadline::QEMU_IMG_COPY).args(args).args(paths).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?} {paths:?}: {}", out.stderr);
}

fn qemu_io(path: &Path, format: DiskFormat, cmd: &str) {
    let out = Tool::new("qemu-io", QEMU_IO).args(["-f", format.driver(), "-c", cmd]).arg(path).output().unwrap();
    assert!(out.status.success(), "qemu-io -c {cmd:?}: {}", out.stderr);
}

fn create_qcow2(path: &Path, size: u64) {
    let out = Tool::new("qemu-img", deadline::QEMU_IMG_METADATA)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output();
    assert!(out.unwrap().status.success());
}

/// Converts a raw image to `format`; VHD keeps its exact size (`force_size`), not CHS's.
fn convert(raw: &Path, format: DiskFormat, dir: &Path) -> PathBuf {
    let dst = dir.join(format!("disk.{}", format.extension()));
    let mut args = vec!["convert", "-f", "raw", "-O", format.driver()];
    if format == DiskFormat::Vpc {
        args.extend(["-o", "force_size=on"]);
    }
    qemu_img(&args, &[raw, &dst]);
    dst
}

fn compare(a: &Path, af: DiskFormat, b: &Path, bf: DiskFormat) -> BlockComparison {
    blockcmp::compare(a, af, b, bf).unwrap_or_else(|e| panic!("{} vs {}: {e}", a.display(), b.display()))
}

fn export_only(a: &Path, af: DiskFormat, b: &Path, bf: DiskFormat) -> BlockComparison {
    let opts = Options { read_path: ReadPath::ExportOnly, ..Options::default() };
    blockcmp::compare_with(a, af, b, bf, &opts).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_same_content_in_every_format_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    raw_image(&raw, SIZE);
    let images: Vec<(PathBuf, DiskFormat)> = [DiskFormat::Qcow2, DiskFormat::Vhdx, DiskFormat::Vpc]
        .into_iter()
        .map(|f| (convert(&raw, f, dir.path()), f))
        .chain([(raw.clone(), DiskFormat::Raw)])
        .collect();
    for (a, af) in &images {
        for (b, bf) in &images {
            let c = compare(a, *af, b, *bf);
            assert!(c.identical, "{af:?} vs {bf:?}: {c}");
            assert_eq!((c.first_difference, c.size), (None, (SIZE, SIZE)));
            assert!(c.to_string().starts_with("identical: "), "{c}");
        }
    }
    // raw and qcow2 know their holes: most of the disk is not read.
    let c = compare(&raw, DiskFormat::Raw, &images[0].0, DiskFormat::Qcow2);
    assert!(c.bytes_skipped >= 16 * MIB && c.bytes_compared <= 6 * MIB, "{c:?}");
    assert_eq!(c.bytes_compared + c.bytes_skipped, SIZE);
}

#[test]
fn a_qcow2_overlay_over_a_vhdx_base_equals_its_flat_copy() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    raw_image(&raw, SIZE);
    let base = convert(&raw, DiskFormat::Vhdx, dir.path());
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "vhdx", "-b"], &[&base, &top]);
    qemu_io(&top, DiskFormat::Qcow2, "write -P 0x6b 5M 192k");
    qemu_io(&top, DiskFormat::Qcow2, "write -z 10M 64k");
    let flat = dir.path().join("flat.qcow2");
    qemu_img(&["convert", "-f", "qcow2", "-O", "qcow2"], &[&top, &flat]);
    let c = compare(&top, DiskFormat::Qcow2, &flat, DiskFormat::Qcow2);
    assert!(c.identical, "{c}");
    assert_eq!(export_only(&top, DiskFormat::Qcow2, &flat, DiskFormat::Qcow2), c);
    // Against the base alone: the overlay's first write is where they part.
    let c = compare(&top, DiskFormat::Qcow2, &raw, DiskFormat::Raw);
    assert_eq!(c.first_difference, Some(5 * MIB), "{c}");
}

#[test]
fn one_flipped_byte_is_found_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let mut disk = raw_image(&raw, SIZE);
    let qcow = convert(&raw, DiskFormat::Qcow2, dir.path());
    let vhdx = convert(&raw, DiskFormat::Vhdx, dir.path());
    // Inside the unaligned data region, and late in a 2 MiB chunk.
    let at = 3 * MIB + 4096 + 250_001;
    disk[at as usize] ^= 0x40;
    let bad = dir.path().join("bad.raw");
    write_sparse(&bad, &disk);
    for (good, f) in [(&qcow, DiskFormat::Qcow2), (&vhdx, DiskFormat::Vhdx), (&raw, DiskFormat::Raw)] {
        let c = compare(good, f, &bad, DiskFormat::Raw);
        assert!(!c.identical, "{c}");
        assert_eq!(c.first_difference, Some(at), "{f:?}: {c}");
        assert_eq!(export_only(good, f, &bad, DiskFormat::Raw).first_difference, Some(at));
    }
    let c = compare(&qcow, DiskFormat::Qcow2, &bad, DiskFormat::Raw);
    assert_eq!(c.to_string(), format!("differ at byte {at} (cluster 0x330000 of 'disk.qcow2', 64 KiB clusters)"));

    // A second difference later, in another chunk: the first is still the one reported.
    disk[(SIZE - 100) as usize] ^= 1;
    write_sparse(&bad, &disk);
    assert_eq!(compare(&bad, DiskFormat::Raw, &qcow, DiskFormat::Qcow2).first_difference, Some(at));

    // The same, written with qemu-io into a qcow2 copy.
    let q2 = dir.path().join("q2.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2"], &[&raw, &q2]);
    let at = 10 * MIB + 3 * MIB + 77;
    qemu_io(&q2, DiskFormat::Qcow2, &format!("write -P 0x00 {at} 1"));
    let c = compare(&qcow, DiskFormat::Qcow2, &q2, DiskFormat::Qcow2);
    assert_eq!(c.first_difference, Some(at), "{c}");
}

#[test]
fn zeros_written_as_data_equal_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.qcow2");
    create_qcow2(&empty, SIZE);
    let zeros = dir.path().join("zeros.raw");
    std::fs::write(&zeros, vec![0u8; SIZE as usize]).unwrap(); // fully allocated zeros
    let c = compare(&empty, DiskFormat::Qcow2, &zeros, DiskFormat::Raw);
    assert!(c.identical, "{c}");
    assert_eq!(c.bytes_compared, SIZE, "every zero the raw file holds was read: {c:?}");

    let zq = dir.path().join("zq.qcow2");
    std::fs::copy(&empty, &zq).unwrap();
    qemu_io(&zq, DiskFormat::Qcow2, "write -P 0x00 1M 256k");
    let c = compare(&zq, DiskFormat::Qcow2, &empty, DiskFormat::Qcow2);
    assert!(c.identical && c.bytes_compared > 0, "{c:?}");
}

#[test]
fn data_against_a_hole_differs_at_the_first_nonzero_byte() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.qcow2");
    create_qcow2(&empty, SIZE);
    let b = dir.path().join("b.qcow2");
    std::fs::copy(&empty, &b).unwrap();
    // A cluster of zeros first, then one non-zero byte inside the same written range.
    qemu_io(&b, DiskFormat::Qcow2, "write -P 0x00 7M 64k");
    let at = 7 * MIB + 12_345;
    qemu_io(&b, DiskFormat::Qcow2, &format!("write -P 0x5a {at} 1"));
    let c = compare(&empty, DiskFormat::Qcow2, &b, DiskFormat::Qcow2);
    assert_eq!(c.first_difference, Some(at), "{c}");
    let c = compare(&b, DiskFormat::Qcow2, &empty, DiskFormat::Qcow2);
    assert_eq!(c.first_difference, Some(at), "{c}");
}

#[test]
fn different_sizes_are_a_difference() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let disk = raw_image(&raw, SIZE);
    let bigger = dir.path().join("bigger.raw");
    let mut d = disk.clone();
    d.resize((SIZE + 4 * MIB) as usize, 0);
    write_sparse(&bigger, &d);
    let c = compare(&raw, DiskFormat::Raw, &bigger, DiskFormat::Raw);
    assert!(!c.identical, "{c}");
    assert_eq!((c.size, c.first_difference), ((SIZE, SIZE + 4 * MIB), Some(SIZE)));
    assert!(
        c.to_string().starts_with("sizes differ: 'disk.raw' is 25165824 bytes, 'bigger.raw' is 29360128 bytes"),
        "{c}"
    );
    // A difference inside the shared part comes first.
    d[100] ^= 1;
    write_sparse(&bigger, &d);
    assert_eq!(compare(&raw, DiskFormat::Raw, &bigger, DiskFormat::Raw).first_difference, Some(100));
}

/// A process that is killed and reaped however the test ends.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn images_a_running_qemu_holds_can_be_compared() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    raw_image(&raw, SIZE);
    let vhdx = convert(&raw, DiskFormat::Vhdx, dir.path());
    let qcow = convert(&raw, DiskFormat::Qcow2, dir.path());
    // qemu-io holds both images open read-write (and locked) while it waits on its stdin:
    // not a tool run to its end, so it is started here, and killed by `Kill` however the
    // test ends.
    let hold = |p: &Path, f: DiskFormat| {
        let mut c = Command::new("qemu-io")
            .args(["-f", f.driver()])
            .arg(p)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The prompt shows once the image is open and locked. It is read on a thread of its
        // own so that the wait has a deadline; the kill ends that read if it passes.
        let mut out = c.stdout.take().unwrap();
        let c = Kill(c);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut byte = [0u8; 1];
            let _ = tx.send(out.read(&mut byte).map_err(|e| e.to_string()));
        });
        let read = rx.recv_timeout(QEMU_IO).unwrap_or_else(|_| panic!("qemu-io did not open {p:?} in {QEMU_IO:?}"));
        assert_eq!(read.unwrap(), 1);
        c
    };
    let _a = hold(&vhdx, DiskFormat::Vhdx);
    let _b = hold(&qcow, DiskFormat::Qcow2);
    let locked = Tool::new("qemu-img", deadline::QEMU_IMG_METADATA)
        .args(["compare", "-q", "-f", "vhdx", "-F", "qcow2"])
        .arg(&vhdx)
        .arg(&qcow)
        .output();
    assert!(!locked.unwrap().status.success(), "qemu-img compare without -U should meet the lock");
    let c = compare(&vhdx, DiskFormat::Vhdx, &qcow, DiskFormat::Qcow2);
    assert!(c.identical, "{c}");
}

#[test]
fn errors_name_the_image_the_step_and_the_tools_words() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    raw_image(&raw, SIZE);
    let missing = dir.path().join("missing.qcow2");
    let e = blockcmp::compare(&raw, DiskFormat::Raw, &missing, DiskFormat::Qcow2).unwrap_err();
    assert!(matches!(e, BlockCompareError::Failed { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("missing.qcow2") && text.contains("qemu-img") && text.contains("No such file"), "{text}");

    let junk = dir.path().join("junk.qcow2");
    std::fs::write(&junk, b"QFI\xfbnot really a qcow2 header").unwrap();
    let e = blockcmp::compare(&junk, DiskFormat::Qcow2, &raw, DiskFormat::Raw).unwrap_err();
    assert!(e.to_string().contains("junk.qcow2"), "{e}");
}

#[test]
fn a_qcow2_chain_is_read_from_its_own_files_and_agrees_with_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let mut disk = raw_image(&raw, SIZE);
    let base = dir.path().join("base.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2"], &[&raw, &base]);
    // Named relative to the overlay's folder, as backup tools write them.
    let out = Tool::new("qemu-img", deadline::QEMU_IMG_METADATA)
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2"])
        .arg(dir.path().join("top.qcow2"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    let top = dir.path().join("top.qcow2");
    qemu_io(&top, DiskFormat::Qcow2, "write -P 0x11 12M 64k");
    disk[(12 * MIB) as usize..(12 * MIB + 65536) as usize].fill(0x11);
    let flat = dir.path().join("flat.raw");
    write_sparse(&flat, &disk);
    let c = compare(&top, DiskFormat::Qcow2, &flat, DiskFormat::Raw);
    assert!(c.identical, "{c}");
    // A byte of the base's data (read from base.qcow2 itself) changed in the flat copy.
    let at = 10 * MIB + 777;
    disk[at as usize] ^= 0xff;
    write_sparse(&flat, &disk);
    assert_eq!(compare(&top, DiskFormat::Qcow2, &flat, DiskFormat::Raw).first_difference, Some(at));
    assert_eq!(export_only(&top, DiskFormat::Qcow2, &flat, DiskFormat::Raw).first_difference, Some(at));
}

#[test]
fn a_vhdx_pair_one_byte_apart_is_found_exactly_through_the_pipelined_export() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let disk = raw_image(&raw, SIZE);
    let a = convert(&raw, DiskFormat::Vhdx, dir.path());
    let (b, c) = (dir.path().join("b.vhdx"), dir.path().join("c.vhdx"));
    for x in [&b, &c] {
        qemu_img(&["convert", "-f", "raw", "-O", "vhdx"], &[&raw, x]);
    }
    // In the last data region, near the end of the disk, not aligned; the byte written is
    // not the one the disk holds.
    let at = SIZE - MIB + 30_001;
    qemu_io(&b, DiskFormat::Vhdx, &format!("write -P {} {at} 1", disk[at as usize] ^ 0xff));
    // Many small reads in flight, unaligned pieces, and the defaults, all through the export.
    let nbd = Options { read_path: ReadPath::ExportOnly, ..Options::default() };
    let pipelined = Options { nbd_depth: 16, nbd_request: 4096, chunk: 1 << 20, ..nbd.clone() };
    let one_at_a_time = Options { nbd_depth: 1, ..nbd.clone() };
    for opts in [nbd, pipelined, one_at_a_time] {
        let r = blockcmp::compare_with(&a, DiskFormat::Vhdx, &b, DiskFormat::Vhdx, &opts).unwrap();
        assert_eq!(r.first_difference, Some(at), "{opts:?}: {r}");
        // vhdx tells QEMU nothing about holes: through the export the whole disk is read.
        assert_eq!((r.bytes_compared, r.bytes_skipped), (SIZE, 0), "{r:?}");
        let same = blockcmp::compare_with(&a, DiskFormat::Vhdx, &c, DiskFormat::Vhdx, &opts).unwrap();
        assert!(same.identical, "{opts:?}: {same}");
    }
    let r = compare(&b, DiskFormat::Vhdx, &a, DiskFormat::Vhdx);
    assert_eq!(r.to_string(), format!("differ at byte {at} (cluster 0x1000000 of 'b.vhdx', 8 MiB clusters)"));
    // A byte written where the vhdx has no block yet (a hole in the raw image) comes first.
    let early = 20 * MIB + 3;
    qemu_io(&b, DiskFormat::Vhdx, &format!("write -P 0x01 {early} 1"));
    assert_eq!(compare(&a, DiskFormat::Vhdx, &b, DiskFormat::Vhdx).first_difference, Some(early));
}

/// A VHDX (block_size 1 MiB, so the holes are whole blocks) or VHD of `raw`, in `subformat`.
fn convert_with(raw: &Path, format: DiskFormat, subformat: &str, dst: &Path) {
    let opts = match format {
        DiskFormat::Vhdx => format!("subformat={subformat},block_size=1M"),
        _ => format!("subformat={subformat},force_size=on"),
    };
    qemu_img(&["convert", "-f", "raw", "-O", format.driver(), "-o", &opts], &[raw, dst]);
}

#[test]
fn vhd_and_vhdx_allocation_is_read_from_their_own_tables() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let disk = raw_image(&raw, SIZE);
    for (format, subformat) in [
        (DiskFormat::Vhdx, "dynamic"),
        (DiskFormat::Vpc, "dynamic"),
        (DiskFormat::Vhdx, "fixed"),
        (DiskFormat::Vpc, "fixed"),
    ] {
        let what = format!("{format:?} {subformat}");
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        convert_with(&raw, format, subformat, &a);
        convert_with(&raw, format, subformat, &b);
        let c = compare(&a, format, &raw, DiskFormat::Raw);
        assert!(c.identical, "{what}: {c}");
        if subformat == "dynamic" {
            // Only the blocks that hold data are read: 1 MiB VHDX blocks and 2 MiB VHD
            // blocks around the 4.4 MiB of data, not the 24 MiB disk.
            assert!(c.bytes_skipped >= 12 * MIB, "{what}: {c:?}");
        }
        // A byte in a block with data, and one in a block that has none yet (a hole first).
        let at = 10 * MIB + 77_777;
        qemu_io(&b, format, &format!("write -P {} {at} 1", disk[at as usize] ^ 0xff));
        for other in [&raw, &a] {
            let f = if other == &raw { DiskFormat::Raw } else { format };
            assert_eq!(compare(&b, format, other, f).first_difference, Some(at), "{what}");
            assert_eq!(export_only(&b, format, other, f).first_difference, Some(at), "{what}");
        }
        let early = 6 * MIB + 5;
        qemu_io(&b, format, &format!("write -P 0x5a {early} 1"));
        assert_eq!(compare(&a, format, &b, format).first_difference, Some(early), "{what}");
        assert_eq!(compare(&b, format, &raw, DiskFormat::Raw).first_difference, Some(early), "{what}");
        // Written zeros in a new block equal the hole they replace.
        let zeros = 18 * MIB;
        qemu_io(&a, format, &format!("write -P 0 {zeros} 4096"));
        assert!(compare(&a, format, &raw, DiskFormat::Raw).identical, "{what}");
        std::fs::remove_file(&a).unwrap();
        std::fs::remove_file(&b).unwrap();
    }
}

/// `qemu-img info`'s virtual size of an image.
fn qemu_size(path: &Path, format: DiskFormat) -> u64 {
    let out = Tool::new("qemu-img", deadline::QEMU_IMG_METADATA)
        .args(["info", "--output=json", "-f", format.driver()])
        .arg(path)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

#[test]
fn our_own_readers_agree_with_qemu_on_sizes_and_every_kind_of_cluster() {
    // quiesce reads qcow2, raw, VHD and VHDX allocation itself, with no qemu-img run: each
    // image here is compared with the raw truth (identical, then with a byte flipped in
    // each kind of region) by its own reader and by QEMU's driver over NBD, which must agree.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let mut disk = raw_image(&raw, SIZE);
    let mut images: Vec<(PathBuf, DiskFormat)> = Vec::new();
    for (name, opts) in [("v3.qcow2", "compat=1.1"), ("v2.qcow2", "compat=0.10"), ("small.qcow2", "cluster_size=4096")]
    {
        let p = dir.path().join(name);
        qemu_img(&["convert", "-f", "raw", "-O", "qcow2", "-o", opts], &[&raw, &p]);
        images.push((p, DiskFormat::Qcow2));
    }
    // Compressed clusters (QEMU's turn), zero clusters and a discard over data.
    let cq = dir.path().join("compressed.qcow2");
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2"], &[&raw, &cq]);
    images.push((cq, DiskFormat::Qcow2));
    let zq = dir.path().join("zeroed.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2"], &[&raw, &zq]);
    qemu_io(&zq, DiskFormat::Qcow2, "write -z 10M 1M");
    qemu_io(&zq, DiskFormat::Qcow2, "discard 11M 1M");
    disk[(10 * MIB) as usize..(12 * MIB) as usize].fill(0);
    let truth = dir.path().join("truth.raw");
    write_sparse(&truth, &disk);
    // VHD as qemu-img makes it by default (its size is its CHS geometry's, not 24 MiB).
    let chs = dir.path().join("chs.vpc");
    qemu_img(&["convert", "-f", "raw", "-O", "vpc"], &[&raw, &chs]);
    let chs_size = qemu_size(&chs, DiskFormat::Vpc);
    assert_ne!(chs_size, SIZE, "a VHD sized by geometry, unlike the raw disk");
    let c = compare(&chs, DiskFormat::Vpc, &raw, DiskFormat::Raw);
    assert_eq!(c.size, (chs_size, SIZE), "our VHD reader's size is QEMU's: {c}");
    assert_eq!(c, export_only(&chs, DiskFormat::Vpc, &raw, DiskFormat::Raw));
    for f in [DiskFormat::Vpc, DiskFormat::Vhdx] {
        images.push((convert(&raw, f, dir.path()), f));
    }

    for (img, f) in &images {
        let base = if img.ends_with("zeroed.qcow2") { &truth } else { &raw };
        let c = compare(img, *f, base, DiskFormat::Raw);
        assert!(c.identical, "{img:?}: {c}");
        assert_eq!(c.size.0, qemu_size(img, *f), "{img:?}");
        assert_eq!(c, export_only(img, *f, base, DiskFormat::Raw), "{img:?}");
        // A flipped byte in the first data region, mid-cluster in the large one, in the
        // zeroed range, and in the last data.
        let base_disk = std::fs::read(base).unwrap();
        for at in [1000, 10 * MIB + 3 * 65536 + 17, 11 * MIB + 5, SIZE - 3] {
            let mut d = base_disk.clone();
            d[at as usize] ^= 0x81;
            let bad = dir.path().join("bad.raw");
            write_sparse(&bad, &d);
            let c = compare(img, *f, &bad, DiskFormat::Raw);
            assert_eq!(c.first_difference, Some(at), "{img:?}, byte {at}: {c}");
            let c = compare(&bad, DiskFormat::Raw, img, *f);
            assert_eq!(c.first_difference, Some(at), "{img:?}, byte {at}, swapped: {c}");
        }
    }
}

#[test]
fn a_three_deep_chain_over_a_smaller_raw_base_is_read_as_qemu_reads_it() {
    // raw base (24 MiB) <- mid.qcow2 (grown to 32 MiB) <- top.qcow2: our own readers
    // follow the chain; past the base's end the guest reads zeros.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    raw_image(&raw, SIZE);
    let (mid, top) = (dir.path().join("mid.qcow2"), dir.path().join("top.qcow2"));
    let create = |backing: &str, fmt: &str, path: &Path, size: &str| {
        let out = Tool::new("qemu-img", deadline::QEMU_IMG_METADATA)
            .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b", backing])
            .arg(path)
            .arg(size)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", out.stderr);
    };
    create("base.raw", "raw", &mid, "32M");
    qemu_io(&mid, DiskFormat::Qcow2, "write -P 0x22 3M 128k");
    qemu_io(&mid, DiskFormat::Qcow2, "write -P 0x23 30M 64k");
    create("mid.qcow2", "qcow2", &top, "32M");
    qemu_io(&top, DiskFormat::Qcow2, "write -P 0x33 10M 64k");
    qemu_io(&top, DiskFormat::Qcow2, "write -z 11M 64k");
    let flat = dir.path().join("flat.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw"], &[&top, &flat]);
    let c = compare(&top, DiskFormat::Qcow2, &flat, DiskFormat::Raw);
    assert!(c.identical, "{c}");
    assert_eq!(c, export_only(&top, DiskFormat::Qcow2, &flat, DiskFormat::Raw));
    let truth = std::fs::read(&flat).unwrap();
    // The raw base's data, mid's, top's, top's zeroed cluster, mid's past the base's end,
    // and the zeros past the base's end.
    for at in [1000, 3 * MIB + 5, 10 * MIB + 9, 11 * MIB + 1, 30 * MIB + 2, 28 * MIB + 3] {
        let mut d = truth.clone();
        d[at as usize] ^= 0x5a;
        let bad = dir.path().join("bad.raw");
        write_sparse(&bad, &d);
        let c = compare(&top, DiskFormat::Qcow2, &bad, DiskFormat::Raw);
        assert_eq!(c.first_difference, Some(at), "byte {at}: {c}");
    }
}
