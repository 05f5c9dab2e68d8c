//! The six conditions under which a VM may be backed up by Child VM Snapshot. Each is a
//! named check with a verdict and a reason a person understands; they are all evaluated
//! before anything is frozen. The rules on guest replies are pure functions over JSON, so
//! they are unit tested with recorded replies. A Windows guest's cases (VSS readiness,
//! dynamic disks seen from the guest) are in [`windows`].

mod quote;
pub mod windows;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use qapi::qga::{
    guest_get_disks, guest_get_fsinfo, guest_get_osinfo, guest_info, GuestAgentInfo, GuestDiskInfo,
    GuestFilesystemInfo, GuestOSInfo,
};
use serde::{Deserialize, Serialize};

use crate::image::partition;
use crate::qemu::{AgentError, GuestAgent, Machine, MachineConfig};
use quote::{list, quote};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Condition {
    /// The Backup Integration Service: qemu-guest-agent answers and can freeze and thaw.
    AgentCanFreeze,
    /// QEMU reports the VM running (a paused or saved VM has no guest to freeze).
    VmRunning,
    /// The snapshot location is on the same host filesystem as each disk image.
    SnapshotOnSameVolume,
    /// No dynamic (LDM) disks on the host side, and no volumes spanning disks in the guest.
    BasicDisksOnly,
    /// Every filesystem on the backed-up disks can be snapshotted.
    FilesystemsSupportSnapshots,
    /// The guest's operating system is one whose freeze is supported (never Windows 2000).
    GuestOsSupported,
}

impl Condition {
    pub const ALL: [Condition; 6] = [
        Condition::AgentCanFreeze,
        Condition::VmRunning,
        Condition::SnapshotOnSameVolume,
        Condition::BasicDisksOnly,
        Condition::FilesystemsSupportSnapshots,
        Condition::GuestOsSupported,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Condition::AgentCanFreeze => "agent-can-freeze",
            Condition::VmRunning => "vm-running",
            Condition::SnapshotOnSameVolume => "snapshot-on-same-volume",
            Condition::BasicDisksOnly => "basic-disks-only",
            Condition::FilesystemsSupportSnapshots => "filesystems-support-snapshots",
            Condition::GuestOsSupported => "guest-os-supported",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Held,
    Failed,
    /// Could not be evaluated because another condition failed first (no agent to ask).
    NotChecked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub condition: Condition,
    pub outcome: Outcome,
    pub reason: String,
}

impl Verdict {
    pub fn held(&self) -> bool {
        self.outcome == Outcome::Held
    }
}

/// What a rule found, with the reason a person reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The condition holds; why.
    Held(String),
    /// The condition fails; why.
    Failed(String),
    /// The condition could not be evaluated (another one failed first); why.
    NotChecked(String),
}

impl Finding {
    /// The verdict on `condition`.
    pub fn verdict(self, condition: Condition) -> Verdict {
        let (outcome, reason) = match self {
            Finding::Held(r) => (Outcome::Held, r),
            Finding::Failed(r) => (Outcome::Failed, r),
            Finding::NotChecked(r) => (Outcome::NotChecked, r),
        };
        Verdict { condition, outcome, reason }
    }

    pub fn held(&self) -> bool {
        matches!(self, Finding::Held(_))
    }
}

/// Why a guest-side condition could not be checked.
const NO_AGENT: &str = "not checked: the guest agent is not answering";

/// The failed conditions, as one sentence for a report (None when all hold). Conditions
/// that could not be checked are named only if none failed outright.
pub fn failures(vs: &[Verdict]) -> Option<String> {
    let line = |v: &Verdict| format!("{}: {}", v.condition.name(), v.reason);
    let failed: Vec<String> = vs.iter().filter(|v| v.outcome == Outcome::Failed).map(line).collect();
    if !failed.is_empty() {
        return Some(failed.join("; "));
    }
    vs.iter().find(|v| !v.held()).map(line)
}

