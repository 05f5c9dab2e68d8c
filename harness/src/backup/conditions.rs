//! The six conditions under which a VM may be backed up by Child VM Snapshot. Each is a
//! named check with a verdict and a reason a person understands; they are all evaluated
//! before anything is frozen. The rules on guest replies are pure functions over JSON, so
//! they are unit tested with recorded replies.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::image::partition;
use crate::qemu::{Machine, MachineConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Condition {
    /// The Backup Integration Service: qemu-guest-agent answers and can freeze and thaw.
    AgentCanFreeze,
    VmRunning,
    /// The snapshot location is on the same host filesystem as each disk image.
    SnapshotOnSameVolume,
    /// No dynamic (LDM) disks on the host side, and no volumes spanning disks in the guest.
    BasicDisksOnly,
    /// Every filesystem on the backed-up disks can be snapshotted.
    FilesystemsSupportSnapshots,
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

/// Why a guest-side condition could not be checked.
const NO_AGENT: &str = "not checked: the guest agent is not answering";

fn verdict(condition: Condition, r: Result<String, String>) -> Verdict {
    match r {
        Ok(reason) => Verdict { condition, outcome: Outcome::Held, reason },
        Err(reason) if reason.starts_with("not checked") => Verdict { condition, outcome: Outcome::NotChecked, reason },
        Err(reason) => Verdict { condition, outcome: Outcome::Failed, reason },
    }
}

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
    let mut out = vec![];
    let guest = GuestFacts::gather(m, agent_deadline).await;
    out.push(verdict(
        Condition::AgentCanFreeze,
        guest.as_ref().map_err(Clone::clone).and_then(|g| agent_can_freeze(&g.info)),
    ));
    // Without the agent the guest-side conditions cannot be evaluated: say so, not "failed".
    let guest = guest.map_err(|_| NO_AGENT.to_owned());
    out.push(verdict(
        Condition::VmRunning,
        match running {
            Ok(s) if s.running => Ok("QEMU reports the VM running".into()),
            Ok(s) => Err(format!("the VM is {} (QEMU: {})", s.label(), s.status)),
            Err(e) => Err(format!("query-status failed: {e}")),
        },
    ));
    out.push(verdict(Condition::SnapshotOnSameVolume, same_volume(cfg, snapshot_dir)));
    let serials: Vec<&str> = cfg.disks.iter().map(|d| d.node_name.as_str()).collect();
    out.push(verdict(
        Condition::BasicDisksOnly,
        host_disks_basic(cfg).and_then(|host| match &guest {
            Ok(g) => guest_disks_basic(&g.disks, &serials).map(|guest| format!("{host}; {guest}")),
            Err(e) => Err(format!("{e} (host side: {host})")),
        }),
    ));
    out.push(verdict(
        Condition::FilesystemsSupportSnapshots,
        guest.as_ref().map_err(Clone::clone).and_then(|g| filesystems_support_snapshots(&g.fsinfo, &serials)),
    ));
    out.push(verdict(
        Condition::GuestOsSupported,
        guest.as_ref().map_err(Clone::clone).and_then(|g| os_supported(&g.osinfo)),
    ));
    out
}

/// What the agent says about the guest, gathered once under one deadline.
struct GuestFacts {
    info: Value,
    fsinfo: Value,
    disks: Value,
    osinfo: Value,
}

impl GuestFacts {
    async fn gather(m: &Machine, deadline: Duration) -> Result<GuestFacts, String> {
        let agent =
            m.agent().map_err(|_| "the VM has no guest agent channel (the agent is not installed)".to_owned())?;
        let ask = |cmd: &'static str| async move {
            agent.execute_raw(cmd, Value::Null, deadline).await.map_err(|e| match e {
                crate::qemu::AgentError::Timeout { .. } | crate::qemu::AgentError::NotResponding { .. } => {
                    format!("the guest agent did not answer {cmd} within {deadline:?}")
                }
                e => format!("{cmd}: {e}"),
            })
        };
        let info = ask("guest-info").await?;
        Ok(GuestFacts {
            info,
            fsinfo: ask("guest-get-fsinfo").await?,
            // Older agents lack guest-get-disks; that is not a reason to refuse.
            disks: ask("guest-get-disks").await.unwrap_or(Value::Array(vec![])),
            osinfo: ask("guest-get-osinfo").await?,
        })
    }
}

