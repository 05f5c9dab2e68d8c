//! `quiesce backup --libvirt DOMAIN [--connect URI]`: a libvirt domain backed up through
//! libvirt ([`quiesce::backup::libvirt`]), printed as a backup by sockets is.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use quiesce::backup::libvirt::{self, LibvirtBackup, LibvirtError};
use quiesce::interrupt::Interrupt;
use quiesce::timeline::Timeline;

use super::{print_new_steps, print_steps, verdict_line, BackupArgs};
use crate::cli::{CliResult, EXIT_FAILED, EXIT_INTERRUPTED};

pub async fn run(args: &BackupArgs, domain: &str, interrupt: &Interrupt) -> CliResult {
    let opts = LibvirtBackup {
        domain: domain.to_owned(),
        connect: args.connect.clone(),
        method: args.method.into(),
        snapshot_dir: args.snapshot_dir.clone(),
    };
    let tl = Timeline::new();
    let shown = Arc::new(AtomicUsize::new(0));
    let printer = tokio::spawn(print_steps(tl.clone(), shown.clone()));
    let outcome = libvirt::run(&opts, &args.out, &tl, interrupt).await;
    printer.abort();
    print_new_steps(&tl, &shown);
    let vm = &outcome.vm;
    if !outcome.disks.is_empty() {
        let disks: Vec<String> = outcome
            .disks
            .iter()
            .map(|d| format!("{} ({}, {})", d.target, d.format.driver(), d.path.display()))
            .collect();
        println!("VM {vm} (libvirt domain {domain}): {}", disks.join(", "));
    }
    if !outcome.verdicts.is_empty() {
        println!("VM {vm}: conditions for Child VM Snapshot:");
        for v in &outcome.verdicts {
            println!("  {}", verdict_line(v));
        }
    }
    Ok(match outcome.result {
        Ok(done) => {
            println!("VM {vm}: method child-snapshot ({})", done.method_reason);
            println!("backup: {}", done.backup.display());
            0
        }
        Err(e @ LibvirtError::Interrupted { .. }) => {
            eprintln!("quiesce: {e}");
            EXIT_INTERRUPTED
        }
        Err(e) => {
            eprintln!("quiesce: {e}");
            EXIT_FAILED
        }
    })
}
