//! One domain of a libvirt backup: what it is ([`inspect`]), which method it gets
//! ([`choose`]), and its part of each phase: [`prepare`] (the snapshot or the checkpoint),
//! [`post`] (the copy, the merge back, the manifest entry) and [`put_back`] (the undo,
//! safe to run at any point: it reads the live XML and acts only on quiesce's overlays).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::domain::{self, Domain};
use super::virsh::{self, Virsh, VirshError};
use super::LibvirtError;
use crate::backup::conditions::{self, Condition, Finding, Verdict};
use crate::backup::job::MethodChoice;
use crate::backup::manifest::{MachineSpec, Method, StateEntry, Timings, VmBackup};
use crate::backup::runstate::Activity;
use crate::backup::BackupError;
use crate::interrupt::Interrupt;
use crate::qemu::{DiskConfig, MachineConfig};
use crate::timeline::Timeline;

/// `virsh snapshot-create-as --quiesce` (the agent's freeze, seconds under TCG with a busy
/// guest), or with `--memspec` the save of the RAM: the overlays made and the thaw.
pub(crate) const SNAPSHOT: Duration = Duration::from_secs(300);
/// `virsh blockcommit --wait` of one overlay: what the guest wrote during the copy.
pub(crate) const COMMIT: Duration = Duration::from_secs(600);
/// The saved state's name in the VM's folder.
pub const STATE_FILE: &str = "state.libvirt";

/// A domain as the backup found it, and what it will do with it.
#[derive(Debug)]
pub struct Member {
    /// As the user named it (name or UUID): how virsh is told.
    pub domain: String,
    /// Its name in the backup.
    pub vm: String,
    pub dom: Domain,
    pub cfg: MachineConfig,
    /// libvirt's word for its state before the backup (`running`, `paused`...).
    pub state: String,
    pub paused: bool,
    pub verdicts: Vec<Verdict>,
    pub method: Method,
    pub reason: String,
    /// Where each disk's overlay goes (none for a paused domain's Saved State: nothing
    /// writes to its disks, so they are copied as they are).
    pub overlays: Vec<PathBuf>,
}

/// What a member's prepare measured.
#[derive(Debug, Default, Clone, Copy)]
pub struct Prepared {
    /// The libvirt call: the freeze window, or the save (the pause of a running domain).
    pub call_ms: f64,
}

/// The domain's XML, its state and the six conditions; nothing is changed.
pub async fn inspect(
    virsh: &Virsh,
    domain: &str,
    snapshot_dir: Option<&Path>,
    tl: &Timeline,
) -> Result<(Member, PathBuf), LibvirtError> {
    let xml = tl.step(Some(domain), "read the domain XML", virsh.run(&["dumpxml", domain], virsh::COMMAND)).await?;
    let dom = domain::parse(&xml).map_err(|source| LibvirtError::Domain { domain: domain.to_owned(), source })?;
    let vm = crate::qemu::attach::node_safe(&dom.name);
    let state = virsh.run(&["domstate", domain], virsh::COMMAND).await?.trim().to_owned();
    let dir = match snapshot_dir {
        Some(d) => d.to_owned(),
        None => dom.disks[0].path.parent().map(Path::to_owned).unwrap_or_else(|| PathBuf::from(".")),
    };
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let cfg = machine_config(&vm, &dom);
    let verdicts =
        tl.step(Some(&vm), "check the conditions", evaluate(virsh, domain, &dom, &state, &cfg, &dir)).await?;
    let member = Member {
        domain: domain.to_owned(),
        vm,
        dom,
        cfg,
        paused: state == "paused",
        state: state.clone(),
        verdicts,
        method: Method::ChildSnapshot,
        reason: String::new(),
        overlays: vec![],
    };
    Ok((member, dir))
}

