//! `quiesce restore BACKUP [--connect URI]` of a libvirt domain's Saved State backup: the
//! state loads only into the devices libvirt builds for the domain, so libvirt restores it
//! ([`quiesce::backup::libvirt::restore`]) as a new transient domain, paused, on overlays
//! over the backup; the checks are those of any restore, through the QMP monitor and agent
//! socket the restore gave it. The domain is shut down (or destroyed) at the end.

use quiesce::backup::libvirt::restore as lv;
use quiesce::backup::Backup;
use quiesce::sys::deadline;
use quiesce::verify::restore;

use super::{disk_checks, CheckArg};
use crate::cli::{CliResult, EXIT_FAILED, EXIT_INTERRUPTED};

pub async fn run(
    backup: &Backup,
    vm: &str,
    checks: &[CheckArg],
    keep_running: bool,
    connect: Option<String>,
) -> CliResult {
    let work = async {
        let r = lv::restore(backup, vm, connect).await?;
        println!(
            "VM {vm}: restored from {} (saved-state) through libvirt, as the transient domain {} ({:.0} ms)",
            backup.path.display(),
            r.guard.name,
            r.restore_ms
        );
        let mut failed = disk_checks(backup, vm, &r.disks, checks).await?;
        restore::resume(&r.machine).await?;
        if checks.contains(&CheckArg::Guest) {
            r.guard.wait_agent(deadline::AGENT_AFTER_RESUME).await?;
            let (frozen, mounts) = r.guard.guest_state().await?;
            let (ok, detail) = quiesce::verify::guest::judge_restored(&frozen, &mounts);
            let detail = format!("agent answers (through libvirt); {detail}");
            println!("check guest   {} {detail}", if ok { "passed" } else { "FAILED" });
            failed += usize::from(!ok);
        }
        Ok::<_, Box<dyn std::error::Error>>((r, failed))
    };
    let (r, failed) = tokio::select! {
        r = work => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("quiesce: interrupted; the restored domain was destroyed and its overlays removed (the backup is untouched)");
            return Ok(EXIT_INTERRUPTED);
        }
    };
    if keep_running {
        println!(
            "libvirt domain {} is running (transient: nothing was defined). quiesce's QMP socket to it: {}",
            r.guard.name,
            r.qmp_socket.display()
        );
        println!("press Ctrl-C to destroy it (its overlays are removed; the backup is untouched)");
        let _ = tokio::signal::ctrl_c().await;
        return Ok(if failed == 0 { 0 } else { EXIT_FAILED });
    }
    if let Err(e) = r.shut_down(deadline::GUEST_SHUTDOWN).await {
        eprintln!("quiesce: the restored domain did not power off ({e}); it was destroyed instead");
    }
    Ok(if failed == 0 { 0 } else { EXIT_FAILED })
}
