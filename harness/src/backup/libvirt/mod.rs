//! Backing up a libvirt domain (`quiesce backup --libvirt DOMAIN`): a VM whose QEMU libvirt
//! started and whose monitor libvirt owns. The six conditions are checked and the backup
//! folder is the one a scenario writes (verify, diff and restore work on it), but every
//! change to the domain goes through libvirt's own APIs, by `virsh`:
//!
//! - the disks, their formats and the machine come from the live XML (`virsh dumpxml`,
//!   [`domain`]); the guest-side conditions from the agent (`virsh qemu-agent-command`,
//!   questions only: `guest-info`, `guest-get-fsinfo`, `guest-get-disks`, `guest-get-osinfo`);
//! - Child VM Snapshot is libvirt's external disk-only snapshot with the agent's freeze
//!   (`virsh snapshot-create-as --disk-only --quiesce --atomic --no-metadata`, overlays in the
//!   snapshot folder), a copy of the images under the overlays, then `virsh blockcommit
//!   --active --shallow --pivot` per disk and the overlays deleted.
//!
//! Why libvirt's APIs and not QMP passed through it (`virsh qemu-monitor-command`), measured
//! on libvirt 9.0 with QEMU 10.0 under TCG (README, "Back up a libvirt domain", and the
//! figures below): the methods
//! change the block graph, and libvirt tracks that graph itself. Overlays added behind its
//! back are missing from its XML (so a later `virsh snapshot`, `blockcommit` or migration
//! acts on a chain that is not there), libvirt marks the domain tainted
//! (`custom-monitor`) for the rest of its life, and the files QEMU must open get no
//! security labels, so a confined QEMU cannot open them. libvirt's snapshot does the same
//! freeze, overlay and thaw in one call with its labels, its XML and its own clean-up when it
//! fails (`--atomic`), and `--no-metadata` leaves no snapshot behind in its records. Each
//! virsh call costs a process and a connection (tens of ms), which only matters for a
//! many-step protocol over QMP, not for the few calls made here. The `virt` crate would save
//! that process but needs libvirt's C library to build, and quiesce must build where
//! libvirt is absent; virsh also gives each call a deadline for free.
//!
//! Saved State is not offered for a domain: a state libvirt saves (`virsh save`) loads only
//! into the devices libvirt builds for that domain (its PCIe root ports, controllers and
//! their order), which `quiesce restore` does not rebuild, so the backup could not be
//! restored. It is refused with that reason, touching nothing.
//!
//! The domain is left as it was on every path: after the snapshot, the put-back reads the
//! live XML (not what was asked: a virsh past its deadline may have left libvirt to finish
//! alone) and commits each disk still on its overlay; after a failure the agent is thawed
//! (`virsh domfsthaw`, harmless on a thawed guest). SIGINT is acted on between steps: the
//! step under way (a libvirt call, or the copy of the disks) finishes (virsh and qemu-img
//! run in process groups of their own, so a Ctrl-C at the terminal does not cut them
//! half-way), then the domain is put back. quiesce never destroys, undefines, saves or
//! reconfigures the domain.
//!
//! The measurements (README): a virsh call costs 77-134 ms here (a process and a
//! connection), QMP on a socket under 1 ms; `qemu-monitor-command` taints the domain
//! (`custom-monitor`) and a `blockdev-add` through it is missing from the XML afterwards;
//! block job events do arrive through `qemu-monitor-event`; libvirt's quiesced disk-only
//! snapshot took 1.3 s and its active commit 0.15 s on an idle guest under TCG.

pub mod domain;
pub mod virsh;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use self::domain::{Domain, DomainDisk, DomainXmlError};
use self::virsh::{Virsh, VirshError};
use super::conditions::{self, Condition, Finding, Verdict};
use super::job::MethodChoice;
use super::manifest::{DiskEntry, Method, Timings, VmBackup};
use super::{BackupError, BackupWriter, Faults};
use crate::interrupt::Interrupt;
use crate::qemu::{DiskConfig, MachineConfig};
use crate::timeline::Timeline;

/// `virsh snapshot-create-as --quiesce`: the agent's freeze (seconds under TCG with a busy
/// guest), the overlays made and the thaw.
const SNAPSHOT: Duration = Duration::from_secs(120);
/// `virsh blockcommit --wait` of one overlay: what the guest wrote during the copy.
const COMMIT: Duration = Duration::from_secs(600);

