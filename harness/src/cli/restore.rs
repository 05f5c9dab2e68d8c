//! `quiesce restore BACKUP`: restores one VM of a backup (a scenario's, or one `quiesce
//! backup` made of a person's own VM) into a new QEMU. The backup is opened read-only: each
//! restored disk is an overlay of the restore's own over the backup's image. The chosen
//! checks run, then the VM is shut down, or with `--keep-running` left running with its
//! console and QMP socket printed.

use std::path::PathBuf;

use quiesce::backup::manifest::{Entry, Method};
use quiesce::backup::recovery::RecoveryError;
use quiesce::backup::Backup;
use quiesce::image::manifest::{self, Limits};
use quiesce::qemu::DiskFormat;
use quiesce::sys::deadline;
use quiesce::timeline::Timeline;
use quiesce::verify::restore::{self, RestoreOptions};
use quiesce::verify::{blockcmp, rollback_attached};

use super::{CliResult, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE};

mod libvirt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckArg {
    /// Each restored disk reads the same, block for block, as the backup's image.
    Blocks,
    /// Each restored disk's files (ext4, NTFS) are the backup's, path for path.
    Files,
    /// The guest comes up from the backup: its agent answers, its filesystems are thawed
    /// and its root filesystem is mounted read-write.
    Guest,
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The backup folder (from `quiesce backup` or a scenario's --keep-backups).
    backup: PathBuf,
    /// The VM to restore; needed only when the backup holds several.
    #[arg(long)]
    vm: Option<String>,
    /// A check to run on the restored VM; repeatable.
    #[arg(long = "check", value_enum)]
    check: Vec<CheckArg>,
    /// Leave the restored VM running (its QMP socket and console are printed) until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Roll a running VM quiesce did not start back to the backup, onto its own disks,
    /// through its QMP socket (--qmp): paused, disks written, reset. Refused unless its
    /// disks match the backup's in number, format and size. Journaled: one killed (or
    /// failed) mid-write leaves the VM paused, and `quiesce recover --qmp` finishes it.
    #[arg(long, requires = "qmp")]
    in_place: bool,
    /// The QMP socket of the VM to roll back (with --in-place).
    #[arg(long, value_name = "SOCKET", requires = "in_place")]
    qmp: Option<PathBuf>,
    /// For a libvirt domain's Saved State backup, restored through libvirt: libvirt's
    /// connection URI (virsh -c); virsh's default if not given.
    #[arg(long, value_name = "URI", conflicts_with = "in_place")]
    connect: Option<String>,
}

pub async fn run(args: RestoreArgs) -> CliResult {
    // Absolute: the restore's overlays name the backup's images as their backing files.
    let path = std::fs::canonicalize(&args.backup).map_err(|e| format!("{}: {e}", args.backup.display()))?;
    let backup = Backup::open(&path)?;
    let bad = tokio::task::block_in_place(|| backup.verify())?;
    if !bad.is_empty() {
        for m in &bad {
            eprintln!("quiesce: {} does not match its checksum in the manifest", m.file.display());
        }
        return Ok(EXIT_FAILED);
    }
    let names: Vec<&str> = backup.manifest.vms.iter().map(|v| v.name.as_str()).collect();
    let vm = match (&args.vm, names.as_slice()) {
        (Some(v), _) => v.clone(),
        (None, [only]) => only.to_string(),
        (None, _) => {
            eprintln!("quiesce: the backup holds VMs {names:?}: say which with --vm");
            return Ok(EXIT_USAGE);
        }
    };
    let Some(vb) = backup.vm(&vm) else {
        eprintln!("quiesce: the backup holds no VM {vm} (it holds {names:?})");
        return Ok(EXIT_USAGE);
    };
    if let Some(qmp) = &args.qmp {
        return in_place(&backup, &vm, qmp, &args.check).await;
    }
    if quiesce::backup::libvirt::restore::is_libvirt_saved_state(vb) {
        return libvirt::run(&backup, &vm, &args.check, args.keep_running, args.connect.clone()).await;
    }
    let tl = Timeline::new();
    let mut opts = RestoreOptions::named(&format!("{vm}-restored"));
    // Stopped before its first instruction (or with its state loaded), so the disks are
    // checked before the guest writes to them.
    opts.resume = false;
    let work = async {
        let mut restored = match vb.method {
            Method::SavedState => restore::saved_state(&backup, &vm, &opts, &tl).await?,
            Method::ChildSnapshot => restore::boot(&backup, &vm, &opts, &tl).await?,
        };
        println!("VM {vm}: restored from {} ({})", backup.path.display(), vb.method.as_str());
        let mut failed = disk_checks(&backup, &vm, &restored.disks, &args.check).await?;
        // The guest runs now: booted afresh, or resumed from its saved state.
        restore::resume(&restored.machine).await?;
        if vb.method == Method::ChildSnapshot || args.check.contains(&CheckArg::Guest) {
            if let Err(e) = restored.machine.wait_agent(deadline::boot_to_agent()).await {
                // Its serial log and transcript are kept when the machine is dropped.
                restored.machine.mark_failed("the restored guest's agent did not answer");
                return Err(e.into());
            }
        }
        if args.check.contains(&CheckArg::Guest) {
            let (ok, detail) = match guest(&restored.machine).await {
                Ok(r) => r,
                Err(e) => {
                    restored.machine.mark_failed("the guest check could not run");
                    return Err(e);
                }
            };
            println!("check guest   {} {detail}", if ok { "passed" } else { "FAILED" });
            failed += usize::from(!ok);
        }
        Ok::<_, Box<dyn std::error::Error>>((restored, failed))
    };
    let (mut restored, failed) = tokio::select! {
        r = work => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("quiesce: interrupted; the restored VM was stopped and its overlays removed (the backup is untouched)");
            return Ok(EXIT_INTERRUPTED);
        }
    };
    if args.keep_running {
        let m = &restored.machine;
        println!(
            "VM {} is running (pid {}). Its QMP socket: {}",
            m.name(),
            m.pid(),
            m.run_dir().join("qmp.sock").display()
        );
        println!("its serial console is logged to {}", m.serial().path().display());
        println!("press Ctrl-C to stop it (its overlays are removed; the backup is untouched)");
        let _ = tokio::signal::ctrl_c().await;
    } else if restored.machine.agent().is_ok() {
        if let Err(e) = restored.machine.shutdown(deadline::GUEST_SHUTDOWN).await {
            eprintln!("quiesce: the restored guest did not power off ({e}); it is stopped instead");
        }
    }
    Ok(if failed == 0 { 0 } else { EXIT_FAILED })
}

