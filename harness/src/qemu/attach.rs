//! Attaching to a QEMU that quiesce did not start: a person's own VM, reached through its
//! QMP socket (and, if it has one, its guest agent's socket). What the backup methods need
//! to know of the VM (its disks, machine type, memory, vCPUs, kernel) is asked of QEMU
//! itself, so the methods run over it as over a VM of quiesce's own.
//!
//! The result is a [`Machine`] that owns no process: dropping it closes the connections
//! and nothing else. Attaching only asks questions (`query-*`, `qom-get`); it changes
//! nothing in the VM.
//!
//! Disks are read from `query-block` (the devices and the node each one is attached to)
//! and `query-named-block-nodes` (each node's driver and file), so VMs started with
//! `-drive` (whose nodes QEMU names itself, `#block123`) work as well as `-blockdev` ones,
//! on any device (`virtio-blk`, `virtio-scsi`, IDE).

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use super::config::{Accel, DiskConfig, DiskFormat, KernelBoot, MachineConfig};
use super::machine::Machine;
use super::qga::GuestAgent;
use super::qmp::{Qmp, QmpError};
use super::transcript::Transcript;
use crate::sys::deadline;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Nothing could be reached at that path: it does not exist, is not a Unix socket, or
    /// nothing listens on it (the VM is not running, or the user may not open it).
    #[error("cannot connect to {what} socket {path}: {source}")]
    Connect { what: &'static str, path: PathBuf, source: std::io::Error },
    /// Something listens on the socket but does not speak QMP: it is not QEMU's monitor
    /// (an agent socket, a serial console, an HMP monitor), or another client holds the
    /// monitor (QEMU serves one client per QMP socket; the next waits, unanswered). Nothing
    /// was sent to it.
    #[error("{path} does not speak QMP ({source}); give the socket of QEMU's -qmp or -mon mode=control, and make sure no other client is connected to it")]
    NotQmp { path: PathBuf, source: QmpError },
    /// QMP answered, but a question about the VM failed: the QEMU is too old, or not a
    /// system emulator with a machine.
    #[error("VM {vm}: asking QEMU {command}: {source}")]
    Query { vm: String, command: String, source: QmpError },
    /// A disk quiesce cannot back up: behind a filter or on a host device or network
    /// storage, in a format it does not copy, or a file it cannot read. Nothing was touched.
    #[error("VM {vm}: disk {disk}: {why}")]
    Disk { vm: String, disk: String, why: String },
    /// The VM has no disk quiesce could back up.
    #[error("VM {vm} has no disk image attached (query-block lists none with a medium)")]
    NoDisks { vm: String },
    /// The private folder for the transcript could not be made.
    #[error("VM {vm}: could not make a folder for its transcript: {source}")]
    Setup { vm: String, source: std::io::Error },
}

/// What to attach to.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// The name used in the backup and in messages; QEMU's own `-name` if this is None.
    pub name: Option<String>,
    pub qmp: PathBuf,
    pub agent: Option<PathBuf>,
    /// Where evidence goes if the machine fails.
    pub artifacts_dir: PathBuf,
}

impl AttachOptions {
    /// The VM behind `qmp` (and `agent`, if it has one), named by its own `-name`, its
    /// evidence kept in the default artifacts folder.
    pub fn new(qmp: PathBuf, agent: Option<PathBuf>) -> Self {
        AttachOptions { name: None, qmp, agent, artifacts_dir: super::config::default_artifacts_dir() }
    }
}

