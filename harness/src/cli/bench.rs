use clap::Subcommand;

use super::progress::Progress;
use super::CliResult;
use quiesce::bench::freeze::{self, FreezeOptions};
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
    };
    p.finish();
    println!("{text}");
    Ok(0)
}
