//! `quiesce-bench manifest`: how fast a file-level manifest of a disk is made, on 1 GiB
//! ext4 images about half full (one of few large files, one of many small ones), split into
//! its two parts (`qemu-img convert` of the qcow2 to a sparse raw file, then the walk that
//! hashes every file), against baselines from the same run: a plain sequential read of the
//! raw image, the same read with BLAKE3 over every byte, and `qemu-img compare` of a pair.
//!
//! Throughput is bytes of file content hashed per second. Every measurement is taken
//! `--rounds` times (default [`ROUNDS`]) with the page cache warm; medians are printed.
//! Nothing is asserted.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use quiesce::image::manifest::{self, Limits, Manifest};
use quiesce::qemu::programs::QemuProgram;
use quiesce::qemu::DiskFormat;
use quiesce::sys::{deadline, Tool};

#[cfg(doc)]
use crate::disk::ROUNDS;
use crate::disk::{check, convert, ext4_image, run_dir, timed, werr, DiskBenchError, Fill, Filled};
use crate::stats::{median, runs};

#[derive(Debug, Clone)]
pub struct ManifestBenchOptions {
    /// Where the images are made (in a folder of their own, removed at the end).
    pub work_dir: PathBuf,
    pub rounds: usize,
}

/// Reads a file from start to end in 1 MiB blocks, hashing what it reads if `hash`.
fn read_through(path: &Path, hash: bool) -> Result<u64, DiskBenchError> {
    let mut f = std::fs::File::open(path).map_err(werr(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(werr(path))?;
        if n == 0 {
            break;
        }
        if hash {
            hasher.update(&buf[..n]);
        }
        total += n as u64;
    }
    std::hint::black_box(hasher.finalize());
    Ok(total)
}

/// The numbers of one image.
struct Measured {
    fill: Fill,
    filled: Filled,
    entries: usize,
    image_bytes: u64,
    read: Vec<f64>,
    read_hash: Vec<f64>,
    walk: Vec<f64>,
    convert: Vec<f64>,
    whole: Vec<f64>,
    pair: Vec<f64>,
    compare: Vec<f64>,
}

/// Runs the benchmark and returns the text to print.
pub fn run(
    opts: &ManifestBenchOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&str),
) -> Result<String, DiskBenchError> {
    let (dir, work) = run_dir(&opts.work_dir)?;
    let mut results = Vec::new();
    for fill in [Fill::LargeFiles, Fill::ManySmallFiles] {
        results.push(measure(dir.path(), fill, opts.rounds, cancel, progress)?);
    }
    Ok(render(&results, opts.rounds, &work))
}

fn measure(
    dir: &Path,
    fill: Fill,
    rounds: usize,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&str),
) -> Result<Measured, DiskBenchError> {
    let what = fill.name();
    progress(&format!("{what}: writing the files and making a 1 GiB ext4 image"));
    let raw = dir.join("disk.raw");
    let filled = ext4_image(dir, fill, &raw)?;
    check(cancel)?;
    let (qa, qb) = (dir.join("a.qcow2"), dir.join("b.qcow2"));
    progress(&format!("{what}: converting it to a pair of qcow2 images"));
    convert(&raw, DiskFormat::Raw, &qa, DiskFormat::Qcow2)?;
    convert(&raw, DiskFormat::Raw, &qb, DiskFormat::Qcow2)?;
    let read = |p: &Path, f| manifest::read_image(p, f, &Limits::default());

    // Warm the page cache for everything that is read, so every measurement starts alike.
    progress(&format!("{what}: warming the page cache"));
    read_through(&raw, false)?;
    read_through(&qa, false)?;
    read_through(&qb, false)?;

    progress(&format!("{what}: sequential read of the raw image"));
    let (read_t, image_bytes) = timed(rounds, cancel, || read_through(&raw, false))?;
    progress(&format!("{what}: sequential read + BLAKE3 of the raw image"));
    let (read_hash, _) = timed(rounds, cancel, || read_through(&raw, true))?;
    progress(&format!("{what}: walking the raw image"));
    let (walk, m) = timed(rounds, cancel, || Ok(read(&raw, DiskFormat::Raw)?))?;
    if m.bytes_hashed() != filled.bytes {
        return Err(DiskBenchError::Check(format!(
            "{what}: the manifest hashed {} bytes of content, the files hold {}",
            m.bytes_hashed(),
            filled.bytes
        )));
    }
    progress(&format!("{what}: qemu-img convert qcow2 -> raw"));
    let conv = dir.join("conv.raw");
    let (convert_t, _) = timed(rounds, cancel, || {
        let _ = std::fs::remove_file(&conv);
        Ok(manifest::to_raw(&qa, DiskFormat::Qcow2, &conv)?)
    })?;
    std::fs::remove_file(&conv).map_err(werr(&conv))?;
    progress(&format!("{what}: read_image of the qcow2"));
    let same = |other: &Manifest| {
        if *other == m {
            Ok(())
        } else {
            Err(DiskBenchError::Check(format!("{what}: the qcow2's manifest differs from the raw image's")))
        }
    };
    let (whole, _) = timed(rounds, cancel, || same(&read(&qa, DiskFormat::Qcow2)?))?;
    progress(&format!("{what}: two manifests and their diff"));
    let (pair, _) = timed(rounds, cancel, || {
        let changes = manifest::diff(&read(&qa, DiskFormat::Qcow2)?, &read(&qb, DiskFormat::Qcow2)?, &[]);
        if changes.is_empty() {
            Ok(())
        } else {
            Err(DiskBenchError::Check(format!("{what}: two copies of one image differ: {changes:?}")))
        }
    })?;
    progress(&format!("{what}: qemu-img compare"));
    let (compare, _) = timed(rounds, cancel, || qemu_img_compare(&qa, &qb, true))?;
    for p in [&raw, &qa, &qb] {
        std::fs::remove_file(p).map_err(werr(p))?;
    }
    Ok(Measured {
        fill,
        filled,
        entries: m.entry_count(),
        image_bytes,
        read: read_t,
        read_hash,
        walk,
        convert: convert_t,
        whole,
        pair,
        compare,
    })
}

