//! `quiesce-bench`: the benchmarks' command line. Run it from a checkout with
//! `cargo run --release -p quiesce-bench -- <benchmark>`: a debug build would measure
//! unoptimised code against optimised baselines (dd, qemu-img, libvirt).

#![deny(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use quiesce::qemu::accel::AccelChoice;
use quiesce_bench::blockcmp::{self, BlockCompareBenchOptions};
use quiesce_bench::disk::{DiskBenchError, ROUNDS as DISK_ROUNDS};
use quiesce_bench::freeze::{self, FreezeOptions};
use quiesce_bench::manifest::{self, ManifestBenchOptions};
use quiesce_bench::saved_state::{self, BenchOptions};
use quiesce_bench::set_load::{self, SetLoadOptions};
use quiesce_bench::suite::{self, SuiteOptions};

/// The `quiesce` binary's progress line, so both programs report progress alike.
#[path = "../../harness/src/cli/progress.rs"]
// The benchmarks report steps only; a scenario's line (begin, end) is `quiesce run`'s.
#[allow(dead_code)]
mod progress;

use progress::Progress;

#[derive(Parser)]
#[command(
    name = "quiesce-bench",
    version,
    about = "Benchmarks of quiesce that print ratios against baselines measured in the same run"
)]
struct Cli {
    /// Accelerator: auto (probe KVM, else TCG), kvm or tcg. Also $QUIESCE_ACCEL.
    #[arg(long, global = true, value_parser = clap::value_parser!(AccelChoice))]
    accel: Option<AccelChoice>,
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Save and restore a guest with filled RAM; print ratios against dd, a plain QMP
    /// migrate with QEMU's defaults, and libvirt's virsh save/restore, all from this run.
    SavedState {
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Folder for the benchmark's files, on the filesystem to measure; this run's own
        /// folder inside it is removed at the end.
        #[arg(long, default_value = "quiesce-bench")]
        work_dir: std::path::PathBuf,
        /// Skip the libvirt comparison.
        #[arg(long)]
        no_libvirt: bool,
        /// The downtime-against-disk-data series: MiB of data on the data disk at each
        /// point, comma-separated; `--data-mib ''` skips the series.
        #[arg(long, value_delimiter = ',', default_values_t = saved_state::DEFAULT_DATA_MIB)]
        data_mib: Vec<u64>,
        /// Backups per method at each point of the series; medians are compared.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=20))]
        series_rounds: u64,
        /// Run only the series (no save/restore rounds against dd, QEMU's defaults, virsh).
        #[arg(long)]
        series_only: bool,
    },
    /// Time the Child VM Snapshot's freeze window with 1 and 4 disks; print ratios against
    /// libvirt's `virsh snapshot-create-as --disk-only --quiesce` on the same guest, and
    /// against a bare freeze + transaction(blockdev-snapshot-sync) + thaw, all from this run.
    FreezeWindow {
        /// Runs of each measurement; medians are compared.
        #[arg(long, default_value_t = freeze::DEFAULT_ROUNDS as u64, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// Skip the libvirt comparison.
        #[arg(long)]
        no_libvirt: bool,
    },
    /// Compare two 1 GiB disk images block by block (qcow2 pair; overlay vs flat copy;
    /// identical and one byte apart); print ratios against `qemu-img compare` of the same pair.
    BlockCompare {
        /// Folder for the benchmark's files, on the filesystem to measure; this run's own
        /// folder inside it is removed at the end.
        #[arg(long, default_value = "quiesce-bench")]
        work_dir: std::path::PathBuf,
        /// Runs of each measurement; medians are compared.
        #[arg(long, default_value_t = DISK_ROUNDS as u64, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
    },
    /// Manifest throughput (MB/s of file content hashed) on 1 GiB ext4 images, split into
    /// the qemu-img convert and walk parts; print ratios against a sequential read of the image.
    Manifest {
        /// Folder for the benchmark's files, on the filesystem to measure; this run's own
        /// folder inside it is removed at the end.
        #[arg(long, default_value = "quiesce-bench")]
        work_dir: std::path::PathBuf,
        /// Runs of each measurement; medians are compared.
        #[arg(long, default_value_t = DISK_ROUNDS as u64, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
    },
    /// One backup job over a set of VMs (2, 4, 8, 12 by default), mixed methods, each with
    /// a journal writer, the last VM's QEMU killed mid-job: whether each set ends all or
    /// nothing with nothing lost, its phase times, longest freeze window and downtime, with
    /// ratios against the smallest set of the same run.
    SetLoad {
        /// VM counts, run in this order.
        #[arg(long, value_delimiter = ',', default_values_t = set_load::DEFAULT_COUNTS)]
        counts: Vec<usize>,
        /// RAM per VM (MiB).
        #[arg(long, default_value_t = set_load::DEFAULT_MEMORY_MIB)]
        memory: u32,
        /// Folder for the runs' disks and backups; each run's own folder inside it is removed.
        #[arg(long, default_value = "quiesce-bench")]
        work_dir: std::path::PathBuf,
    },
    /// Issue 11's suite goals: the README's main command and test command, each timed in a
    /// fresh clone of this checkout's commit with an empty image cache, and the warm run;
    /// each by stage, each goal printed met or missed; then boots of the test guest split
    /// at the kernel. Takes as long as the commands (about 40 min on 2 cores under TCG).
    Suite {
        /// Folder for the clones, their caches and the logs; the clones and caches are
        /// removed at the end, the logs stay.
        #[arg(long, default_value = "quiesce-bench")]
        work_dir: std::path::PathBuf,
        /// The README commands to time: `main` (and the warm run after it), `test`;
        /// `--commands` alone times none (only the boots).
        #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = [suite::Which::Main, suite::Which::Test])]
        commands: Vec<suite::Which>,
        /// Boots of the test guest to split (0: none).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=20))]
        boots: u64,
        /// Keep the clones and their caches.
        #[arg(long)]
        keep: bool,
        /// Read the two commands from this file's "## Two commands" section instead of
        /// the checkout's README (the commands still run in clones of the checkout).
        #[arg(long)]
        readme: Option<std::path::PathBuf>,
    },
}