/// Condition 1 on a `guest-info` reply.
pub fn agent_can_freeze(info: &Value) -> Result<String, String> {
    let cmds = info["supported_commands"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let enabled = |name: &str| cmds.iter().any(|c| c["name"] == name && c["enabled"] == Value::Bool(true));
    let missing: Vec<&str> =
        ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"].into_iter().filter(|c| !enabled(c)).collect();
    if missing.is_empty() {
        Ok(format!("qemu-ga {} answers and can freeze and thaw", info["version"].as_str().unwrap_or("?")))
    } else {
        Err(format!("the guest agent has {} disabled or missing", missing.join(" and ")))
    }
}

/// Condition 3: every disk image on the same host filesystem (st_dev) as the snapshot dir.
pub fn same_volume(cfg: &MachineConfig, snapshot_dir: &Path) -> Result<String, String> {
    let snap =
        std::fs::metadata(snapshot_dir).map_err(|e| format!("snapshot location {}: {e}", snapshot_dir.display()))?;
    for d in &cfg.disks {
        let m = std::fs::metadata(&d.path).map_err(|e| format!("disk {} ({}): {e}", d.node_name, d.path.display()))?;
        if m.dev() != snap.dev() {
            return Err(format!(
                "snapshot location {} is on another host volume than disk {} ({})",
                snapshot_dir.display(),
                d.node_name,
                d.path.display()
            ));
        }
    }
    Ok(format!("{} is on the same host volume as all {} disks", snapshot_dir.display(), cfg.disks.len()))
}

/// Condition 4, host side: no disk has a dynamic-disk partition table.
pub fn host_disks_basic(cfg: &MachineConfig) -> Result<String, String> {
    for d in &cfg.disks {
        let head = partition::read_head(&d.path, d.format)
            .map_err(|e| format!("disk {}: cannot read its partition table: {e}", d.node_name))?;
        if let Some(why) = partition::parse(&head).dynamic_reason() {
            return Err(format!("disk {} is dynamic: {why}", d.node_name));
        }
    }
    Ok("no dynamic partition tables".into())
}

/// Condition 4, guest side, on a `guest-get-disks` reply: no device-mapper, md or LVM
/// volume built on the backed-up disks (those may span disks or be dynamic).
pub fn guest_disks_basic(disks: &Value, serials: &[&str]) -> Result<String, String> {
    let all = disks.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let ours: Vec<&str> = all
        .iter()
        .filter(|d| d["address"]["serial"].as_str().is_some_and(|s| serials.contains(&s)))
        .filter_map(|d| d["name"].as_str())
        .collect();
    for d in all {
        let name = d["name"].as_str().unwrap_or("?");
        let deps: Vec<&str> =
            d["dependencies"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let virtual_volume = name.contains("/dm-") || name.contains("/md");
        let on_ours = deps.iter().any(|dep| ours.iter().any(|o| dep.starts_with(o)));
        if virtual_volume && on_ours {
            return Err(format!(
                "guest volume {name} is built on {} (device-mapper/md/LVM: not a basic disk)",
                deps.join(", ")
            ));
        }
    }
    Ok("no spanned or device-mapper volumes in the guest".into())
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
pub fn filesystems_support_snapshots(fsinfo: &Value, serials: &[&str]) -> Result<String, String> {
    let mut seen = Vec::new();
    for fs in fsinfo.as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let on_ours = fs["disk"]
            .as_array()
            .is_some_and(|ds| ds.iter().any(|d| d["serial"].as_str().is_some_and(|s| serials.contains(&s))));
        if !on_ours {
            continue;
        }
        let ty = fs["type"].as_str().unwrap_or("?");
        let mnt = fs["mountpoint"].as_str().unwrap_or("?");
        if let Some((_, why)) = NOT_SNAPSHOT_CAPABLE.iter().find(|(t, _)| t.eq_ignore_ascii_case(ty)) {
            return Err(format!("{mnt} is {ty}: {why}"));
        }
        if !SNAPSHOT_CAPABLE.iter().any(|t| t.eq_ignore_ascii_case(ty)) {
            return Err(format!("{mnt} is {ty}, which is not known to support snapshots"));
        }
        seen.push(format!("{mnt} ({ty})"));
    }
    Ok(format!("all filesystems support snapshots: {}", seen.join(", ")))
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
pub fn os_supported(osinfo: &Value) -> Result<String, String> {
    let id = osinfo["id"].as_str().unwrap_or("");
    let kv = osinfo["kernel-version"].as_str().unwrap_or("");
    let name = osinfo["pretty-name"].as_str().or_else(|| osinfo["name"].as_str()).unwrap_or("unknown OS");
    let rule = OS_RULES
        .iter()
        .find(|r| (r.id.is_empty() || r.id == id) && kv.starts_with(r.kernel_version))
        .expect("the last rule matches everything");
    if rule.supported {
        Ok(format!("{name}: {}", rule.why))
    } else {
        Err(format!("{name}: {}", rule.why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Recorded facts: replies of qemu-ga's guest-get-osinfo. The Linux one is from this
    // project's test guest; the Windows Server 2022 one follows qemu-ga's Windows code (NT
    // version in kernel-version, build number in kernel-release); qemu-ga never ran on
    // Windows 2000, so that one is made from the same fields with NT 5.0's values. Neither
    // Windows reply comes from a live guest here.
    fn linux() -> Value {
        json!({"name": "Debian GNU/Linux", "kernel-release": "6.12.117+deb12-cloud-amd64", "version": "12 (bookworm)",
               "id": "debian", "kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.12.117-1~deb12u1", "machine": "x86_64",
               "pretty-name": "Debian GNU/Linux 12 (bookworm)", "version-id": "12"})
    }
    fn windows_2022() -> Value {
        json!({"name": "Microsoft Windows", "kernel-release": "20348", "version": "Microsoft Windows Server 2022",
               "variant": "server", "pretty-name": "Windows Server 2022 Datacenter", "version-id": "2022",
               "variant-id": "server", "kernel-version": "10.0", "machine": "x86_64", "id": "mswindows"})
    }
    fn windows_2000() -> Value {
        json!({"name": "Microsoft Windows", "kernel-release": "2195", "version": "Microsoft Windows 2000",
               "variant": "server", "pretty-name": "Windows 2000 Server", "version-id": "2000",
               "variant-id": "server", "kernel-version": "5.0", "machine": "x86", "id": "mswindows"})
    }

    #[test]
    fn os_rule_table() {
        assert!(os_supported(&linux()).is_ok());
        assert!(os_supported(&windows_2022()).unwrap().contains("Windows Server 2022"));
        let e = os_supported(&windows_2000()).unwrap_err();
        assert!(e.contains("Windows 2000 (NT 5.0) is never supported"), "{e}");
        // NT 5.1 (XP) and 5.2 (2003) are not caught by the 2000 rule.
        let mut xp = windows_2000();
        xp["kernel-version"] = json!("5.1");
        assert!(os_supported(&xp).is_ok());
        assert!(os_supported(&json!({})).is_ok());
    }

    #[test]
    fn agent_must_have_freeze_and_thaw_enabled() {
        let ok = json!({"version": "10.0.2", "supported_commands": [
            {"name": "guest-fsfreeze-freeze", "enabled": true}, {"name": "guest-fsfreeze-thaw", "enabled": true}]});
        assert!(agent_can_freeze(&ok).is_ok());
        let blocked = json!({"version": "10.0.2", "supported_commands": [
            {"name": "guest-fsfreeze-freeze", "enabled": false}, {"name": "guest-fsfreeze-thaw", "enabled": true}]});
        assert!(agent_can_freeze(&blocked).unwrap_err().contains("guest-fsfreeze-freeze"));
        assert!(agent_can_freeze(&json!("garbage")).is_err());
    }

    fn fs(mnt: &str, ty: &str, serial: &str) -> Value {
        json!({"mountpoint": mnt, "type": ty, "name": "vdb", "disk": [{"serial": serial, "dev": "/dev/vdb"}]})
    }

    #[test]
    fn filesystem_table() {
        let ok =
            json!([fs("/", "ext4", "root"), fs("/mnt/data", "xfs", "data"), fs("/boot/efi", "vfat", "other-vm-disk")]);
        assert!(filesystems_support_snapshots(&ok, &["root", "data"]).is_ok());
        let bad = json!([fs("/", "ext4", "root"), fs("/mnt/usb", "vfat", "data")]);
        let e = filesystems_support_snapshots(&bad, &["root", "data"]).unwrap_err();
        assert!(e.contains("/mnt/usb is vfat"), "{e}");
        let unknown = json!([fs("/mnt/x", "weirdfs", "data")]);
        assert!(filesystems_support_snapshots(&unknown, &["data"]).unwrap_err().contains("not known"));
    }

    #[test]
    fn ntfs_is_refused_under_linux_ntfs3_and_fuse_but_not_under_windows() {
        // The ntfs3 entry of a guest-get-fsinfo reply recorded on the test guest (qemu-ga 10).
        let ntfs3 = json!([fs("/", "ext4", "root"), {
            "mountpoint": "/mnt/data", "name": "vdb", "type": "ntfs3", "total-bytes": 67104768,
            "used-bytes": 2609152, "disk": [{"bus": 0, "bus-type": "virtio", "dev": "/dev/vdb",
            "serial": "data", "target": 0, "unit": 0}]}]);
        let e = filesystems_support_snapshots(&ntfs3, &["root", "data"]).unwrap_err();
        assert!(e.starts_with("/mnt/data is ntfs3: the Linux ntfs3 driver cannot freeze"), "{e}");
        // Not one of ours: another VM's ntfs3 volume does not matter.
        assert!(filesystems_support_snapshots(&ntfs3, &["root"]).is_ok());
        let fuse = json!([fs("/mnt/data", "fuseblk", "data")]);
        assert!(filesystems_support_snapshots(&fuse, &["data"]).unwrap_err().contains("FUSE"));
        // Windows guests report GetVolumeInformation's names; NTFS and ReFS freeze under VSS.
        let windows = json!([fs("C:\\", "NTFS", "root"), fs("D:\\", "ReFS", "data")]);
        let ok = filesystems_support_snapshots(&windows, &["root", "data"]).unwrap();
        assert!(ok.contains("C:\\ (NTFS)") && ok.contains("D:\\ (ReFS)"), "{ok}");
        let usb = json!([fs("E:\\", "FAT32", "data")]);
        assert!(filesystems_support_snapshots(&usb, &["data"]).unwrap_err().contains("FAT has no journal"));
    }

    #[test]
    fn guest_volumes_on_our_disks_are_not_basic() {
        let disks = json!([
            {"name": "/dev/vda", "partition": false, "address": {"serial": "root"}},
            {"name": "/dev/vdb", "partition": false, "address": {"serial": "data"}},
            {"name": "/dev/dm-0", "partition": false, "dependencies": ["/dev/vdb", "/dev/vdc"]}
        ]);
        let e = guest_disks_basic(&disks, &["root", "data"]).unwrap_err();
        assert!(e.contains("/dev/dm-0"), "{e}");
        assert!(guest_disks_basic(&disks, &["root"]).is_ok());
        assert!(guest_disks_basic(&json!(null), &["root"]).is_ok());
    }
}