/// Evaluates all six conditions for `m`, whose snapshot overlays would go in `snapshot_dir`.
/// The agent is given `agent_deadline` to answer; if it does not, the guest-side checks
/// fail with it rather than waiting again.
pub async fn evaluate(m: &Machine, snapshot_dir: &Path, agent_deadline: Duration) -> Vec<Verdict> {
    let cfg = m.config();
    let running = crate::backup::runstate::query(m).await;
    let guest = GuestFacts::gather(m, agent_deadline).await;
    let agent = match &guest {
        Ok(g) => match &g.windows {
            Some(w) => windows::vss_usable(agent_can_freeze(&g.info), w),
            None => agent_can_freeze(&g.info),
        },
        Err(e) => Finding::Failed(e.to_string()),
    };
    // Without the agent the guest-side conditions cannot be evaluated: say so, not "failed".
    let guest = guest.ok();
    let unchecked = || Finding::NotChecked(NO_AGENT.to_owned());
    let running = match running {
        Ok(s) if s.running => Finding::Held("QEMU reports the VM running".into()),
        Ok(s) => Finding::Failed(format!("the VM is {} (QEMU: {})", s.label(), s.status)),
        Err(e) => Finding::Failed(format!("query-status failed: {e}")),
    };
    // The serials of the VM's disks tell its filesystems from others. A VM quiesce did not
    // start may have disks without one: then every disk the guest has counts as ours.
    let known = m.guest_serials();
    let serials: Vec<&str> = known.iter().flatten().map(String::as_str).collect();
    let ours = |s: Option<&str>| known.is_none() || s.is_some_and(|s| serials.contains(&s));
    let basic = match (host_disks_basic(cfg), &guest) {
        (Finding::Held(host), Some(g)) => match guest_disks_basic_where(&g.disks, ours) {
            Finding::Held(guest) => match g.windows.as_ref().map(|w| windows::guest_disks(w, &serials)) {
                None => Finding::Held(format!("{host}; {guest}")),
                Some(Finding::Held(win)) => Finding::Held(format!("{host}; {guest}; {win}")),
                Some(other) => other,
            },
            other => other,
        },
        (Finding::Held(host), None) => Finding::NotChecked(format!("{NO_AGENT} (host side: {host})")),
        (host, _) => host,
    };
    let filesystems = guest.as_ref().map_or_else(unchecked, |g| filesystems_support_snapshots_where(&g.fsinfo, ours));
    let os = guest.as_ref().map_or_else(unchecked, |g| os_supported(&g.osinfo));
    vec![
        agent.verdict(Condition::AgentCanFreeze),
        running.verdict(Condition::VmRunning),
        same_volume(cfg, snapshot_dir).verdict(Condition::SnapshotOnSameVolume),
        basic.verdict(Condition::BasicDisksOnly),
        filesystems.verdict(Condition::FilesystemsSupportSnapshots),
        os.verdict(Condition::GuestOsSupported),
    ]
}

