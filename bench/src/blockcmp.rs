//! `quiesce-bench block-compare`: quiesce's block-level comparison
//! ([`quiesce::verify::blockcmp`]) against `qemu-img compare` of the same pair, in the same
//! run, on a 1 GiB ext4 image about half full:
//!
//! - a pair of qcow2 images converted from it;
//! - a qcow2 overlay (over a qcow2 base, with some writes of its own) against a flat copy
//!   of it made by `qemu-img convert`;
//! - a pair of vhdx images converted from it (QEMU's vhdx driver reports neither holes
//!   nor host offsets: ours reads the images' own block allocation tables);
//! - a pair of vpc (VHD) images converted from it: the same, from the VHD's own table;
//!
//! each identical, and with one byte differing near the end of the disk (so both tools
//! must read everything before it). Ours maps every image with its own readers (no
//! qemu-img run) and compares the allocated data in place, in the files' mappings. It is
//! timed twice: with its default read path (the file where sound, NBD otherwise) and with
//! everything through the NBD export, which is what justifies the default. Medians of
//! `--rounds` (default [`crate::disk::ROUNDS`]); the page cache is warm; nothing is
//! asserted. Issue 11's goal, at least 1.5x as fast as `qemu-img compare`, is printed met
//! or missed for each pair.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use quiesce::qemu::programs::QemuProgram;
use quiesce::qemu::DiskFormat;
use quiesce::sys::{deadline, Tool};
use quiesce::verify::blockcmp::{self, BlockComparison, Options, ReadPath};

use crate::disk::{check, convert, ext4_image, run_dir, timed, tool, DiskBenchError, Fill, DISK_SIZE};
use crate::stats::{goal, median, runs};

/// Issue 11's goal: every pair at least this many times as fast as `qemu-img compare`.
const GOAL_AS_FAST: f64 = 1.5;

#[derive(Debug, Clone)]
pub struct BlockCompareBenchOptions {
    pub work_dir: PathBuf,
    pub rounds: usize,
}

/// Where the differing byte is: in the last MiB of the 1 GiB disk, not aligned.
pub const DIFF_AT: u64 = DISK_SIZE - (1 << 20) + 12_345;

struct Case {
    name: &'static str,
    /// The format of both images.
    format: DiskFormat,
    a: PathBuf,
    b: PathBuf,
    differ_at: Option<u64>,
}

struct Measured {
    name: &'static str,
    ours: Vec<f64>,
    nbd_only: Vec<f64>,
    qemu_img: Vec<f64>,
    result: BlockComparison,
}