/// Connects to the VM's sockets, checks the monitor speaks QMP, and learns the VM.
pub async fn attach(opts: &AttachOptions) -> Result<Machine, AttachError> {
    let connect = |what, path: &Path| {
        StdUnixStream::connect(path).map_err(|source| AttachError::Connect { what, path: path.to_owned(), source })
    };
    let qmp_std = connect("QMP", &opts.qmp)?;
    let agent_std = opts.agent.as_deref().map(|p| connect("guest agent", p)).transpose()?;
    // The monitor's peer is QEMU itself: its pid lets us tell if it is still running.
    let pid = nix::sys::socket::getsockopt(&qmp_std, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .and_then(|c| u32::try_from(c.pid()).ok())
        .filter(|&p| p > 0);
    let label = opts.name.clone().unwrap_or_else(|| "vm".into());
    let setup = |source| AttachError::Setup { vm: label.clone(), source };
    let run_dir = tempfile::Builder::new().prefix(&format!("quiesce-{label}-attached-")).tempdir().map_err(setup)?;
    let transcript = Transcript::create(&run_dir.path().join("transcript.log")).map_err(setup)?;
    transcript.note("harness", &format!("attached to {} (pid {pid:?})", opts.qmp.display()));
    let qmp_sync = qmp_std.try_clone().map_err(setup)?;
    let to_tokio = |s: StdUnixStream| {
        s.set_nonblocking(true)?;
        tokio::net::UnixStream::from_std(s)
    };
    let stream = to_tokio(qmp_std).map_err(setup)?;
    let qmp = Qmp::connect(stream, transcript.clone(), deadline::QMP_ATTACH_GREETING)
        .await
        .map_err(|source| AttachError::NotQmp { path: opts.qmp.clone(), source })?;
    let agent = match agent_std {
        Some(s) => Some(GuestAgent::new(to_tokio(s).map_err(setup)?, transcript.clone())),
        None => None,
    };
    let learnt = learn(&qmp, opts).await?;
    let process = pid.and_then(|p| crate::sys::Process::open(p).ok());
    let mut cfg = MachineConfig::new(&learnt.name, learnt.accel, learnt.boot);
    cfg.qemu_binary = PathBuf::new();
    cfg.machine_type = learnt.machine_type;
    cfg.memory_mib = learnt.memory_mib;
    cfg.cpus = learnt.cpus;
    // The restore recreates the agent's virtio-serial device from this: a saved state
    // loads only into the same devices, whether or not quiesce was given the socket.
    cfg.agent = agent.is_some() || learnt.has_virtio_serial;
    cfg.artifacts_dir = opts.artifacts_dir.clone();
    let mut nodes = Vec::new();
    let mut serials = Vec::new();
    for d in learnt.disks {
        if d.config.node_name != d.qemu_node {
            nodes.push((d.config.node_name.clone(), d.qemu_node));
        }
        serials.push(d.serial);
        cfg.disks.push(d.config);
    }
    let describe = format!("(a QEMU quiesce did not start: QMP {}, pid {pid:?})", opts.qmp.display());
    Ok(Machine::attached(cfg, qmp, qmp_sync, agent, process, nodes, serials, describe, run_dir))
}

/// One disk of an attached VM.
#[derive(Debug, Clone, PartialEq)]
pub struct LearntDisk {
    /// As the backup names it: a valid node name, unique in the VM.
    pub config: DiskConfig,
    /// The node QEMU attaches to the device (maybe one it named itself, `#block123`).
    pub qemu_node: String,
    /// The serial the guest sees, if the device has one.
    pub serial: Option<String>,
}

struct Learnt {
    name: String,
    accel: Accel,
    boot: KernelBoot,
    machine_type: String,
    memory_mib: u32,
    cpus: u32,
    disks: Vec<LearntDisk>,
    /// A virtio-serial controller (where the guest agent's port lives) is on the PCI bus.
    has_virtio_serial: bool,
}

async fn ask(qmp: &Qmp, vm: &str, command: &str, args: Value) -> Result<Value, AttachError> {
    qmp.execute_raw(command, args, deadline::QMP_COMMAND).await.map_err(|source| AttachError::Query {
        vm: vm.to_owned(),
        command: command.to_owned(),
        source,
    })
}

/// A string property of the machine object; "" when QEMU has it unset.
async fn machine_property(qmp: &Qmp, vm: &str, property: &str) -> Result<String, AttachError> {
    let v = ask(qmp, vm, "qom-get", json!({"path": "/machine", "property": property})).await?;
    Ok(v.as_str().unwrap_or_default().to_owned())
}

async fn learn(qmp: &Qmp, opts: &AttachOptions) -> Result<Learnt, AttachError> {
    let own_name = ask(qmp, "vm", "query-name", Value::Null).await?;
    let name = match (&opts.name, own_name["name"].as_str()) {
        (Some(n), _) => n.clone(),
        (None, Some(n)) => node_safe(n),
        (None, None) => "vm".into(),
    };
    let vm = name.as_str();
    let kvm = ask(qmp, vm, "query-kvm", Value::Null).await?;
    let accel = if kvm["enabled"] == json!(true) { Accel::Kvm } else { Accel::Tcg };
    // QOM's type name of the machine is "<-M name>-machine".
    let ty = machine_property(qmp, vm, "type").await?;
    let machine_type = ty.strip_suffix("-machine").unwrap_or(&ty).to_owned();
    let memory = ask(qmp, vm, "query-memory-size-summary", Value::Null).await?;
    let memory_mib = memory["base-memory"].as_u64().map_or(0, |b| u32::try_from(b >> 20).unwrap_or(u32::MAX));
    let cpus = ask(qmp, vm, "query-cpus-fast", Value::Null).await?;
    let cpus = cpus.as_array().map_or(1, |a| u32::try_from(a.len()).unwrap_or(1)).max(1);
    let kernel = machine_property(qmp, vm, "kernel").await?;
    let boot = if kernel.is_empty() {
        KernelBoot::firmware()
    } else {
        KernelBoot {
            kernel: kernel.into(),
            initrd: machine_property(qmp, vm, "initrd").await?.into(),
            append: machine_property(qmp, vm, "append").await?,
        }
    };
    let blocks = ask(qmp, vm, "query-block", Value::Null).await?;
    let nodes = ask(qmp, vm, "query-named-block-nodes", json!({"flat": true})).await?;
    let found = disks_of(vm, &blocks, &nodes)?;
    let mut disks = Vec::new();
    for (config, qemu_node, qdev) in found {
        let serial = match qdev {
            Some(path) => serial_of(qmp, &path).await,
            None => None,
        };
        disks.push(LearntDisk { config, qemu_node, serial });
    }
    let pci = ask(qmp, vm, "query-pci", Value::Null).await?;
    let has_virtio_serial = has_virtio_serial(&pci);
    Ok(Learnt { name, accel, boot, machine_type, memory_mib, cpus, disks, has_virtio_serial })
}

/// Pure: whether a `query-pci` reply shows a virtio console (virtio-serial) device, by its
/// PCI ids: vendor 0x1af4, device 0x1003 (transitional) or 0x1043 (modern).
pub fn has_virtio_serial(pci: &Value) -> bool {
    let buses = pci.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut devices: Vec<&Value> = Vec::new();
    let mut stack: Vec<&Value> = buses.iter().flat_map(|b| b["devices"].as_array().into_iter().flatten()).collect();
    // Bridges hold devices of their own; walked with a bound, the reply is QEMU's but large.
    while let Some(d) = stack.pop() {
        if devices.len() > 4096 {
            break;
        }
        devices.push(d);
        stack.extend(d["pci_bridge"]["devices"].as_array().into_iter().flatten());
    }
    devices
        .iter()
        .any(|d| d["id"]["vendor"] == json!(0x1af4) && matches!(d["id"]["device"].as_u64(), Some(0x1003 | 0x1043)))
}

/// The serial a disk's device shows the guest; None if it has none (or QEMU will not say).
async fn serial_of(qmp: &Qmp, qdev: &str) -> Option<String> {
    let v = qmp.execute_raw("qom-get", json!({"path": qdev, "property": "serial"}), deadline::QMP_COMMAND).await;
    v.ok()?.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

#[derive(Deserialize)]
struct BlockInfo {
    #[serde(default)]
    device: String,
    #[serde(default)]
    qdev: Option<String>,
    #[serde(default)]
    removable: bool,
    #[serde(default)]
    inserted: Option<Inserted>,
}

#[derive(Deserialize)]
struct Inserted {
    #[serde(rename = "node-name")]
    node_name: Option<String>,
    #[serde(default)]
    ro: bool,
}

#[derive(Deserialize)]
struct NodeInfo {
    #[serde(rename = "node-name")]
    node_name: Option<String>,
    drv: String,
    file: String,
}

/// Pure: the disks quiesce backs up, from `query-block` and `query-named-block-nodes`
/// replies, each as (its config, QEMU's node name, the device's QOM path). Removable
/// media (CD-ROMs, floppies), read-only images and firmware flash are not disks of the
/// VM's own and are left out; anything else quiesce cannot copy is an error naming it.
pub fn disks_of(
    vm: &str,
    blocks: &Value,
    nodes: &Value,
) -> Result<Vec<(DiskConfig, String, Option<String>)>, AttachError> {
    let bad = |disk: &str, why: String| AttachError::Disk { vm: vm.to_owned(), disk: disk.to_owned(), why };
    let blocks: Vec<BlockInfo> = serde_json::from_value(blocks.clone())
        .map_err(|e| bad("?", format!("query-block replied with something unexpected: {e}")))?;
    let nodes: Vec<NodeInfo> = serde_json::from_value(nodes.clone())
        .map_err(|e| bad("?", format!("query-named-block-nodes replied with something unexpected: {e}")))?;
    let mut out: Vec<(DiskConfig, String, Option<String>)> = Vec::new();
    for b in blocks {
        let Some(ins) = b.inserted else { continue };
        let qdev = b.qdev.filter(|q| !q.is_empty());
        if b.removable || ins.ro || b.device.starts_with("pflash") || qdev.is_none() {
            continue;
        }
        let shown = if b.device.is_empty() { qdev.clone().unwrap_or_default() } else { b.device.clone() };
        let Some(node) = ins.node_name else {
            return Err(bad(&shown, "QEMU names no node for it".into()));
        };
        let Some(info) = nodes.iter().find(|n| n.node_name.as_deref() == Some(node.as_str())) else {
            return Err(bad(&shown, format!("node {node} is not in query-named-block-nodes")));
        };
        let format = match info.drv.as_str() {
            "qcow2" => DiskFormat::Qcow2,
            "raw" => DiskFormat::Raw,
            "vpc" => DiskFormat::Vpc,
            "vhdx" => DiskFormat::Vhdx,
            other => {
                return Err(bad(
                    &shown,
                    format!("its node {node} is a {other} node; quiesce backs up qcow2, raw, vpc and vhdx images attached directly (no filters)"),
                ))
            }
        };
        let path = PathBuf::from(&info.file);
        match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(m) if m.file_type().is_block_device() => {
                return Err(bad(
                    &shown,
                    format!("{} is a host block device (pass-through), which quiesce does not back up", info.file),
                ))
            }
            Ok(_) => return Err(bad(&shown, format!("{} is not an image file", info.file))),
            Err(e) => return Err(bad(&shown, format!("quiesce cannot read its image {}: {e}", info.file))),
        }
        // The name in the backup: the user's node name, else the drive's or device's name.
        let last = qdev.as_deref().map(|q| q.trim_end_matches("/virtio-backend").rsplit('/').next().unwrap_or(q));
        let wanted = [
            Some(node.as_str()).filter(|n| !n.starts_with('#')),
            Some(b.device.as_str()).filter(|d| !d.is_empty()),
            last,
        ]
        .into_iter()
        .flatten()
        .next()
        .unwrap_or("disk");
        let mut name = node_safe(wanted);
        let mut n = 1;
        while out.iter().any(|(d, _, _)| d.node_name == name) {
            n += 1;
            name = format!("{}-{n}", node_safe(wanted));
        }
        out.push((DiskConfig { node_name: name, path, format, read_only: false }, node, qdev));
    }
    if out.is_empty() {
        return Err(AttachError::NoDisks { vm: vm.to_owned() });
    }
    Ok(out)
}

/// `s` as a QEMU node name and a file name: letters, digits, `-`, `_` and `.`, starting
/// with a letter, at most 31 characters (QEMU's limit for node names).
pub fn node_safe(s: &str) -> String {
    let mut out: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' }).collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out.insert(0, 'd');
    }
    out.truncate(31);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(dir: &Path, name: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, b"").unwrap();
        p.display().to_string()
    }

    #[test]
    fn drive_and_blockdev_disks_are_learnt_with_usable_names() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (img(dir.path(), "a.qcow2"), img(dir.path(), "b.raw"), img(dir.path(), "c.qcow2"));
        // As QEMU 10 answers for: -drive if=virtio; -blockdev node-name=data + virtio-scsi
        // scsi-hd; -drive if=ide; plus an empty CD-ROM and a CD with a medium.
        let blocks = json!([
            {"device": "virtio0", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend", "removable": false,
             "inserted": {"node-name": "#block142", "ro": false}},
            {"device": "", "qdev": "sd0", "removable": false, "inserted": {"node-name": "data", "ro": false}},
            {"device": "ide0-hd0", "qdev": "/machine/unattached/device[20]", "removable": false,
             "inserted": {"node-name": "#block512", "ro": false}},
            {"device": "ide2-cd0", "qdev": "/machine/unattached/device[23]", "removable": true},
            {"device": "ide1-cd0", "qdev": "/machine/unattached/device[24]", "removable": true,
             "inserted": {"node-name": "#block9", "ro": true}}
        ]);
        let nodes = json!([
            {"node-name": "#block142", "drv": "qcow2", "file": a},
            {"node-name": "#block011", "drv": "file", "file": a},
            {"node-name": "data", "drv": "raw", "file": b},
            {"node-name": "#block512", "drv": "qcow2", "file": c}
        ]);
        let got = disks_of("vm", &blocks, &nodes).unwrap();
        let names: Vec<(&str, &str)> = got.iter().map(|(d, n, _)| (d.node_name.as_str(), n.as_str())).collect();
        assert_eq!(names, [("virtio0", "#block142"), ("data", "data"), ("ide0-hd0", "#block512")]);
        assert_eq!(got[1].0.format, DiskFormat::Raw);
    }

    #[test]
    fn filters_devices_and_unreadable_images_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let a = img(dir.path(), "a.qcow2");
        let blocks = json!([{"device": "drive0", "qdev": "disk0", "inserted": {"node-name": "#block1"}}]);
        let throttled = json!([{"node-name": "#block1", "drv": "throttle", "file": a}]);
        let e = disks_of("vm", &blocks, &throttled).unwrap_err().to_string();
        assert!(e.contains("drive0") && e.contains("throttle"), "{e}");
        let gone = json!([{"node-name": "#block1", "drv": "qcow2", "file": "/nonexistent/x.qcow2"}]);
        let e = disks_of("vm", &blocks, &gone).unwrap_err().to_string();
        assert!(e.contains("cannot read its image /nonexistent/x.qcow2"), "{e}");
        let e = disks_of("vm", &json!([]), &json!([])).unwrap_err();
        assert!(matches!(e, AttachError::NoDisks { .. }));
        assert!(disks_of("vm", &json!({"not": "a list"}), &json!([])).is_err());
    }

    #[test]
    fn a_virtio_serial_device_is_seen_also_behind_a_bridge() {
        let dev = |vendor: u64, device: u64| json!({"id": {"vendor": vendor, "device": device}});
        let flat = json!([{"bus": 0, "devices": [dev(0x8086, 0x29c0), dev(0x1af4, 0x1003)]}]);
        assert!(has_virtio_serial(&flat));
        let bridged = json!([{"bus": 0, "devices": [{"id": {"vendor": 0x1b36, "device": 0xc},
            "pci_bridge": {"devices": [dev(0x1af4, 0x1043)]}}]}]);
        assert!(has_virtio_serial(&bridged));
        assert!(!has_virtio_serial(&json!([{"bus": 0, "devices": [dev(0x1af4, 0x1001)]}])));
        assert!(!has_virtio_serial(&json!("x")));
    }

    #[test]
    fn names_become_valid_node_names() {
        assert_eq!(node_safe("#block123"), "d-block123");
        assert_eq!(node_safe("my disk,1"), "my-disk-1");
        assert_eq!(node_safe("0abc"), "d0abc");
        assert_eq!(node_safe(&"x".repeat(50)).len(), 31);
    }
}
