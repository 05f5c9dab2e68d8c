//! The `quiesce` command line.

mod backup;
mod diff;
mod doctor;
mod durations;
mod image;
mod jobs;
mod progress;
mod report;
mod restore;
mod run;
mod vm;

use clap::{Parser, Subcommand};
use quiesce::interrupt::Interrupt;
use quiesce::qemu::accel::AccelChoice;
use quiesce::qemu::compat::{self, QemuRelease};

#[derive(Parser)]
#[command(name = "quiesce", version, about = "Reproduce VM backup scenarios on QEMU and prove the restore is right")]
pub struct Cli {
    /// Accelerator: auto (probe KVM, else TCG), kvm or tcg. Also $QUIESCE_ACCEL.
    #[arg(long, global = true, value_parser = clap::value_parser!(AccelChoice))]
    accel: Option<AccelChoice>,
    /// Behave as on an older QEMU: use only what that release had (such as 8.2, Ubuntu
    /// 24.04's). Also $QUIESCE_QEMU_COMPAT.
    #[arg(long, global = true, value_name = "MAJOR.MINOR")]
    qemu_compat: Option<QemuRelease>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check QEMU, the accelerator, the capabilities that matter, and the image cache.
    Doctor {
        /// Do not build the guest image if it is missing (the KVM probe needs its kernel).
        #[arg(long)]
        no_build: bool,
        /// The report folder whose work folder is checked for runs left by a killed quiesce
        /// (found ones are removed).
        #[arg(long, default_value = "quiesce-reports")]
        report_dir: std::path::PathBuf,
    },
    /// Work with a single test VM.
    Vm {
        #[command(subcommand)]
        command: vm::VmCommand,
    },
    /// Run scenario files (a file, or every *.toml in a folder).
    Run {
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
        /// Where reports, evidence of failures and (with --keep-backups) backups go.
        #[arg(long, default_value = "quiesce-reports")]
        report_dir: std::path::PathBuf,
        /// Keep each scenario's backup in the report folder.
        #[arg(long)]
        keep_backups: bool,
        /// Run only the K-th of N shares of the scenarios (for a CI matrix of N jobs); the
        /// shares are balanced by the durations recorded in durations.txt beside them.
        #[arg(long, value_name = "K/N")]
        shard: Option<quiesce::scenario::shard::Shard>,
        /// Also write a JUnit XML report here: one test case per scenario.
        #[arg(long, value_name = "FILE")]
        junit: Option<std::path::PathBuf>,
        /// Run N scenarios at a time (longest first); by default, what the machine can take:
        /// one per core, as many as its available memory holds. The summary, the page and
        /// the JUnit file keep the order of the files.
        #[arg(short = 'j', long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: Option<u16>,
    },
    /// Rebuild the page (index.html) of a report folder from its JSON reports.
    Report {
        /// The report folder (quiesce-reports by default).
        #[arg(default_value = "quiesce-reports")]
        dir: std::path::PathBuf,
        /// Also write a JUnit XML report here.
        #[arg(long, value_name = "FILE")]
        junit: Option<std::path::PathBuf>,
    },
    /// Record how long each scenario took, from a run's JSON reports, for `run --shard`.
    Durations {
        /// The report folder of a run (its NAME.json files).
        report_dir: std::path::PathBuf,
        /// Merge them into this durations file (scenarios/durations.txt) instead of printing.
        #[arg(long)]
        write: Option<std::path::PathBuf>,
    },
    /// Re-check a backup's files against the checksums in its manifest.
    Verify { backup: std::path::PathBuf },
    /// Compare the files of two disk images, or of every disk of two backups (ext4, NTFS).
    Diff {
        /// A disk image (qcow2, raw, vpc, vhdx; format probed) or a backup folder.
        a: std::path::PathBuf,
        /// The same kind of thing to compare A with.
        b: std::path::PathBuf,
        /// Leave out paths: a prefix (/var/log) or a pattern with * and ? (/home/*/.cache). Repeatable.
        #[arg(long = "ignore", value_name = "PATTERN")]
        ignore: Vec<String>,
        /// Also compare each pair of disks block by block and print the first differing offset.
        #[arg(long)]
        blocks: bool,
    },
    /// Back up VMs quiesce did not start, by their QMP (and agent) sockets. Several --qmp
    /// are one set, all or nothing. The VMs are left as they were on every path.
    Backup(backup::BackupArgs),
    /// Undo what a `quiesce backup --qmp` or `--libvirt` killed mid-backup left in a VM (its recovery
    /// journal), and nothing else; `quiesce backup` does the same before it backs up.
    Recover(backup::recover::RecoverArgs),
    /// Restore a VM of a backup into a new QEMU (the backup is only read), run checks on
    /// it, then shut it down or, with --keep-running, leave it running.
    Restore(restore::RestoreArgs),
    /// Build or locate guest images.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
}

/// Exit codes: 0 ok, 1 failed, 2 bad usage (clap), 130 interrupted.
pub const EXIT_FAILED: i32 = 1;
/// A command given arguments that do not go together (clap's own code for bad usage).
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_INTERRUPTED: i32 = 130;

/// An interruption that SIGINT and SIGTERM fire, and the task that waits for them (abort it
/// when the work is done, so that a later signal kills the process as usual).
fn interrupt_on_signals() -> (Interrupt, tokio::task::JoinHandle<()>) {
    let interrupt = Interrupt::new();
    let fire = interrupt.clone();
    let signals = tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        fire.trigger();
    });
    (interrupt, signals)
}

pub async fn run(cli: Cli) -> i32 {
    // The profile is fixed for the process before anything probes QEMU; a bad
    // $QUIESCE_QEMU_COMPAT stops here, not in the middle of a run.
    if cli.qemu_compat.is_some() {
        compat::choose(cli.qemu_compat);
    }
    if let Err(e) = compat::profile() {
        eprintln!("quiesce: error: {e}");
        return EXIT_FAILED;
    }
    let result = match cli.command {
        Command::Doctor { no_build, report_dir } => doctor::run(cli.accel, no_build, &report_dir).await,
        Command::Vm { command } => vm::run(command, cli.accel).await,
        Command::Image { command } => image::run(command, cli.accel).await,
        Command::Run { paths, report_dir, keep_backups, shard, junit, jobs } => {
            run::run(paths, report_dir, keep_backups, shard, junit, cli.accel, jobs.map(usize::from)).await
        }
        Command::Report { dir, junit } => report::run(dir, junit),
        Command::Durations { report_dir, write } => durations::run(report_dir, write),
        Command::Verify { backup } => run::verify(backup).await,
        Command::Diff { a, b, ignore, blocks } => diff::run(a, b, ignore, blocks).await,
        Command::Backup(args) => backup::run(args).await,
        Command::Recover(args) => backup::recover::run(args).await,
        Command::Restore(args) => restore::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("quiesce: error: {e}");
            let mut source = std::error::Error::source(&*e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            EXIT_FAILED
        }
    }
}

pub type CliResult = Result<i32, Box<dyn std::error::Error>>;