/// Runs the benchmark and returns the text to print.
pub fn run(
    opts: &BlockCompareBenchOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&str),
) -> Result<String, DiskBenchError> {
    let (dir, work) = run_dir(&opts.work_dir)?;
    let d = dir.path();
    progress("writing the files and making a 1 GiB ext4 image");
    let raw = d.join("disk.raw");
    let filled = ext4_image(d, Fill::LargeFiles, &raw)?;
    check(cancel)?;

    progress("making the qcow2 pair, the overlay and the flat copies");
    let (a, b, b_diff) = (d.join("a.qcow2"), d.join("b.qcow2"), d.join("b-diff.qcow2"));
    convert(&raw, DiskFormat::Raw, &a, DiskFormat::Qcow2)?;
    convert(&raw, DiskFormat::Raw, &b, DiskFormat::Qcow2)?;
    convert(&raw, DiskFormat::Raw, &b_diff, DiskFormat::Qcow2)?;
    let (base, top) = (d.join("base.qcow2"), d.join("top.qcow2"));
    convert(&raw, DiskFormat::Raw, &base, DiskFormat::Qcow2)?;
    let (va, vb, vb_diff) = (d.join("a.vhdx"), d.join("b.vhdx"), d.join("b-diff.vhdx"));
    for v in [&va, &vb, &vb_diff] {
        convert(&raw, DiskFormat::Raw, v, DiskFormat::Vhdx)?;
    }
    flip_byte(&vb_diff, DiskFormat::Vhdx)?;
    let (ha, hb, hb_diff) = (d.join("a.vhd"), d.join("b.vhd"), d.join("b-diff.vhd"));
    for v in [&ha, &hb, &hb_diff] {
        convert(&raw, DiskFormat::Raw, v, DiskFormat::Vpc)?;
    }
    flip_byte(&hb_diff, DiskFormat::Vpc)?;
    std::fs::remove_file(&raw).map_err(|source| DiskBenchError::WorkDir { path: raw.clone(), source })?;
    let q = |args: &[&std::ffi::OsStr]| {
        tool("qemu-img create (overlay)", QemuProgram::Img.path(), deadline::QEMU_IMG_METADATA, args).map(drop)
    };
    q(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        top.as_os_str(),
    ])?;
    // What a guest might have written since the base: new data over old, in free space,
    // and a discarded range.
    for cmd in ["write -P 0xa5 96M 24M", "write -P 0x3c 700M 40M", "write -z 300M 8M"] {
        qemu_io(&top, DiskFormat::Qcow2, cmd)?;
    }
    let (flat, flat_diff) = (d.join("flat.qcow2"), d.join("flat-diff.qcow2"));
    convert(&top, DiskFormat::Qcow2, &flat, DiskFormat::Qcow2)?;
    convert(&top, DiskFormat::Qcow2, &flat_diff, DiskFormat::Qcow2)?;
    flip_byte(&flat_diff, DiskFormat::Qcow2)?;
    flip_byte(&b_diff, DiskFormat::Qcow2)?;

    let q2 = DiskFormat::Qcow2;
    let vx = DiskFormat::Vhdx;
    let cases = [
        Case { name: "qcow2 pair, identical", format: q2, a: a.clone(), b: b.clone(), differ_at: None },
        Case {
            name: "qcow2 pair, one byte differs near the end",
            format: q2,
            a: a.clone(),
            b: b_diff,
            differ_at: Some(DIFF_AT),
        },
        Case { name: "overlay vs flat copy, identical", format: q2, a: top.clone(), b: flat, differ_at: None },
        Case {
            name: "overlay vs flat copy, one byte differs",
            format: q2,
            a: top,
            b: flat_diff,
            differ_at: Some(DIFF_AT),
        },
        Case { name: "vhdx pair, identical", format: vx, a: va.clone(), b: vb, differ_at: None },
        Case {
            name: "vhdx pair, one byte differs near the end",
            format: vx,
            a: va,
            b: vb_diff,
            differ_at: Some(DIFF_AT),
        },
        Case { name: "vhd pair, identical", format: DiskFormat::Vpc, a: ha.clone(), b: hb, differ_at: None },
        Case {
            name: "vhd pair, one byte differs near the end",
            format: DiskFormat::Vpc,
            a: ha,
            b: hb_diff,
            differ_at: Some(DIFF_AT),
        },
    ];
    let mut results = Vec::new();
    for c in &cases {
        check(cancel)?;
        progress(&format!("{}: warming up", c.name));
        // One untimed run of each: the page cache then holds both images for all three.
        ours(c, ReadPath::Auto)?;
        qemu_img_compare(c)?;
        progress(&format!("{}: ours", c.name));
        let (t_ours, result) = timed(opts.rounds, cancel, || ours(c, ReadPath::Auto))?;
        progress(&format!("{}: ours, everything through NBD", c.name));
        let (t_nbd, _) = timed(opts.rounds, cancel, || ours(c, ReadPath::ExportOnly))?;
        progress(&format!("{}: qemu-img compare", c.name));
        let (t_qemu, _) = timed(opts.rounds, cancel, || qemu_img_compare(c))?;
        results.push(Measured { name: c.name, ours: t_ours, nbd_only: t_nbd, qemu_img: t_qemu, result });
    }
    Ok(render(&results, opts.rounds, &work, filled.files, filled.bytes))
}

fn qemu_io(image: &Path, format: DiskFormat, cmd: &str) -> Result<(), DiskBenchError> {
    let args = ["-f".as_ref(), format.driver().as_ref(), "-c".as_ref(), cmd.as_ref(), image.as_os_str()];
    tool(&format!("qemu-io -c '{cmd}' {}", image.display()), QemuProgram::Io.path(), deadline::QEMU_IMG_METADATA, &args)
        .map(drop)
}

fn flip_byte(image: &Path, format: DiskFormat) -> Result<(), DiskBenchError> {
    qemu_io(image, format, &format!("write -P 0x5a {DIFF_AT} 1"))
}