/// Why a libvirt domain was not backed up. In every case the domain was put back as it was,
/// unless the error says otherwise ([`LibvirtError::NotPutBack`]).
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// virsh failed or timed out; libvirt's own words follow.
    #[error(transparent)]
    Virsh(#[from] VirshError),
    /// The domain's XML cannot be used (a disk quiesce cannot copy, a malformed answer).
    /// Nothing was touched.
    #[error("libvirt domain {domain}: {source}")]
    Domain { domain: String, source: DomainXmlError },
    /// Child VM Snapshot needs all six conditions and one failed; nothing was touched.
    #[error("libvirt domain {domain}: Child VM Snapshot needs all six conditions, but: {reasons}")]
    Refused { domain: String, reasons: String },
    /// Saved State was asked for a libvirt domain (see the module notes); nothing was
    /// touched.
    #[error("libvirt domain {domain}: Saved State is not offered for a libvirt domain: a state libvirt saves loads only into the devices libvirt builds for it, which `quiesce restore` does not rebuild; use --method child-snapshot (or `virsh save` yourself)")]
    SavedStateUnsupported { domain: String },
    /// An overlay file of this run's name exists already in the snapshot folder (another
    /// quiesce backup of the domain under way, or one killed): remove it or give
    /// --snapshot-dir. Nothing was touched.
    #[error("libvirt domain {domain}: {0} exists already; is another backup of it under way?", .path.display())]
    OverlayExists { domain: String, path: PathBuf },
    /// Copying or writing the backup failed; the domain was put back.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// SIGINT or SIGTERM: the domain was put back and no backup was left.
    #[error("libvirt domain {domain}: interrupted; the domain was put back as it was and no backup was written")]
    Interrupted { domain: String },
    /// The backup failed, and putting the domain back failed too: it may still run on an
    /// overlay (named here) and needs a person: `virsh blockcommit DOMAIN DISK --active
    /// --shallow --pivot`, then delete the overlay.
    #[error("libvirt domain {domain}: {error}\n  and putting it back failed: {put_back}")]
    NotPutBack { domain: String, error: String, put_back: String },
}

/// What to back up, and how.
#[derive(Debug, Clone)]
pub struct LibvirtBackup {
    pub domain: String,
    /// libvirt's connection URI (`virsh -c`); virsh's default when None.
    pub connect: Option<String>,
    pub method: MethodChoice,
    /// Where the overlays go while the backup runs; by default the first disk's folder.
    pub snapshot_dir: Option<PathBuf>,
}

/// A backup that was made.
#[derive(Debug, Clone)]
pub struct Done {
    pub backup: PathBuf,
    pub method_reason: String,
}

/// What a run found and did: the verdicts (empty if it stopped before asking them) and
/// the result.
#[derive(Debug)]
pub struct Outcome {
    /// The domain's name in the backup.
    pub vm: String,
    pub disks: Vec<DomainDisk>,
    pub verdicts: Vec<Verdict>,
    pub result: Result<Done, LibvirtError>,
}

/// Backs up one libvirt domain into `out` (a folder that must not exist).
pub async fn run(opts: &LibvirtBackup, out: &Path, tl: &Timeline, interrupt: &Interrupt) -> Outcome {
    let mut outcome = Outcome { vm: opts.domain.clone(), disks: vec![], verdicts: vec![], result: Ok(placeholder()) };
    outcome.result = backup(opts, out, tl, interrupt, &mut outcome).await;
    outcome
}

fn placeholder() -> Done {
    Done { backup: PathBuf::new(), method_reason: String::new() }
}