/// Why what the agent says about the guest could not be learnt. Each one fails condition 1
/// and leaves the guest-side conditions unchecked.
#[derive(Debug, thiserror::Error)]
pub enum GuestFactsError {
    /// The VM was started without a guest agent channel, so nothing can be asked of the guest.
    #[error("the VM has no guest agent channel (none was given, or the agent is not installed)")]
    NoChannel,
    /// The agent did not answer in time: not running, hung, or the guest is not up.
    #[error("the guest agent did not answer {command} within {waited:?}")]
    Silent { command: &'static str, waited: Duration },
    /// The agent refused the command, or its reply does not fit QEMU's schema.
    #[error("{command}: {error}")]
    Agent { command: &'static str, error: AgentError },
}

/// What the agent says about the guest, gathered once under one deadline per command.
struct GuestFacts {
    info: GuestAgentInfo,
    fsinfo: Vec<GuestFilesystemInfo>,
    disks: Vec<GuestDiskInfo>,
    osinfo: GuestOSInfo,
    /// What a Windows guest adds (None for any other guest).
    windows: Option<windows::WindowsFacts>,
}

impl GuestFacts {
    async fn gather(m: &Machine, deadline: Duration) -> Result<GuestFacts, GuestFactsError> {
        let agent = m.agent().map_err(|_| GuestFactsError::NoChannel)?;
        let info = ask(agent, guest_info {}, deadline).await?;
        let fsinfo = ask(agent, guest_get_fsinfo {}, deadline).await?;
        let disks = match ask(agent, guest_get_disks {}, deadline).await {
            Ok(d) => d,
            // Older agents lack guest-get-disks, or have it disabled: not a reason to refuse.
            Err(GuestFactsError::Agent { error: AgentError::Command { .. }, .. }) => vec![],
            Err(e) => return Err(e),
        };
        let osinfo = ask(agent, guest_get_osinfo {}, deadline).await?;
        let windows = match osinfo.id.as_deref() {
            Some(windows::WINDOWS_ID) => Some(windows_facts(agent, deadline).await?),
            _ => None,
        };
        Ok(GuestFacts { info, fsinfo, disks, osinfo, windows })
    }
}

/// VSS's readiness (`guest-fsfreeze-status`) and the partitions, asked of a Windows guest.
async fn windows_facts(agent: &GuestAgent, deadline: Duration) -> Result<windows::WindowsFacts, GuestFactsError> {
    let vss = match ask(agent, qapi::qga::guest_fsfreeze_status {}, deadline).await {
        Ok(_) => Ok(()),
        Err(GuestFactsError::Agent { error, command }) => match crate::backup::vss::of_agent_error(&error) {
            Some(v) => Err(v),
            None => return Err(GuestFactsError::Agent { error, command }),
        },
        Err(e) => return Err(e),
    };
    let partitions = crate::qemu::winexec::powershell(agent, windows::PARTITIONS_QUERY, windows::QUERY_DEADLINE)
        .await
        .map_err(|e| e.to_string())
        .and_then(|out| windows::parse_partitions(&out));
    Ok(windows::WindowsFacts { vss, partitions })
}

/// Asks the agent one typed question; a reply that does not fit its type is an error.
async fn ask<C: qapi::Command>(agent: &GuestAgent, cmd: C, deadline: Duration) -> Result<C::Ok, GuestFactsError> {
    agent.execute_within(cmd, deadline).await.map_err(|e| match e {
        AgentError::Timeout { .. } | AgentError::NotResponding { .. } => {
            GuestFactsError::Silent { command: C::NAME, waited: deadline }
        }
        error => GuestFactsError::Agent { command: C::NAME, error },
    })
}

/// Condition 1 on a `guest-info` reply.
pub fn agent_can_freeze(info: &GuestAgentInfo) -> Finding {
    let enabled = |name: &str| info.supported_commands.iter().any(|c| c.name == name && c.enabled);
    let missing: Vec<&str> =
        ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"].into_iter().filter(|c| !enabled(c)).collect();
    if missing.is_empty() {
        Finding::Held(format!("qemu-ga {} answers and can freeze and thaw", quote(&info.version)))
    } else {
        Finding::Failed(format!("the guest agent has {} disabled or missing", missing.join(" and ")))
    }
}

/// Condition 3: every disk image on the same host filesystem (st_dev) as the snapshot dir.
pub fn same_volume(cfg: &MachineConfig, snapshot_dir: &Path) -> Finding {
    let snap = match std::fs::metadata(snapshot_dir) {
        Ok(m) => m,
        Err(e) => return Finding::Failed(format!("snapshot location {}: {e}", snapshot_dir.display())),
    };
    for d in &cfg.disks {
        let m = match std::fs::metadata(&d.path) {
            Ok(m) => m,
            Err(e) => return Finding::Failed(format!("disk {} ({}): {e}", d.node_name, d.path.display())),
        };
        if m.dev() != snap.dev() {
            return Finding::Failed(format!(
                "snapshot location {} is on another host volume than disk {} ({})",
                snapshot_dir.display(),
                d.node_name,
                d.path.display()
            ));
        }
    }
    Finding::Held(format!("{} is on the same host volume as all {} disks", snapshot_dir.display(), cfg.disks.len()))
}

/// Condition 4, host side: no disk has a dynamic-disk partition table.
pub fn host_disks_basic(cfg: &MachineConfig) -> Finding {
    for d in &cfg.disks {
        let head = match partition::read_head(&d.path, d.format) {
            Ok(h) => h,
            Err(e) => return Finding::Failed(format!("disk {}: cannot read its partition table: {e}", d.node_name)),
        };
        if let Some(why) = partition::parse(&head).dynamic_reason() {
            return Finding::Failed(format!("disk {} is dynamic: {why}", d.node_name));
        }
    }
    Finding::Held("no dynamic partition tables".into())
}

/// Condition 4, guest side, on a `guest-get-disks` reply: no device-mapper, md or LVM
/// volume built on the backed-up disks (those may span disks or be dynamic).
pub fn guest_disks_basic(disks: &[GuestDiskInfo], serials: &[&str]) -> Finding {
    guest_disks_basic_where(disks, |s| s.is_some_and(|s| serials.contains(&s)))
}

/// [`guest_disks_basic`], with the backed-up disks told by `is_ours` on their serial.
pub fn guest_disks_basic_where(disks: &[GuestDiskInfo], is_ours: impl Fn(Option<&str>) -> bool) -> Finding {
    let serial = |d: &GuestDiskInfo| d.address.as_ref().and_then(|a| a.serial.clone());
    let ours: Vec<&str> = disks.iter().filter(|d| is_ours(serial(d).as_deref())).map(|d| d.name.as_str()).collect();
    for d in disks {
        let deps = d.dependencies.as_deref().unwrap_or_default();
        let virtual_volume = d.name.contains("/dm-") || d.name.contains("/md");
        let on_ours = deps.iter().any(|dep| ours.iter().any(|o| dep.starts_with(o)));
        if virtual_volume && on_ours {
            return Finding::Failed(format!(
                "guest volume {} is built on {} (device-mapper/md/LVM: not a basic disk)",
                quote(&d.name),
                list(&deps.iter().map(|d| quote(d)).collect::<Vec<_>>())
            ));
        }
    }
    Finding::Held("no spanned or device-mapper volumes in the guest".into())
}

/// Filesystems whose snapshots are consistent with the guest's cooperation (they freeze),
/// and the ones that cannot be. Anything else is refused as unknown. Easy to extend.
///
/// Names are matched ignoring case: qemu-ga on Linux reports the kernel's type ("ntfs3"),
/// on Windows the name GetVolumeInformation gives ("NTFS", "ReFS", "FAT32").
///
/// "ntfs" and "refs" are the Windows guest's own filesystems, frozen by VSS (qemu-ga's VSS
/// provider on Windows); from Microsoft's and QEMU's documentation, not tested here (there
/// is no Windows guest in this project).
const SNAPSHOT_CAPABLE: &[&str] = &["ext4", "ext3", "xfs", "btrfs", "ntfs", "refs", "f2fs", "jfs", "reiserfs"];
const NOT_SNAPSHOT_CAPABLE: &[(&str, &str)] = &[
    ("vfat", "FAT has no journal and cannot be frozen consistently"),
    ("msdos", "FAT has no journal and cannot be frozen consistently"),
    ("fat", "FAT has no journal and cannot be frozen consistently"),
    ("fat32", "FAT has no journal and cannot be frozen consistently"),
    ("exfat", "exFAT has no journal and cannot be frozen consistently"),
    // Measured on the test guest (Linux 6.12, qemu-ga 10): `fsfreeze --freeze` on an ntfs3
    // mount fails with EOPNOTSUPP (the driver has no freeze_fs); qemu-ga skips it without a
    // word and reports "frozen", and writes kept reaching the disk while it said so.
    (
        "ntfs3",
        "the Linux ntfs3 driver cannot freeze a filesystem (FIFREEZE is not supported), so the \
         guest agent leaves it writable and a snapshot would catch it mid-write",
    ),
    ("fuseblk", "FUSE filesystems (ntfs-3g, ...) cannot be frozen"),
    ("iso9660", "a CD-ROM filesystem is not snapshotted"),
];

/// Condition 5 on a `guest-get-fsinfo` reply, for the filesystems on the backed-up disks.
pub fn filesystems_support_snapshots(fsinfo: &[GuestFilesystemInfo], serials: &[&str]) -> Finding {
    filesystems_support_snapshots_where(fsinfo, |s| s.is_some_and(|s| serials.contains(&s)))
}

/// [`filesystems_support_snapshots`], with the backed-up disks told by `is_ours` on their
/// serial.
pub fn filesystems_support_snapshots_where(
    fsinfo: &[GuestFilesystemInfo],
    is_ours: impl Fn(Option<&str>) -> bool,
) -> Finding {
    let mut seen = Vec::new();
    for fs in fsinfo {
        let on_ours = fs.disk.iter().any(|d| is_ours(d.serial.as_deref()));
        if !on_ours {
            continue;
        }
        let ty = &fs.type_;
        let (shown_ty, mnt) = (quote(ty), quote(&fs.mountpoint));
        if let Some((_, why)) = NOT_SNAPSHOT_CAPABLE.iter().find(|(t, _)| t.eq_ignore_ascii_case(ty)) {
            return Finding::Failed(format!("{mnt} is {shown_ty}: {why}"));
        }
        if !SNAPSHOT_CAPABLE.iter().any(|t| t.eq_ignore_ascii_case(ty)) {
            return Finding::Failed(format!("{mnt} is {shown_ty}, which is not known to support snapshots"));
        }
        seen.push(format!("{mnt} ({shown_ty})"));
    }
    Finding::Held(format!("all filesystems support snapshots: {}", list(&seen)))
}

/// One row of the guest OS rule table: the first row that matches decides.
struct OsRule {
    id: &'static str,
    /// Prefix of `kernel-version` (Windows: "major.minor" of NT), or "" for any.
    kernel_version: &'static str,
    supported: bool,
    why: &'static str,
}

const OS_RULES: &[OsRule] = &[
    OsRule {
        id: "mswindows",
        kernel_version: "5.0",
        supported: false,
        why: "Windows 2000 (NT 5.0) is never supported",
    },
    OsRule { id: "mswindows", kernel_version: "", supported: true, why: "Windows with VSS" },
    OsRule { id: "", kernel_version: "", supported: true, why: "Linux and other guests whose agent can freeze" },
];

/// Condition 6 on a `guest-get-osinfo` reply.
pub fn os_supported(osinfo: &GuestOSInfo) -> Finding {
    let id = osinfo.id.as_deref().unwrap_or("");
    let kv = osinfo.kernel_version.as_deref().unwrap_or("");
    let name = quote(osinfo.pretty_name.as_deref().or(osinfo.name.as_deref()).unwrap_or("unknown OS"));
    // The last rule matches everything, so there is always one.
    let rule = OS_RULES.iter().find(|r| (r.id.is_empty() || r.id == id) && kv.starts_with(r.kernel_version));
    match rule {
        Some(r) if r.supported => Finding::Held(format!("{name}: {}", r.why)),
        Some(r) => Finding::Failed(format!("{name}: {}", r.why)),
        None => Finding::Failed(format!("{name}: no rule for this guest OS")),
    }
}

#[cfg(test)]
mod tests;
