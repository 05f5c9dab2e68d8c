//! `quiesce backup --libvirt DOMAIN... [--connect URI]`: libvirt domains backed up through
//! libvirt ([`quiesce::backup::libvirt`]) as one set, printed as a backup by sockets is.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use quiesce::backup::libvirt::{self, LibvirtBackup, LibvirtError};
use quiesce::interrupt::Interrupt;
use quiesce::timeline::Timeline;

use super::{print_new_steps, print_steps, verdict_line, BackupArgs};
use crate::cli::{CliResult, EXIT_FAILED, EXIT_INTERRUPTED};

pub async fn run(args: &BackupArgs, interrupt: &Interrupt) -> CliResult {
    let opts = LibvirtBackup {
        domains: args.libvirt.clone(),
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
    for s in &outcome.seen {
        let vm = &s.vm;
        let disks: Vec<String> =
            s.disks.iter().map(|d| format!("{} ({}, {})", d.target, d.format.driver(), d.path.display())).collect();
        println!("VM {vm} (libvirt domain {}): {}", s.domain, disks.join(", "));
        println!("VM {vm}: conditions for Child VM Snapshot:");
        for v in &s.verdicts {
            println!("  {}", verdict_line(v));
        }
        if let Some((method, reason)) = &s.method {
            println!("VM {vm}: method {} ({reason})", method.as_str());
        }
    }
    Ok(match outcome.result {
        Ok(path) => {
            println!("backup: {}", path.display());
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