/// The backup's image of disk `node` of `vm`, and its format.
/// The checks of `checks` that read the restored disks (`blocks`, `files`), each printed
/// with its verdict; returns how many failed. Run before the guest runs, so the disks are
/// as the backup left them. `guest` is left to the caller.
pub(super) async fn disk_checks(
    backup: &Backup,
    vm: &str,
    disks: &[(String, PathBuf)],
    checks: &[CheckArg],
) -> Result<usize, Box<dyn std::error::Error>> {
    let mut failed = 0;
    for check in checks {
        let (ok, detail) = match check {
            CheckArg::Blocks => blocks(backup, vm, disks).await?,
            CheckArg::Files => files(backup, vm, disks).await?,
            CheckArg::Guest => continue,
        };
        println!("check {:<7} {} {detail}", format!("{check:?}").to_lowercase(), if ok { "passed" } else { "FAILED" });
        failed += usize::from(!ok);
    }
    Ok(failed)
}

fn backed_up(backup: &Backup, vm: &str, node: &str) -> Result<(PathBuf, DiskFormat), Box<dyn std::error::Error>> {
    let vb = backup.vm(vm).ok_or("no such VM")?;
    let d = vb.disks.iter().find(|d| d.node_name == node).ok_or("no such disk")?;
    Ok((backup.file_path(vm, &Entry::Disk(d.node_name.clone()), &d.file)?, d.format))
}

async fn blocks(
    backup: &Backup,
    vm: &str,
    disks: &[(String, PathBuf)],
) -> Result<(bool, String), Box<dyn std::error::Error>> {
    let mut parts = Vec::new();
    let mut ok = true;
    for (node, overlay) in disks {
        let (image, fmt) = backed_up(backup, vm, node)?;
        let overlay = overlay.clone();
        let c =
            tokio::task::spawn_blocking(move || blockcmp::compare(&overlay, DiskFormat::Qcow2, &image, fmt)).await??;
        ok &= c.identical;
        parts.push(match c.first_difference {
            None if c.identical => format!("{node}: identical ({} bytes compared)", c.bytes_compared),
            Some(at) => format!("{node}: differs first at byte {at}"),
            None => format!("{node}: sizes differ ({} and {})", c.size.0, c.size.1),
        });
    }
    Ok((ok, parts.join("; ")))
}

