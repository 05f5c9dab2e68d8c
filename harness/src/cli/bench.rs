use clap::Subcommand;

use super::progress::Progress;
use super::CliResult;
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
}

pub async fn run(cmd: BenchCommand, accel: Option<AccelChoice>) -> CliResult {
    let BenchCommand::SavedState { memory, work_dir, no_libvirt } = cmd;
    let opts = BenchOptions { accel, memory_mib: memory, work_dir, libvirt: !no_libvirt };
    let mut p = Progress::new();
    let text = saved_state::run(&opts, &mut |s| p.step(s)).await?;
    p.finish();
    println!("{text}");
    Ok(0)
}
