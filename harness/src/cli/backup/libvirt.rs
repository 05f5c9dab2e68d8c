//! `quiesce backup --libvirt DOMAIN... [--connect URI]`: libvirt domains backed up through
//! libvirt ([`quiesce::backup::libvirt`]) as one set, printed as a backup by sockets is;
//! first, the recovery journal a killed quiesce left for each domain is replayed. Also
//! `quiesce recover --libvirt` (that replay alone) and the journals' lines of `quiesce
//! doctor`.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use quiesce::backup::libvirt::journal::{self, Found, Stale, Status};
use quiesce::backup::libvirt::virsh::Virsh;
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
    for (domain, found) in &outcome.recovered {
        if !matches!(found, Found::Nothing) {
            println!("libvirt domain {domain}: {found}");
        }
    }
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

/// `quiesce recover --libvirt DOMAIN... [--connect URI]`: replays each domain's recovery
/// journal (what a killed `quiesce backup --libvirt` left), and nothing else.
pub async fn recover(domains: &[String], connect: Option<String>) -> CliResult {
    let virsh = Virsh::new(connect)?;
    let tl = Timeline::new();
    for domain in domains {
        let found = journal::replay(&virsh, domain, &tl).await?;
        match found {
            Found::Nothing => println!("libvirt domain {domain}: no recovery journal: nothing to undo"),
            found => println!("libvirt domain {domain}: {found}"),
        }
    }
    Ok(0)
}

/// `quiesce doctor`'s lines on the libvirt domains' journals, libvirt asked (read only:
/// nothing is undone or removed here); false if one names a domain still on its overlays.
pub async fn print_journals() -> bool {
    let (dir, journals) = match journal::list() {
        Ok(found) => found,
        Err(e) => {
            println!("libvirt       {e}");
            return true;
        }
    };
    if journals.is_empty() {
        println!("journals      no libvirt journal in {}", dir.display());
    }
    let mut ok = true;
    for (path, r) in journals {
        let rec = match r {
            Ok(r) => r,
            Err(e) => {
                println!("journal       {e}");
                continue;
            }
        };
        let dom = format!("libvirt domain {} ({} on {})", rec.domain.name, rec.domain.uuid, rec.domain.uri);
        let run = format!("`quiesce recover --libvirt {} --connect {}`", rec.domain.uuid, rec.domain.uri);
        let (file, left) = (path.display(), rec.leftovers());
        match journal::status(&rec).await {
            Status::Live { on_overlays } => {
                ok = false;
                let on = if on_overlays.is_empty() { "none".to_owned() } else { on_overlays.join(", ") };
                println!("journal       {dom}: live, left by a killed quiesce (pid {}): {left}", rec.writer_pid);
                println!(
                    "              disks still on its overlays: {on}; {run} (or the next backup) undoes it ({file})"
                );
            }
            Status::Stale(why) => {
                let why = match why {
                    Stale::DomainGone => "libvirt knows the domain no more",
                    Stale::NothingLeft => "the domain shows none of it",
                };
                println!("journal       {dom}: stale, {why} (it named: {left})");
                println!("              {run} removes it, touching nothing ({file})");
            }
            Status::Unknown(e) => {
                ok = false;
                println!("journal       {dom}: left by a killed quiesce (pid {}): {left}", rec.writer_pid);
                println!("              libvirt could not be asked whether it still shows it: {e} ({file})");
            }
        }
    }
    ok
}