async fn files(
    backup: &Backup,
    vm: &str,
    disks: &[(String, PathBuf)],
) -> Result<(bool, String), Box<dyn std::error::Error>> {
    let mut parts = Vec::new();
    let mut ok = true;
    for (node, overlay) in disks {
        let (image, fmt) = backed_up(backup, vm, node)?;
        let read = |p: PathBuf, f: DiskFormat| {
            tokio::task::spawn_blocking(move || manifest::read_image(&p, f, &Limits::default()))
        };
        let (a, b) = (read(overlay.clone(), DiskFormat::Qcow2).await??, read(image, fmt).await??);
        let changes = manifest::diff(&b, &a, &[]);
        let entries: usize = a.filesystems.iter().map(|f| f.entries.len()).sum();
        ok &= changes.is_empty();
        parts.push(if changes.is_empty() {
            format!("{node}: {entries} entries in {} filesystems, all as in the backup", a.filesystems.len())
        } else {
            let first: Vec<String> = changes.iter().take(5).map(ToString::to_string).collect();
            format!("{node}: {} paths differ from the backup: {}", changes.len(), first.join(", "))
        });
    }
    Ok((ok, parts.join("; ")))
}

async fn guest(m: &quiesce::qemu::Machine) -> Result<(bool, String), Box<dyn std::error::Error>> {
    let agent = m.agent()?;
    agent.wait_ready(deadline::AGENT_AFTER_RESUME).await?;
    let frozen = agent.execute_raw("guest-fsfreeze-status", serde_json::Value::Null, deadline::AGENT_COMMAND).await?;
    let out =
        quiesce::qemu::exec::run(agent, &["/bin/sh", "-c", "sync && cat /proc/mounts"], deadline::guest_exec()).await?;
    let (ok, detail) = quiesce::verify::guest::judge_restored(&frozen, &out.stdout);
    Ok((ok, format!("agent answers; {detail}")))
}

/// `--in-place --qmp SOCKET`: the VM behind the socket rolled back to the backup.
async fn in_place(backup: &Backup, vm: &str, qmp: &std::path::Path, checks: &[CheckArg]) -> CliResult {
    if let Some(c) = checks.iter().find(|c| **c != CheckArg::Blocks) {
        eprintln!("quiesce: --in-place runs --check blocks only ({c:?} needs a restore into a new QEMU)");
        return Ok(EXIT_USAGE);
    }
    let opts = quiesce::qemu::AttachOptions::new(qmp.to_owned(), None);
    let m = quiesce::qemu::attach(&opts).await?;
    // First, what a killed quiesce left in this VM is undone, as a backup does. An in-place
    // restore it cannot finish (its backup gone) is taken over: this one writes every disk,
    // and puts back the run state from before that one paused the VM.
    let (m, prior) = match super::backup::recover::leftovers(m, &opts).await {
        Ok(m) => (m, None),
        Err(e) => match e.downcast::<RecoveryError>().map(|e| *e) {
            Ok(RecoveryError::InPlaceUnfinished { vm, restore, before, .. }) => {
                eprintln!(
                    "quiesce: VM {vm}: an in-place restore from {} a killed quiesce left cannot be finished; this restore takes it over (it writes every disk)",
                    restore.backup.display()
                );
                (quiesce::qemu::attach(&opts).await?, Some(before))
            }
            Ok(other) => return Err(other.into()),
            Err(e) => return Err(e),
        },
    };
    // Not raced against Ctrl-C: a rollback stopped half-way would leave the disks mixed.
    let done = rollback_attached::roll_back(backup, vm, &m, qmp, !checks.is_empty(), prior.as_ref()).await?;
    for (name, path) in &done.disks {
        println!("disk {name} of the backup written onto {}", path.display());
    }
    let mut ok = true;
    for (name, identical, at) in &done.blocks {
        ok &= identical;
        let how = match (identical, at) {
            (true, _) => "identical to the backup".to_owned(),
            (false, Some(at)) => format!("differs from the backup first at byte {at}"),
            (false, None) => "differs from the backup in size".to_owned(),
        };
        println!("check blocks  {} {name}: {how}", if *identical { "passed" } else { "FAILED" });
    }
    if done.state_not_loaded {
        println!("the backup's saved RAM was not loaded: QEMU loads a saved state only when it starts (-incoming); the guest was reset and boots from the restored disks");
    }
    println!("VM {} was reset and {}", m.name(), if done.was_running { "runs again" } else { "stays paused" });
    Ok(if ok { 0 } else { EXIT_FAILED })
}