/// The method for `m`, as for a QEMU attached by its sockets: Child VM Snapshot when all
/// six conditions hold, else (auto) Saved State naming the failed condition. Saved State
/// needs a running or paused domain. Sets the overlay paths. Nothing is changed.
pub fn choose(m: &mut Member, choice: MethodChoice, snapshot_dir: &Path) -> Result<(), LibvirtError> {
    let state = m.state.clone();
    let refuse = |reasons: String| LibvirtError::Refused { domain: m.domain.clone(), reasons };
    let saved = |reason: String| {
        if matches!(state.as_str(), "running" | "paused") {
            Ok((Method::SavedState, reason))
        } else {
            Err(LibvirtError::Refused {
                domain: m.domain.clone(),
                reasons: format!(
                    "{reason}, but Saved State needs a running or paused domain and libvirt reports it {state:?}"
                ),
            })
        }
    };
    let (method, reason) = match (choice, conditions::failures(&m.verdicts)) {
        (MethodChoice::SavedState, _) => saved("saved-state was chosen".into())?,
        (MethodChoice::ChildSnapshot, Some(f)) => return Err(refuse(f)),
        (_, None) => (
            Method::ChildSnapshot,
            "all six Child VM Snapshot conditions hold (libvirt's disk-only snapshot with the agent's freeze)".into(),
        ),
        (MethodChoice::Auto, Some(f)) => saved(format!("fell back to Saved State: {f}"))?,
    };
    m.method = method;
    m.reason = reason;
    m.overlays = if method == Method::SavedState && m.paused {
        vec![]
    } else {
        m.dom
            .disks
            .iter()
            .map(|d| snapshot_dir.join(format!("{}-{}-quiesce-overlay-{}.qcow2", m.vm, d.target, std::process::id())))
            .collect()
    };
    if let Some(p) = m.overlays.iter().find(|p| p.exists()) {
        return Err(LibvirtError::OverlayExists { domain: m.domain.clone(), path: p.clone() });
    }
    Ok(())
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

/// The six conditions on the domain, from libvirt (its state, its XML) and its agent. A
/// paused guest's agent cannot answer: it is not asked.
async fn evaluate(
    virsh: &Virsh,
    domain: &str,
    dom: &Domain,
    state: &str,
    cfg: &MachineConfig,
    snapshot_dir: &Path,
) -> Result<Vec<Verdict>, LibvirtError> {
    let facts = if !dom.agent_channel {
        Err("the domain has no guest agent channel (org.qemu.guest_agent.0)".to_owned())
    } else if state != "running" {
        Err(format!("libvirt reports the domain {state:?}: its guest agent cannot answer"))
    } else {
        guest_facts(virsh, domain).await
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

/// A path in a `--diskspec` or `--memspec`, whose fields are separated by commas: a comma
/// is doubled.
pub fn spec_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// PrepareForSnapshot for one domain, by libvirt:
/// - Child VM Snapshot: the disk-only snapshot with the freeze (an overlay per disk);
/// - Saved State: an external checkpoint (`--memspec`, no `--live`): libvirt pauses a
///   running domain, saves its RAM and devices to `state`, puts an overlay on each disk
///   and continues it; a paused domain is saved and stays paused, its disks left as they
///   are (nothing can write to them), so no overlay is needed.
///
/// `--no-metadata`: nothing is recorded as a snapshot in libvirt.
pub async fn prepare(virsh: &Virsh, m: &Member, state: &Path) -> Result<Prepared, VirshError> {
    let specs: Vec<String> = if m.overlays.is_empty() {
        m.dom.disks.iter().map(|d| format!("{},snapshot=no", d.target)).collect()
    } else {
        m.dom
            .disks
            .iter()
            .zip(&m.overlays)
            .map(|(d, o)| format!("{},snapshot=external,file={},driver=qcow2", d.target, spec_path(o)))
            .collect()
    };
    let snap_name = format!("quiesce-{}", std::process::id());
    let memspec = format!("file={},snapshot=external", spec_path(state));
    // --atomic: on a failure libvirt removes what it made (measured: an overlay it cannot
    // create fails the call before the save, and a running domain runs on).
    let mut args = vec!["snapshot-create-as", m.domain.as_str(), "--name", &snap_name, "--no-metadata", "--atomic"];
    match m.method {
        Method::ChildSnapshot => args.extend(["--disk-only", "--quiesce"]),
        Method::SavedState => args.extend(["--memspec", memspec.as_str()]),
    }
    for s in &specs {
        args.extend(["--diskspec", s.as_str()]);
    }
    let t = Instant::now();
    virsh.run(&args, SNAPSHOT).await?;
    Ok(Prepared { call_ms: t.elapsed().as_secs_f64() * 1000.0 })
}

/// PostSnapshot for one domain: the images under the overlays (or a paused domain's own)
/// copied and hashed, the overlays merged back, the manifest entry. An interruption stops
/// the copy (its qemu-img is killed); the caller puts the domain back.
#[allow(clippy::too_many_arguments)]
pub async fn post(
    virsh: &Virsh,
    m: &Member,
    prepared: Prepared,
    dir: &Path,
    machine: MachineSpec,
    tl: &Timeline,
    interrupt: &Interrupt,
) -> Result<VmBackup, LibvirtError> {
    let vm = m.vm.as_str();
    let t = Instant::now();
    let copy = crate::backup::capture::copy_disks_hashed(vm, m.cfg.disks.clone(), dir);
    let copied = tl
        .step(Some(vm), "copy the disks", async {
            tokio::select! {
                biased;
                _ = interrupt.fired() => Err(LibvirtError::Interrupted { phase: "PostSnapshot", undone: String::new() }),
                r = copy => r.map_err(LibvirtError::from),
            }
        })
        .await;
    let capture_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let merged = if m.overlays.is_empty() {
        Ok(())
    } else {
        tl.step(Some(vm), "merge the overlays back (libvirt)", put_back(virsh, m)).await
    };
    let merge_ms = t.elapsed().as_secs_f64() * 1000.0;
    let disks = copied?;
    merged?;
    let (state, timings) = match m.method {
        Method::ChildSnapshot => (
            None,
            Timings {
                capture_ms,
                // libvirt's freeze, overlays and thaw are one call: its length bounds the window.
                freeze_window_ms: Some(prepared.call_ms),
                merge_ms: Some(merge_ms),
                ..Timings::default()
            },
        ),
        Method::SavedState => {
            let p = dir.join(STATE_FILE);
            let (sha256, bytes) = tl
                .step(Some(vm), "hash the saved state", async {
                    tokio::task::spawn_blocking(move || crate::backup::folder::sha256_file(&p))
                        .await
                        .map_err(|e| BackupError::io(vm, "hash the saved state", std::io::Error::other(e)))?
                        .map_err(|e| BackupError::io(vm, "hash the saved state", e))
                })
                .await?;
            let secs = prepared.call_ms / 1000.0;
            let inactive = if m.paused { m.dom.disks.iter().map(|d| d.target.clone()).collect() } else { vec![] };
            let state = StateEntry {
                file: STATE_FILE.into(),
                bytes,
                sha256,
                mapped_ram: false,
                multifd_channels: None,
                inactive_until_continued: inactive,
            };
            let timings = Timings {
                // libvirt pauses a running domain for the save and continues it once the
                // overlays are on: the call's length bounds the downtime.
                downtime_ms: (!m.paused).then_some(prepared.call_ms),
                save_ms: Some(prepared.call_ms),
                save_mb_per_s: (secs > 0.0).then(|| bytes as f64 / 1e6 / secs),
                capture_ms,
                merge_ms: (!m.overlays.is_empty()).then_some(merge_ms),
                ..Timings::default()
            };
            (Some(state), timings)
        }
    };
    Ok(VmBackup {
        name: m.vm.clone(),
        method: m.method,
        method_reason: m.reason.clone(),
        conditions: m.verdicts.clone(),
        run_state_before: if m.paused { Activity::Paused } else { Activity::Running },
        machine,
        disks,
        state,
        excluded: vec![],
        timings,
        freeze: None,
        files: vec![],
    })
}

/// Puts each disk back on its own image, as the live XML shows it now: a disk on its
/// overlay is committed (`blockcommit --active --shallow --pivot`), then the overlay is
/// deleted. A disk on neither its image nor its overlay is an error (someone else changed
/// it meanwhile), and is left as it is. Safe at any point, and twice.
pub async fn put_back(virsh: &Virsh, m: &Member) -> Result<(), LibvirtError> {
    let domain = m.domain.as_str();
    let xml_error = |source| LibvirtError::Domain { domain: domain.to_owned(), source };
    for (disk, overlay) in m.dom.disks.iter().zip(&m.overlays) {
        let now = domain::sources(&virsh.run(&["dumpxml", domain], virsh::COMMAND).await?).map_err(xml_error)?;
        let on = now.iter().find(|(t, _)| *t == disk.target).map(|(_, p)| p.clone());
        if on.as_ref() == Some(overlay) {
            commit(virsh, domain, &disk.target).await?;
            let after = domain::sources(&virsh.run(&["dumpxml", domain], virsh::COMMAND).await?).map_err(xml_error)?;
            if !after.iter().any(|(t, p)| *t == disk.target && *p == disk.path) {
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

/// Commits disk `target`'s overlay back into its image and pivots the disk onto it, within
/// [`COMMIT`] (also the journal's replay, [`super::journal`]).
pub(crate) async fn commit(virsh: &Virsh, domain: &str, target: &str) -> Result<(), VirshError> {
    let secs = COMMIT.as_secs().to_string();
    let args = ["blockcommit", domain, target, "--active", "--shallow", "--pivot", "--wait", "--timeout", &secs];
    virsh.run(&args, COMMIT + virsh::OWN_TIMEOUT_MARGIN).await.map(drop)
}

/// After a failure the guest may be frozen (an agent call cut short): thaw it. Thawing a
/// thawed guest does nothing; a paused guest's agent cannot answer, so it is not asked
/// (libvirt's own snapshot thaws on its failure). A failure here is only printed.
pub async fn thaw_after_failure(virsh: &Virsh, m: &Member) {
    if m.paused || !m.dom.agent_channel {
        return;
    }
    if let Err(e) = virsh.run(&["domfsthaw", &m.domain], virsh::COMMAND).await {
        eprintln!("quiesce: libvirt domain {}: thawing after the failure: {e}", m.domain);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_paths_double_their_commas() {
        assert_eq!(spec_path(Path::new("/a,b/c.qcow2")), "/a,,b/c.qcow2");
    }
}
