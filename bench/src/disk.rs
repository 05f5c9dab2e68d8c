//! What the disk benchmarks (`manifest` and `block-compare`) share: a 1 GiB ext4 image
//! filled with pseudo-random files, the helper tools run under a deadline, timing rounds
//! that Ctrl-C can stop between steps, and their error type.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use quiesce::image::manifest::ManifestError;
use quiesce::qemu::programs::QemuProgram;
use quiesce::qemu::DiskFormat;
use quiesce::sys::{deadline, Tool, ToolError};
use quiesce::verify::blockcmp::BlockCompareError;

use crate::rng::XorShift;
use crate::stats::filesystem_of;

/// Runs of each measurement; the median is printed.
pub const ROUNDS: usize = 3;
/// Size of the benchmark disks.
pub const DISK_SIZE: u64 = 1 << 30;

/// What can stop a disk benchmark (`manifest` and `block-compare`). Whatever stops it, the
/// run folder and every image in it are removed.
#[derive(Debug, thiserror::Error)]
pub enum DiskBenchError {
    /// The work folder (`--work-dir`) or a file in it could not be made, written, read or
    /// removed: check that the folder is writable and its filesystem has about 5 GiB free.
    #[error("work folder {path}: {source}")]
    WorkDir { path: PathBuf, source: std::io::Error },
    /// A helper tool (mkfs.ext4, qemu-img, qemu-io) could not start, failed, or missed its
    /// deadline; the error holds its command line, exit status and what it printed.
    #[error("{what}: {source}")]
    Tool { what: String, source: ToolError },
    /// quiesce could not make a manifest of a benchmark image: a bug in the manifest code or
    /// an image the benchmark itself made wrong, since the images are made here.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// quiesce's block comparison failed on a benchmark pair.
    #[error(transparent)]
    Compare(#[from] BlockCompareError),
    /// A measured run gave a wrong answer (two copies compared as different, a byte flip
    /// not found): its time would mean nothing, so no report is printed. A bug to report.
    #[error("a benchmark result is wrong: {0}")]
    Check(String),
    /// Ctrl-C stopped the benchmark between two steps.
    #[error("interrupted; the benchmark's files have been removed")]
    Interrupted,
}

/// Which files fill the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// About 500 MiB: mostly 4-260 KiB files, one 16 MiB file in 50, in 37 folders.
    LargeFiles,
    /// About 450 MiB: mostly 64 bytes to 16 KiB, one 8 MiB file in 1000, in 400 folders.
    ManySmallFiles,
}

impl Fill {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fill::LargeFiles => "large files",
            Fill::ManySmallFiles => "many small files",
        }
    }
}

/// The files written into an image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Filled {
    pub(crate) files: usize,
    pub(crate) bytes: u64,
}

pub(crate) fn werr(path: &Path) -> impl FnOnce(std::io::Error) -> DiskBenchError + '_ {
    move |source| DiskBenchError::WorkDir { path: path.to_owned(), source }
}

/// Writes the pseudo-random files of `fill` under `root`.
fn fill_folder(root: &Path, fill: Fill) -> Result<Filled, DiskBenchError> {
    let (seed, target, dirs) = match fill {
        Fill::LargeFiles => (42, 500u64 << 20, 37),
        Fill::ManySmallFiles => (7, 450u64 << 20, 400),
    };
    let mut rng = XorShift(seed);
    let (mut n, mut bytes) = (0usize, 0u64);
    while bytes < target {
        let size = match fill {
            Fill::LargeFiles if n % 50 == 0 => 16 << 20,
            Fill::LargeFiles => 4096 + (rng.next_u64() % (256 << 10)) as usize,
            Fill::ManySmallFiles if n % 1000 == 0 => 8 << 20,
            Fill::ManySmallFiles => 64 + (rng.next_u64() % (16 << 10)) as usize,
        };
        let d = root.join(format!("d{}", n % dirs));
        std::fs::create_dir_all(&d).map_err(werr(&d))?;
        let data: Vec<u8> = (0..size / 8).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
        let f = d.join(format!("f{n}"));
        std::fs::write(&f, &data).map_err(werr(&f))?;
        bytes += data.len() as u64;
        n += 1;
    }
    Ok(Filled { files: n, bytes })
}

/// Runs a tool that must succeed within `timeout`; its stdout.
pub(crate) fn tool(
    what: &str,
    program: impl AsRef<std::ffi::OsStr>,
    timeout: Duration,
    args: &[&std::ffi::OsStr],
) -> Result<Vec<u8>, DiskBenchError> {
    let out = Tool::new(program, timeout).args(args).run();
    out.map(|o| o.stdout).map_err(|source| DiskBenchError::Tool { what: what.to_owned(), source })
}

/// A sparse 1 GiB raw image at `raw` holding an ext4 filesystem (mkfs.ext4 defaults) with
/// the files of `fill`. The source folder is made next to it and removed.
pub(crate) fn ext4_image(dir: &Path, fill: Fill, raw: &Path) -> Result<Filled, DiskBenchError> {
    let root = dir.join("root");
    let filled = fill_folder(&root, fill)?;
    std::fs::File::create(raw).and_then(|f| f.set_len(DISK_SIZE)).map_err(werr(raw))?;
    tool(
        "mkfs.ext4 -d",
        "mkfs.ext4",
        deadline::MKFS,
        &["-q".as_ref(), "-F".as_ref(), "-d".as_ref(), root.as_os_str(), raw.as_os_str()],
    )?;
    std::fs::remove_dir_all(&root).map_err(werr(&root))?;
    Ok(filled)
}

/// `qemu-img convert` with a deadline.
pub(crate) fn convert(src: &Path, sf: DiskFormat, dst: &Path, df: DiskFormat) -> Result<(), DiskBenchError> {
    let args = [
        "convert".as_ref(),
        "-f".as_ref(),
        sf.driver().as_ref(),
        "-O".as_ref(),
        df.driver().as_ref(),
        src.as_os_str(),
        dst.as_os_str(),
    ];
    tool(&format!("qemu-img convert of {}", src.display()), QemuProgram::Img.path(), deadline::QEMU_IMG_COPY, &args)
        .map(drop)
}

/// Stops a benchmark between steps once Ctrl-C was pressed.
pub(crate) fn check(cancel: &AtomicBool) -> Result<(), DiskBenchError> {
    if cancel.load(Ordering::Relaxed) {
        return Err(DiskBenchError::Interrupted);
    }
    Ok(())
}

/// Times `rounds` runs of `f`, in seconds.
pub(crate) fn timed<T>(
    rounds: usize,
    cancel: &AtomicBool,
    mut f: impl FnMut() -> Result<T, DiskBenchError>,
) -> Result<(Vec<f64>, T), DiskBenchError> {
    let mut times = Vec::with_capacity(rounds);
    let mut last = None;
    for _ in 0..rounds.max(1) {
        check(cancel)?;
        let t = Instant::now();
        last = Some(f()?);
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((times, last.expect("at least one round")))
}

/// Makes the run folder inside the work folder.
pub(crate) fn run_dir(work_dir: &Path) -> Result<(tempfile::TempDir, String), DiskBenchError> {
    std::fs::create_dir_all(work_dir).map_err(werr(work_dir))?;
    let work = std::fs::canonicalize(work_dir).map_err(werr(work_dir))?;
    let dir = tempfile::Builder::new().prefix("run-").tempdir_in(&work).map_err(werr(&work))?;
    Ok((dir, format!("{} ({})", work.display(), filesystem_of(&work))))
}
