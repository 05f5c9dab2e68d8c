use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Subcommand;

use super::progress::Progress;
use super::CliResult;
use quiesce::bench::blockcmp::{self, BlockCompareBenchOptions};
use quiesce::bench::freeze::{self, FreezeOptions};
use quiesce::bench::manifest::{self, DiskBenchError, ManifestBenchOptions};
use quiesce::bench::saved_state::{self, BenchOptions};
use quiesce::qemu::accel::AccelChoice;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Save and restore a guest with filled RAM; print ratios against dd, a plain QMP
    /// migrate with QEMU's defaults, and libvirt's virsh save/restore, all from this run.
    SavedState {
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        #[arg(long, default_value = "quiesce-bench")]
        work_dir: std::path::PathBuf,
        /// Skip the libvirt comparison.
        #[arg(long)]
        no_libvirt: bool,
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
        #[arg(long, default_value = "quiesce-bench")]
        work_dir: std::path::PathBuf,
        /// Runs of each measurement; medians are compared.
        #[arg(long, default_value_t = manifest::ROUNDS as u64, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
    },
    /// Manifest throughput (MB/s of file content hashed) on 1 GiB ext4 images, split into
    /// the qemu-img convert and walk parts; print ratios against a sequential read of the image.
    Manifest {
        #[arg(long, default_value = "quiesce-bench")]
        work_dir: std::path::PathBuf,
        /// Runs of each measurement; medians are compared.
        #[arg(long, default_value_t = manifest::ROUNDS as u64, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
    },
}

pub async fn run(cmd: BenchCommand, accel: Option<AccelChoice>) -> CliResult {
    let mut p = Progress::new();
    let text = match cmd {
        BenchCommand::SavedState { memory, work_dir, no_libvirt } => {
            let opts = BenchOptions { accel, memory_mib: memory, work_dir, libvirt: !no_libvirt };
            saved_state::run(&opts, &mut |s| p.step(s)).await?
        }
        BenchCommand::FreezeWindow { rounds, no_libvirt } => {
            let opts = FreezeOptions { accel, rounds: rounds as usize, libvirt: !no_libvirt };
            freeze::run(&opts, &mut |s| p.step(s)).await?
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
    println!("{text}");
    Ok(0)
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