async fn backup(
    opts: &LibvirtBackup,
    out: &Path,
    tl: &Timeline,
    interrupt: &Interrupt,
    seen: &mut Outcome,
) -> Result<Done, LibvirtError> {
    let name = opts.domain.as_str();
    let virsh = Virsh::new(opts.connect.clone())?;
    let xml = tl.step(Some(name), "read the domain XML", virsh.run(&["dumpxml", name], virsh::COMMAND)).await?;
    let dom = domain::parse(&xml).map_err(|source| LibvirtError::Domain { domain: name.to_owned(), source })?;
    let vm = crate::qemu::attach::node_safe(&dom.name);
    seen.vm = vm.clone();
    seen.disks = dom.disks.clone();
    let state = virsh.run(&["domstate", name], virsh::COMMAND).await?.trim().to_owned();
    let snapshot_dir = match &opts.snapshot_dir {
        Some(d) => d.clone(),
        None => dom.disks[0].path.parent().map(Path::to_owned).unwrap_or_else(|| PathBuf::from(".")),
    };
    let cfg = machine_config(&vm, &dom);
    seen.verdicts =
        tl.step(Some(&vm), "check the conditions", evaluate(&virsh, name, &dom, &state, &cfg, &snapshot_dir)).await?;
    if opts.method == MethodChoice::SavedState {
        return Err(LibvirtError::SavedStateUnsupported { domain: name.to_owned() });
    }
    if let Some(reasons) = conditions::failures(&seen.verdicts) {
        return Err(LibvirtError::Refused { domain: name.to_owned(), reasons });
    }
    if interrupt.is_triggered() {
        return Err(LibvirtError::Interrupted { domain: name.to_owned() });
    }
    let overlays: Vec<PathBuf> = dom
        .disks
        .iter()
        .map(|d| snapshot_dir.join(format!("{vm}-{}-quiesce-overlay-{}.qcow2", d.target, std::process::id())))
        .collect();
    if let Some(p) = overlays.iter().find(|p| p.exists()) {
        return Err(LibvirtError::OverlayExists { domain: name.to_owned(), path: p.clone() });
    }
    let version = qemu_version(&virsh).await;
    let mut writer = BackupWriter::create(out, &version).map_err(BackupError::from)?;
    let dir = writer.vm_dir(&vm).map_err(BackupError::from)?;
    let machine = super::job::machine_spec_of(&vm, &cfg, &dir)?;
    // From here the domain may be changed: every path below goes through the put-back.
    let started = Instant::now();
    let snap = tl.step(Some(&vm), "snapshot with the freeze (libvirt)", snapshot(&virsh, name, &dom, &overlays)).await;
    let freeze_window_ms = started.elapsed().as_secs_f64() * 1000.0;
    let copied = match snap {
        Err(e) => Err(LibvirtError::from(e)),
        Ok(()) if interrupt.is_triggered() => Err(LibvirtError::Interrupted { domain: name.to_owned() }),
        Ok(()) => {
            let disks: Vec<DiskConfig> = cfg.disks.clone();
            let copy = super::capture::copy_disks(&vm, disks, &dir, false, Faults::default());
            let t = Instant::now();
            tl.step(Some(&vm), "copy the disks", copy).await.map(|d| (d, t.elapsed())).map_err(LibvirtError::from)
        }
    };
    let merge_start = Instant::now();
    let put_back =
        tl.step(Some(&vm), "merge the overlays back (libvirt)", put_back(&virsh, name, &dom, &overlays)).await;
    let merge_ms = merge_start.elapsed().as_secs_f64() * 1000.0;
    let (mut disks, capture) = match (copied, put_back) {
        (Ok(c), Ok(())) => c,
        (Err(e), Ok(())) => {
            thaw_after_failure(&virsh, name).await;
            return Err(e);
        }
        (result, Err(pb)) => {
            thaw_after_failure(&virsh, name).await;
            let error = result.err().map_or_else(|| "the backup was made".to_owned(), |e| e.to_string());
            return Err(LibvirtError::NotPutBack { domain: name.to_owned(), error, put_back: pb.to_string() });
        }
    };
    if interrupt.is_triggered() {
        return Err(LibvirtError::Interrupted { domain: name.to_owned() });
    }
    tl.step(Some(&vm), "hash the backup files", hash(&vm, &dir, &mut disks)).await?;
    let method_reason = "all six conditions held (libvirt's disk-only snapshot with the agent's freeze)".to_owned();
    writer.add(VmBackup {
        name: vm.clone(),
        method: Method::ChildSnapshot,
        method_reason: method_reason.clone(),
        conditions: seen.verdicts.clone(),
        run_state_before: super::runstate::Activity::Running,
        machine,
        disks,
        state: None,
        excluded: vec![],
        timings: Timings {
            downtime_ms: None,
            save_ms: None,
            save_mb_per_s: None,
            capture_ms: capture.as_secs_f64() * 1000.0,
            // libvirt's freeze, overlays and thaw are one call: its length bounds the window.
            freeze_window_ms: Some(freeze_window_ms),
            freeze_host_ms: None,
            merge_ms: Some(merge_ms),
            merge_outcome: None,
        },
        freeze: None,
        files: vec![],
    });
    let backup = writer.commit().map_err(BackupError::from)?;
    Ok(Done { backup: backup.path, method_reason })
}

/// The machine as quiesce's own configuration describes one (for the conditions on the
/// host side and the backup's machine spec). Disks are named by their libvirt target.
fn machine_config(vm: &str, dom: &Domain) -> MachineConfig {
    let mut cfg = MachineConfig::new(vm, dom.accel, dom.boot.clone());
    cfg.qemu_binary = PathBuf::new();
    cfg.machine_type = dom.machine_type.clone();
    cfg.memory_mib = dom.memory_mib;
    cfg.cpus = dom.cpus;
    cfg.agent = dom.agent_channel;
    cfg.disks = dom
        .disks
        .iter()
        .map(|d| DiskConfig { node_name: d.target.clone(), path: d.path.clone(), format: d.format, read_only: false })
        .collect();
    cfg
}