/// `qemu-img compare -U` of two qcow2 images with a deadline; checks its verdict.
fn qemu_img_compare(a: &Path, b: &Path, expect_same: bool) -> Result<(), DiskBenchError> {
    let args = [
        "compare".as_ref(),
        "-U".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        a.as_os_str(),
        b.as_os_str(),
    ];
    let failed = |source| DiskBenchError::Tool { what: "qemu-img compare".into(), source };
    let out = Tool::new(QemuProgram::Img.path(), deadline::QEMU_IMG_COPY).args(args).output().map_err(failed)?;
    match out.code() {
        Some(0) if expect_same => Ok(()),
        Some(1) if !expect_same => Ok(()),
        Some(0 | 1) => {
            Err(DiskBenchError::Check(format!("qemu-img compare said {}, expected the opposite", out.status)))
        }
        _ => Err(failed(out.into_failure())),
    }
}

fn render(results: &[Measured], rounds: usize, work: &str) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "quiesce-bench manifest: 1 GiB ext4 images about half full (mkfs.ext4 -d, default features); \
         {rounds} rounds each, medians, page cache warm"
    );
    let _ = writeln!(s, "work dir: {work}");
    for r in results {
        let content = r.filled.bytes as f64 / 1e6;
        let mbs = |secs: f64| content / secs;
        let (read, read_hash) = (median(&r.read), median(&r.read_hash));
        let image_mbs = |secs: f64| r.image_bytes as f64 / 1e6 / secs;
        let (walk, conv, whole) = (median(&r.walk), median(&r.convert), median(&r.whole));
        let (pair, compare) = (median(&r.pair), median(&r.compare));
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{}: {} files, {} MiB of content, {} entries",
            r.fill.name(),
            r.filled.files,
            r.filled.bytes >> 20,
            r.entries
        );
        let line = |s: &mut String, what: &str, xs: &[f64], extra: String| {
            let _ = writeln!(s, "  {what:<46} {:>7.3} s  {extra}  {}", median(xs), runs(xs));
        };
        line(
            &mut s,
            "baseline: sequential read of the raw image",
            &r.read,
            format!("{:>6.0} MB/s of image", image_mbs(read)),
        );
        line(
            &mut s,
            "baseline: the same read + BLAKE3 of every byte",
            &r.read_hash,
            format!("{:>6.0} MB/s of image", image_mbs(read_hash)),
        );
        line(
            &mut s,
            "walk: manifest of the raw image (read_raw)",
            &r.walk,
            format!("{:>6.0} MB/s of content", mbs(walk)),
        );
        line(
            &mut s,
            "convert: qemu-img convert qcow2 -> raw",
            &r.convert,
            format!("{:>6.0} MB/s of content", mbs(conv)),
        );
        line(
            &mut s,
            "whole: read_image of the qcow2 (both parts)",
            &r.whole,
            format!("{:>6.0} MB/s of content", mbs(whole)),
        );
        line(&mut s, "pair: two manifests of qcow2 images + diff", &r.pair, String::new());
        line(&mut s, "pair: qemu-img compare of the same two", &r.compare, String::new());
        let _ = writeln!(s, "  ratios");
        let _ =
            writeln!(s, "    walk throughput / read+BLAKE3 baseline's      {:>6.2}x", mbs(walk) / image_mbs(read_hash));
        let _ = writeln!(s, "    walk throughput / plain read baseline's       {:>6.2}x", mbs(walk) / image_mbs(read));
        let _ = writeln!(
            s,
            "    share of read_image spent converting          {:>6.0} %   (walk {:.0} %)",
            100.0 * conv / whole,
            100.0 * walk / whole
        );
        let _ = writeln!(s, "    pair of manifests / qemu-img compare          {:>6.2}x as long", pair / compare);
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "notes: MB/s of content is bytes of file content hashed per second (1 MB = 10^6 bytes); \
         the baselines' MB/s count every byte of the 1 GiB raw image, holes included."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_prints_parts_and_ratios() {
        let m = Measured {
            fill: Fill::LargeFiles,
            filled: Filled { files: 10, bytes: 500_000_000 },
            entries: 20,
            image_bytes: 1_000_000_000,
            read: vec![0.5; 3],
            read_hash: vec![1.0; 3],
            walk: vec![1.0, 2.0, 1.0],
            convert: vec![1.0; 3],
            whole: vec![2.0; 3],
            pair: vec![4.0; 3],
            compare: vec![1.0; 3],
        };
        let text = render(&[m], 3, "/w (ext4 on /dev/vda at /)");
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "walk: manifest of the raw image (read_raw) 1.000 s 500 MB/s of content [1.000 2.000 1.000]",
            "walk throughput / read+BLAKE3 baseline's 0.50x",
            "walk throughput / plain read baseline's 0.25x",
            "share of read_image spent converting 50 % (walk 50 %)",
            "pair of manifests / qemu-img compare 4.00x as long",
        ] {
            assert!(flat.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