/// `qemu-img compare` of a case's pair (in the case's format), checked against what the
/// case expects: exit 0 for identical, 1 for different.
fn qemu_img_compare(c: &Case) -> Result<(), DiskBenchError> {
    let f = c.format.driver();
    let args = [
        "compare".as_ref(),
        "-U".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        f.as_ref(),
        "-F".as_ref(),
        f.as_ref(),
        c.a.as_os_str(),
        c.b.as_os_str(),
    ];
    let failed = |source| DiskBenchError::Tool { what: format!("qemu-img compare ({})", c.name), source };
    let out = Tool::new(QemuProgram::Img.path(), deadline::QEMU_IMG_COPY).args(args).output().map_err(failed)?;
    match (out.code(), c.differ_at.is_none()) {
        (Some(0), true) | (Some(1), false) => Ok(()),
        (Some(0 | 1), _) => Err(DiskBenchError::Check(format!(
            "{}: qemu-img compare said {}, expected the opposite",
            c.name, out.status
        ))),
        _ => Err(failed(out.into_failure())),
    }
}

/// One comparison, checked against what the case expects.
fn ours(c: &Case, read_path: ReadPath) -> Result<BlockComparison, DiskBenchError> {
    let opts = Options { read_path, ..Options::default() };
    let r = blockcmp::compare_with(&c.a, c.format, &c.b, c.format, &opts)?;
    if r.first_difference != c.differ_at {
        return Err(DiskBenchError::Check(format!("{}: expected {:?}, blockcmp found: {r}", c.name, c.differ_at)));
    }
    Ok(r)
}

fn render(results: &[Measured], rounds: usize, work: &str, files: usize, bytes: u64) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let o = Options::default();
    let _ = writeln!(
        s,
        "quiesce-bench block-compare: 1 GiB ext4 image, {files} files, {} MiB of content (about half full); \
         {rounds} rounds each, medians, page cache warm",
        bytes >> 20
    );
    let _ = writeln!(s, "ours: {} workers, {} MiB chunks; work dir: {work}", o.workers, o.chunk >> 20);
    for r in results {
        let (ours, nbd, qemu) = (median(&r.ours), median(&r.nbd_only), median(&r.qemu_img));
        let _ = writeln!(s);
        let _ = writeln!(s, "{}: {}", r.name, r.result);
        let line = |s: &mut String, what: &str, xs: &[f64]| {
            let _ = writeln!(s, "  {what:<40} {:>7.3} s  {}", median(xs), runs(xs));
        };
        line(&mut s, "ours (file where sound, NBD otherwise)", &r.ours);
        line(&mut s, "ours, everything through NBD", &r.nbd_only);
        line(&mut s, "qemu-img compare", &r.qemu_img);
        let _ = writeln!(
            s,
            "  ratio: ours / qemu-img compare {:>6.3}   ({:.1}x as fast; goal >= {GOAL_AS_FAST}x: {})",
            ours / qemu,
            qemu / ours,
            goal(qemu / ours >= GOAL_AS_FAST)
        );
        let _ = writeln!(s, "         NBD only / ours         {:>6.3}", nbd / ours);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_prints_each_case_with_its_ratios() {
        let result = BlockComparison {
            identical: true,
            first_difference: None,
            size: (1 << 30, 1 << 30),
            bytes_compared: 512 << 20,
            bytes_skipped: 512 << 20,
            names: ("a.qcow2".into(), "b.qcow2".into()),
            cluster_size: Some(65536),
        };
        let m = Measured {
            name: "qcow2 pair, identical",
            ours: vec![0.5, 0.4, 0.6],
            nbd_only: vec![1.0; 3],
            qemu_img: vec![2.0; 3],
            result,
        };
        let text = render(&[m], 3, "/w", 10, 500 << 20);
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "qcow2 pair, identical: identical: 512 MiB of data compared, 512 MiB zero in both",
            "ours / qemu-img compare 0.250 (4.0x as fast; goal >= 1.5x: goal met)",
            "NBD only / ours 2.000",
            "ours (file where sound, NBD otherwise) 0.500 s [0.500 0.400 0.600]",
        ] {
            assert!(flat.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