/// QEMU's version as libvirt reports it (`Running hypervisor: QEMU 10.0.2`), for the
/// manifest; "unknown" if virsh will not say.
async fn qemu_version(virsh: &Virsh) -> String {
    let out = virsh.run(&["version"], virsh::COMMAND).await.unwrap_or_default();
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Running hypervisor:"))
        .and_then(|h| h.split_whitespace().last())
        .unwrap_or("unknown")
        .to_owned()
}

/// The six conditions on the domain, from libvirt (its state, its XML) and its agent.
async fn evaluate(
    virsh: &Virsh,
    domain: &str,
    dom: &Domain,
    state: &str,
    cfg: &MachineConfig,
    snapshot_dir: &Path,
) -> Result<Vec<Verdict>, LibvirtError> {
    let facts = if dom.agent_channel {
        guest_facts(virsh, domain).await
    } else {
        Err("the domain has no guest agent channel (org.qemu.guest_agent.0)".to_owned())
    };
    let unchecked = |why: &str| Finding::NotChecked(format!("not checked: {why}"));
    let agent = match &facts {
        Ok(f) => conditions::agent_can_freeze(&f.info),
        Err(e) => Finding::Failed(e.clone()),
    };
    let running = if state == "running" {
        Finding::Held("libvirt reports the domain running".into())
    } else {
        Finding::Failed(format!("libvirt reports the domain {state:?}"))
    };
    // A disk without a serial cannot be told from others in the guest: then every disk
    // the guest has counts as the domain's own (as for a QEMU attached by its sockets).
    let serials: Vec<&str> = dom.disks.iter().filter_map(|d| d.serial.as_deref()).collect();
    let all_have = serials.len() == dom.disks.len();
    let ours = |s: Option<&str>| !all_have || s.is_some_and(|s| serials.contains(&s));
    let basic = match (conditions::host_disks_basic(cfg), &facts) {
        (Finding::Held(host), Ok(f)) => match conditions::guest_disks_basic_where(&f.disks, ours) {
            Finding::Held(guest) => Finding::Held(format!("{host}; {guest}")),
            other => other,
        },
        (Finding::Held(_), Err(_)) => unchecked("the guest agent is not answering"),
        (host, _) => host,
    };
    let (filesystems, os) = match &facts {
        Ok(f) => {
            (conditions::filesystems_support_snapshots_where(&f.fsinfo, ours), conditions::os_supported(&f.osinfo))
        }
        Err(_) => (unchecked("the guest agent is not answering"), unchecked("the guest agent is not answering")),
    };
    Ok(vec![
        agent.verdict(Condition::AgentCanFreeze),
        running.verdict(Condition::VmRunning),
        conditions::same_volume(cfg, snapshot_dir).verdict(Condition::SnapshotOnSameVolume),
        basic.verdict(Condition::BasicDisksOnly),
        filesystems.verdict(Condition::FilesystemsSupportSnapshots),
        os.verdict(Condition::GuestOsSupported),
    ])
}

struct GuestFacts {
    info: qapi::qga::GuestAgentInfo,
    fsinfo: Vec<qapi::qga::GuestFilesystemInfo>,
    disks: Vec<qapi::qga::GuestDiskInfo>,
    osinfo: qapi::qga::GuestOSInfo,
}

/// What the agent says about the guest, through libvirt; the first failure, in words.
async fn guest_facts(virsh: &Virsh, domain: &str) -> Result<GuestFacts, String> {
    async fn ask<T: serde::de::DeserializeOwned>(virsh: &Virsh, domain: &str, command: &str) -> Result<T, String> {
        let reply =
            virsh.agent(domain, command, crate::sys::deadline::AGENT_COMMAND).await.map_err(|e| e.to_string())?;
        serde_json::from_value(reply)
            .map_err(|e| format!("the agent's {command} reply does not fit QEMU's schema: {e}"))
    }
    let info = ask(virsh, domain, "guest-info").await?;
    let fsinfo = ask(virsh, domain, "guest-get-fsinfo").await?;
    // Older agents lack guest-get-disks: not a reason to refuse (as for quiesce's own VMs).
    let disks = ask(virsh, domain, "guest-get-disks").await.unwrap_or_default();
    let osinfo = ask(virsh, domain, "guest-get-osinfo").await?;
    Ok(GuestFacts { info, fsinfo, disks, osinfo })
}