/// Exit codes: 0 ok, 1 failed, 2 bad usage (clap).
const EXIT_FAILED: i32 = 1;

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("quiesce-bench: error: could not start the async runtime: {e}");
            std::process::exit(EXIT_FAILED);
        }
    };
    let result = runtime.block_on(run(cli.command, cli.accel));
    // Drop the runtime (and with it every machine guard) before exiting.
    drop(runtime);
    match result {
        Ok(text) => println!("{text}"),
        Err(e) => {
            eprintln!("quiesce-bench: error: {e}");
            let mut source = std::error::Error::source(&*e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            std::process::exit(EXIT_FAILED);
        }
    }
}

/// Runs one benchmark and returns its report.
async fn run(cmd: BenchCommand, accel: Option<AccelChoice>) -> Result<String, Box<dyn std::error::Error>> {
    let mut p = Progress::new();
    let text = match cmd {
        BenchCommand::SavedState { memory, work_dir, no_libvirt, data_mib, series_rounds, series_only } => {
            let opts = BenchOptions {
                accel,
                memory_mib: memory,
                work_dir,
                libvirt: !no_libvirt,
                data_mib,
                series_rounds: series_rounds as usize,
                series_only,
            };
            saved_state::run(&opts, &mut |s| p.step(s)).await?
        }
        BenchCommand::FreezeWindow { rounds, no_libvirt } => {
            let opts = FreezeOptions { accel, rounds: rounds as usize, libvirt: !no_libvirt };
            freeze::run(&opts, &mut |s| p.step(s)).await?
        }
        BenchCommand::SetLoad { counts, memory, work_dir } => {
            let opts = SetLoadOptions { accel, counts, memory_mib: memory, work_dir };
            set_load::run(&opts, &mut |s| p.step(s)).await?
        }
        BenchCommand::Suite { work_dir, commands, boots, keep, readme } => {
            let opts = SuiteOptions { accel, work_dir, commands, boots: boots as usize, keep, readme };
            // The commands run in process groups of their own, out of reach of the
            // terminal's Ctrl-C: dropping the run on a signal stops the one running, with
            // everything it started, before this returns.
            let mut step = |s: &str| p.step(s);
            tokio::select! {
                r = suite::run(&opts, &mut step) => r?,
                _ = stop_signal() => return Err(suite::SuiteError::Interrupted.into()),
            }
        }
        BenchCommand::BlockCompare { work_dir, rounds } => {
            let opts = BlockCompareBenchOptions { work_dir, rounds: rounds as usize };
            blocking(move |cancel, progress| blockcmp::run(&opts, cancel, progress)).await?
        }
        BenchCommand::Manifest { work_dir, rounds } => {
            let opts = ManifestBenchOptions { work_dir, rounds: rounds as usize };
            blocking(move |cancel, progress| manifest::run(&opts, cancel, progress)).await?
        }
    };
    p.finish();
    Ok(text)
}

/// SIGINT or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// Runs a synchronous disk benchmark on a thread of its own (it starts helper processes that
/// die with their thread, so that thread lives as long as the benchmark). Ctrl-C asks it to
/// stop at its next step; it then removes its files and returns.
async fn blocking(
    f: impl FnOnce(&AtomicBool, &mut dyn FnMut(&str)) -> Result<String, DiskBenchError> + Send + 'static,
) -> Result<String, Box<dyn std::error::Error>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let mut task = tokio::task::spawn_blocking(move || {
        let mut p = Progress::new();
        let r = f(&c, &mut |s| p.step(s));
        p.finish();
        r
    });
    let joined = tokio::select! {
        r = &mut task => r,
        _ = tokio::signal::ctrl_c() => {
            cancel.store(true, Ordering::Relaxed);
            task.await
        }
    };
    Ok(joined.map_err(|e| format!("the benchmark thread failed: {e}"))??)
}
