//! The `quiesce` command line.

mod doctor;
mod image;
mod progress;
mod vm;

use clap::{Parser, Subcommand};
use quiesce::qemu::accel::AccelChoice;

#[derive(Parser)]
#[command(name = "quiesce", version, about = "Reproduce VM backup scenarios on QEMU and prove the restore is right")]
pub struct Cli {
    /// Accelerator: auto (probe KVM, else TCG), kvm or tcg. Also $QUIESCE_ACCEL.
    #[arg(long, global = true, value_parser = clap::value_parser!(AccelChoice))]
    accel: Option<AccelChoice>,
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
    },
    /// Work with a single test VM.
    Vm {
        #[command(subcommand)]
        command: vm::VmCommand,
    },
    /// Build or locate guest images.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
}

/// Exit codes: 0 ok, 1 failed, 2 bad usage (clap), 130 interrupted.
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INTERRUPTED: i32 = 130;

pub async fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Doctor { no_build } => doctor::run(cli.accel, no_build).await,
        Command::Vm { command } => vm::run(command, cli.accel).await,
        Command::Image { command } => image::run(command).await,
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