/// A path in a `--diskspec`, whose fields are separated by commas: a comma is doubled.
fn diskspec_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// libvirt's disk-only snapshot with the freeze: an overlay (at `overlays[i]`) on each
/// disk, nothing recorded as a snapshot.
async fn snapshot(virsh: &Virsh, domain: &str, dom: &Domain, overlays: &[PathBuf]) -> Result<(), VirshError> {
    let specs: Vec<String> = dom
        .disks
        .iter()
        .zip(overlays)
        .map(|(d, o)| format!("{},snapshot=external,file={},driver=qcow2", d.target, diskspec_path(o)))
        .collect();
    let snap_name = format!("quiesce-{}", std::process::id());
    let mut args = vec!["snapshot-create-as", domain, "--name", &snap_name];
    args.extend(["--disk-only", "--quiesce", "--atomic", "--no-metadata"]);
    for s in &specs {
        args.extend(["--diskspec", s.as_str()]);
    }
    virsh.run(&args, SNAPSHOT).await.map(drop)
}

/// Puts each disk back on its own image, as the live XML shows it now: a disk on its
/// overlay is committed (`blockcommit --active --shallow --pivot`), then the overlay is
/// deleted. A disk on neither its image nor its overlay is an error (someone else changed
/// it meanwhile), and is left as it is.
async fn put_back(virsh: &Virsh, domain: &str, dom: &Domain, overlays: &[PathBuf]) -> Result<(), LibvirtError> {
    let xml_error = |source| LibvirtError::Domain { domain: domain.to_owned(), source };
    for (disk, overlay) in dom.disks.iter().zip(overlays) {
        let now = domain::sources(&virsh.run(&["dumpxml", domain], virsh::COMMAND).await?).map_err(xml_error)?;
        let on = now.iter().find(|(t, _)| *t == disk.target).map(|(_, p)| p.clone());
        if on.as_ref() == Some(overlay) {
            let secs = COMMIT.as_secs().to_string();
            virsh
                .run(
                    &[
                        "blockcommit",
                        domain,
                        &disk.target,
                        "--active",
                        "--shallow",
                        "--pivot",
                        "--wait",
                        "--timeout",
                        &secs,
                    ],
                    COMMIT + virsh::OWN_TIMEOUT_MARGIN,
                )
                .await?;
            let after = domain::sources(&virsh.run(&["dumpxml", domain], virsh::COMMAND).await?).map_err(xml_error)?;
            let back = after.iter().any(|(t, p)| *t == disk.target && *p == disk.path);
            if !back {
                return Err(LibvirtError::NotPutBack {
                    domain: domain.to_owned(),
                    error: format!("disk {}: blockcommit returned", disk.target),
                    put_back: format!("the disk is not on {} again", disk.path.display()),
                });
            }
        } else if on.as_ref() != Some(&disk.path) {
            return Err(LibvirtError::NotPutBack {
                domain: domain.to_owned(),
                error: format!("disk {}", disk.target),
                put_back: format!(
                    "it is on {}, neither its image {} nor quiesce's overlay; left as it is",
                    on.map_or_else(|| "nothing".to_owned(), |p| p.display().to_string()),
                    disk.path.display()
                ),
            });
        }
        // The overlay is quiesce's own file (its name has this run's pid), in use no more.
        match std::fs::remove_file(overlay) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(BackupError::io(domain, &format!("remove the overlay {}", overlay.display()), e).into())
            }
        }
    }
    Ok(())
}

/// After a failure the guest may be frozen (an agent call cut short): thaw it. Thawing a
/// thawed guest does nothing; a failure here is only printed (the error that led here is
/// the one to report).
async fn thaw_after_failure(virsh: &Virsh, domain: &str) {
    if let Err(e) = virsh.run(&["domfsthaw", domain], virsh::COMMAND).await {
        eprintln!("quiesce: libvirt domain {domain}: thawing after the failure: {e}");
    }
}

/// Sizes and checksums of the copied disks.
async fn hash(vm: &str, dir: &Path, disks: &mut [DiskEntry]) -> Result<(), BackupError> {
    for d in disks.iter_mut() {
        let p = dir.join(&d.file);
        let (h, n) = tokio::task::spawn_blocking(move || super::folder::sha256_file(&p))
            .await
            .map_err(|e| BackupError::io(vm, "hash the disks", std::io::Error::other(e)))?
            .map_err(|e| BackupError::io(vm, "hash the disks", e))?;
        d.sha256 = h;
        d.bytes = n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diskspec_paths_double_their_commas() {
        assert_eq!(diskspec_path(Path::new("/a,b/c.qcow2")), "/a,,b/c.qcow2");
    }
}
