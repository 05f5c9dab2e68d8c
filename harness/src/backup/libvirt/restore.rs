//! Restoring a libvirt domain's Saved State backup, through libvirt.
//!
//! Why through libvirt: a libvirt save image holds QEMU's migration stream of the devices
//! libvirt built for the domain (its PCIe root ports, controllers, their order and
//! addresses), which only libvirt's command line for that XML reproduces; `quiesce
//! restore`'s own QEMU has other devices, and the stream does not load there. libvirt
//! itself restores it (`virsh restore`), from a copy of the image whose XML is rewritten:
//!
//! - a new name and no UUID (libvirt makes one), so it runs beside the backed-up domain,
//!   which may still run on the same libvirtd (a `virsh restore --xml` would not do: libvirt
//!   refuses an XML whose UUID differs from the saved one);
//! - each backed-up disk on an overlay of the restore's own over the backup's image (opened
//!   read-only), any `<backingStore>` dropped so libvirt reads the chain from the overlay;
//! - the agent's channel on a socket in the restore's folder, file serial consoles to a log
//!   there, and a QMP monitor for quiesce (`<qemu:commandline>` -qmp; libvirt keeps its
//!   own), so the checks attach to it as to any QEMU quiesce did not start. The agent is
//!   asked through libvirt, which is its client (QEMU serves one client per socket).
//!
//! The restored domain is transient (nothing is defined) and started paused; it is
//! destroyed when the restore is dropped, and its folder removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::save_image::{self, SaveImageError};
use super::virsh::{self, Virsh, VirshError};
use crate::backup::folder::Backup;
use crate::backup::manifest::{Entry, Method, VmBackup};
use crate::qemu::{AttachOptions, Machine};

/// The file a libvirt domain's backup keeps its XML in (`virsh dumpxml --migratable`); it
/// marks the backup as a libvirt domain's.
pub const DOMAIN_XML: &str = "libvirt-domain.xml";
/// libvirt's namespace for QEMU command-line arguments.
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// `virsh restore` of a 256 MiB to few-GiB state under TCG on a loaded host.
const RESTORE: Duration = Duration::from_secs(300);

/// Why a libvirt Saved State backup was not restored; anything started was destroyed.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtRestoreError {
    /// libvirt (virsh) refused or failed; its words follow.
    #[error(transparent)]
    Virsh(#[from] VirshError),
    /// The backup's state file is not a save image quiesce can restore.
    #[error("VM {vm}: the saved state {}: {source}", .path.display())]
    SaveImage { vm: String, path: PathBuf, source: SaveImageError },
    /// The domain XML in the save image cannot be rewritten for the restore.
    #[error("VM {vm}: the saved domain XML: {why}")]
    Xml { vm: String, why: String },
    /// The backup lacks what this restore needs (a state, a disk named in the XML).
    #[error("VM {vm}: {why}")]
    Backup { vm: String, why: String },
    /// Setting up the restore's folder or overlays failed.
    #[error("VM {vm}: {what}: {source}")]
    Io { vm: String, what: String, source: std::io::Error },
    /// quiesce could not reach the restored domain's QEMU by the monitor it gave it.
    #[error("VM {vm}: attaching to the restored domain: {source}")]
    Attach { vm: String, source: crate::qemu::AttachError },
}

/// Whether `vm` is a libvirt domain's Saved State backup (restored by [`restore`]).
pub fn is_libvirt_saved_state(vm: &VmBackup) -> bool {
    vm.method == Method::SavedState && vm.files.iter().any(|f| f.file == DOMAIN_XML)
}

/// A restored domain: running paused until continued through `machine`.
pub struct LibvirtRestored {
    // Drop order: the domain (destroyed) before the folder holding its overlays.
    pub machine: Machine,
    pub guard: DomainGuard,
    /// The restored disks, as (target, overlay path).
    pub disks: Vec<(String, PathBuf)>,
    pub restore_ms: f64,
    /// The QMP monitor quiesce gave the restored QEMU (libvirt keeps its own).
    pub qmp_socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl LibvirtRestored {
    /// Powers the restored domain off (see [`DomainGuard::shut_down`]), then removes its
    /// folder.
    pub async fn shut_down(self, timeout: Duration) -> Result<(), VirshError> {
        let LibvirtRestored { machine, guard, _dir, .. } = self;
        drop(machine);
        guard.shut_down(timeout).await
    }
}

/// Destroys the transient restored domain when dropped (or by [`DomainGuard::shut_down`]).
pub struct DomainGuard {
    virsh: Virsh,
    pub name: String,
    done: bool,
}

impl DomainGuard {
    /// Powers the guest off through its agent (libvirt's `shutdown --mode agent`) and waits
    /// for the domain to end; destroys it if it has not within `timeout`.
    pub async fn shut_down(mut self, timeout: Duration) -> Result<(), VirshError> {
        let asked = self.virsh.run(&["shutdown", &self.name, "--mode", "agent"], virsh::COMMAND).await;
        let until = std::time::Instant::now() + timeout;
        while asked.is_ok() && std::time::Instant::now() < until {
            // A transient domain is gone from libvirt once its QEMU has ended.
            if self.virsh.run(&["domstate", &self.name], virsh::COMMAND).await.is_err() {
                self.done = true;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.done = true;
        let r = self.virsh.run(&["destroy", &self.name], virsh::COMMAND).await.map(drop);
        asked.map(drop).and(r)
    }
}

impl DomainGuard {
    /// Waits until the restored guest's agent answers through libvirt (libvirt is the
    /// agent's client on the domain's channel: a second client would not be served).
    pub async fn wait_agent(&self, timeout: Duration) -> Result<(), VirshError> {
        let until = std::time::Instant::now() + timeout;
        loop {
            let ping = self.virsh.agent(&self.name, "guest-ping", Duration::from_secs(5)).await;
            match ping {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() >= until => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// What the guest check of a restore judges, asked through libvirt's agent connection:
    /// the agent's `guest-fsfreeze-status` reply and the guest's `/proc/mounts` (bounded).
    /// The verdict is `verify::guest::judge_restored`'s, a layer above this one.
    pub async fn guest_state(&self) -> Result<(serde_json::Value, String), VirshError> {
        let agent_timeout = crate::sys::deadline::AGENT_COMMAND;
        let frozen = self.virsh.agent(&self.name, "guest-fsfreeze-status", agent_timeout).await?;
        let exec = serde_json::json!({"execute": "guest-exec", "arguments": {
            "path": "/bin/sh", "arg": ["-c", "sync && cat /proc/mounts"], "capture-output": true}});
        let started = self.virsh.agent_json(&self.name, &exec, agent_timeout).await?;
        let bad = |why: String| VirshError::Other { args: format!("qemu-agent-command {} guest-exec", self.name), why };
        let pid = started["pid"].as_i64().ok_or_else(|| bad(format!("no pid in {started}")))?;
        let until = std::time::Instant::now() + crate::sys::deadline::guest_exec();
        let status: qapi::qga::GuestExecStatus = loop {
            let q = serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
            let reply = self.virsh.agent_json(&self.name, &q, agent_timeout).await?;
            let st: qapi::qga::GuestExecStatus =
                serde_json::from_value(reply).map_err(|e| bad(format!("its guest-exec-status reply: {e}")))?;
            if st.exited {
                break st;
            }
            if std::time::Instant::now() >= until {
                return Err(bad("the guest's `cat /proc/mounts` did not finish in time".into()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut out = status.out_data.unwrap_or_default();
        out.truncate(crate::qemu::exec::MAX_OUTPUT);
        Ok((frozen, String::from_utf8_lossy(&out).into_owned()))
    }
}

impl Drop for DomainGuard {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.virsh.run_blocking(&["destroy", &self.name], virsh::COMMAND);
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// What the restore changes in the saved XML.
#[derive(Debug, Clone)]
pub struct Rewrite<'a> {
    pub name: &'a str,
    /// Per backed-up disk: its target and the restore's overlay.
    pub disks: &'a [(String, PathBuf)],
    pub agent_socket: &'a Path,
    pub qmp_socket: &'a Path,
    pub serial_log: &'a Path,
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

/// Pure: the saved domain XML rewritten for the restore (see the module notes).
pub fn rewrite_xml(xml: &str, r: &Rewrite) -> Result<String, String> {
    if xml.len() > super::domain::MAX_XML_BYTES {
        return Err(format!("it is {} bytes, more than quiesce reads", xml.len()));
    }
    if xml.contains(QEMU_NS) {
        return Err("it passes its own arguments to QEMU (libvirt's qemu namespace); quiesce's restore adds a QMP monitor there and does not merge them".into());
    }
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("it does not parse: {e}"))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err("no <domain> at its root".into());
    }
    // Edits as (byte range, replacement); ranges never overlap.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let name = child(root, "name").ok_or("no <name>")?;
    edits.push((name.range(), format!("<name>{}</name>", esc(r.name))));
    if let Some(uuid) = child(root, "uuid") {
        edits.push((uuid.range(), String::new()));
    }
    let devices = child(root, "devices").ok_or("no <devices>")?;
    let mut found = Vec::new();
    for d in devices.children().filter(|c| c.has_tag_name("disk")) {
        let target = child(d, "target").and_then(|t| t.attribute("dev")).unwrap_or("");
        let Some((_, overlay)) = r.disks.iter().find(|(t, _)| t == target) else { continue };
        found.push(target.to_owned());
        let source = child(d, "source").ok_or_else(|| format!("disk {target} has no <source>"))?;
        edits.push((source.range(), format!("<source file='{}'/>", esc(&overlay.to_string_lossy()))));
        if let Some(b) = child(d, "backingStore") {
            edits.push((b.range(), String::new()));
        }
        let driver = child(d, "driver").ok_or_else(|| format!("disk {target} has no <driver>"))?;
        let attrs: String = driver
            .attributes()
            .filter(|a| a.name() != "type")
            .map(|a| format!(" {}='{}'", a.name(), esc(a.value())))
            .collect();
        edits.push((driver.range(), format!("<driver{attrs} type='qcow2'/>")));
    }
    if let Some((t, _)) = r.disks.iter().find(|(t, _)| !found.contains(t)) {
        return Err(format!("the backup's disk {t} is not in it"));
    }
    let mut agent = false;
    for c in devices.children().filter(|c| c.is_element()) {
        let tag = c.tag_name().name();
        let target = child(c, "target");
        let is_agent =
            tag == "channel" && target.is_some_and(|t| t.attribute("name") == Some(super::domain::AGENT_CHANNEL));
        let new_source = if is_agent {
            agent = true;
            if c.attribute("type") != Some("unix") {
                return Err("its agent channel is not a unix socket".into());
            }
            format!("<source mode='bind' path='{}'/>", esc(&r.agent_socket.to_string_lossy()))
        } else if matches!(tag, "serial" | "console") && c.attribute("type") == Some("file") {
            format!("<source path='{}'/>", esc(&r.serial_log.to_string_lossy()))
        } else {
            continue;
        };
        match (child(c, "source"), target) {
            (Some(s), _) => edits.push((s.range(), new_source)),
            (None, Some(t)) => edits.push((t.range().start..t.range().start, new_source)),
            (None, None) => return Err(format!("its <{tag}> has neither <source> nor <target>")),
        }
    }
    if !agent {
        return Err("it has no guest agent channel; the restore's checks need one".into());
    }
    // The namespace on <domain>, the monitor before </domain>.
    let open = root.range().start + "<domain".len();
    edits.push((open..open, format!(" xmlns:qemu='{QEMU_NS}'")));
    let close = xml[..root.range().end].rfind("</domain>").ok_or("no </domain>")?;
    let monitor = format!("unix:{},server=on,wait=off", r.qmp_socket.to_string_lossy().replace(',', ",,"));
    edits.push((
        close..close,
        format!(
            "  <qemu:commandline>\n    <qemu:arg value='-qmp'/>\n    <qemu:arg value='{}'/>\n  </qemu:commandline>\n",
            esc(&monitor)
        ),
    ));
    edits.sort_by_key(|(r, _)| std::cmp::Reverse((r.start, r.end)));
    let mut out = xml.to_owned();
    for (range, text) in edits {
        out.replace_range(range, &text);
    }
    Ok(out)
}

/// Restores `vm` (a libvirt domain's Saved State backup) as a new transient domain on
/// libvirt at `connect`, started paused with its state loaded.
pub async fn restore(
    backup: &Backup,
    vm: &str,
    connect: Option<String>,
) -> Result<LibvirtRestored, LibvirtRestoreError> {
    let started = std::time::Instant::now();
    let vb = backup.vm(vm).ok_or_else(|| LibvirtRestoreError::Backup { vm: vm.into(), why: "no such VM".into() })?;
    let io = |what: &str| {
        let vm = vm.to_owned();
        let what = what.to_owned();
        move |source| LibvirtRestoreError::Io { vm, what, source }
    };
    let state = vb
        .state
        .as_ref()
        .ok_or_else(|| LibvirtRestoreError::Backup { vm: vm.into(), why: "the backup has no saved state".into() })?;
    let state_path = backup
        .file_path(vm, &Entry::State, &state.file)
        .map_err(|e| LibvirtRestoreError::Backup { vm: vm.into(), why: e.to_string() })?;
    let image = save_image::read(&state_path).map_err(|source| LibvirtRestoreError::SaveImage {
        vm: vm.into(),
        path: state_path.clone(),
        source,
    })?;
    let virsh = Virsh::new(connect)?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("quiesce-{vm}-restore-libvirt-"))
        .tempdir()
        .map_err(io("make the restore's folder"))?;
    let mut disks = Vec::new();
    for d in &vb.disks {
        let base = backup
            .file_path(vm, &Entry::Disk(d.node_name.clone()), &d.file)
            .map_err(|e| LibvirtRestoreError::Backup { vm: vm.into(), why: e.to_string() })?;
        let overlay = dir.path().join(format!("{}.qcow2", d.node_name));
        crate::image::qemu_img::create_overlay(&base, d.format, &overlay)
            .map_err(|e| io("create a restore overlay")(std::io::Error::other(e)))?;
        disks.push((d.node_name.clone(), overlay));
    }
    let name = format!("{vm}-restored-{}", std::process::id());
    let (agent, qmp) = (dir.path().join("qga.sock"), dir.path().join("qmp.sock"));
    let serial_log = dir.path().join("serial.log");
    let rw = Rewrite { name: &name, disks: &disks, agent_socket: &agent, qmp_socket: &qmp, serial_log: &serial_log };
    let xml = rewrite_xml(&image.xml, &rw).map_err(|why| LibvirtRestoreError::Xml { vm: vm.into(), why })?;
    let new_image = dir.path().join("state.libvirt");
    let (from, to, img, x) = (state_path.clone(), new_image.clone(), image.clone(), xml.clone());
    tokio::task::spawn_blocking(move || save_image::rewrite(&from, &img, &x, &to))
        .await
        .map_err(|e| io("write the restore's save image")(std::io::Error::other(e)))?
        .map_err(|source| LibvirtRestoreError::SaveImage { vm: vm.into(), path: state_path.clone(), source })?;
    let restored = virsh.run(&["restore", &new_image.to_string_lossy(), "--paused"], RESTORE).await;
    // libvirt has read it (or failed): the copy is not needed either way.
    let _ = std::fs::remove_file(&new_image);
    // From here the domain may exist: the guard destroys it on every path.
    let guard = DomainGuard { virsh, name: name.clone(), done: false };
    restored?;
    // libvirt holds the agent's socket; the guest check goes through it.
    let opts = AttachOptions { name: Some(vm.to_owned()), ..AttachOptions::new(qmp.clone(), None) };
    let machine =
        crate::qemu::attach(&opts).await.map_err(|source| LibvirtRestoreError::Attach { vm: vm.into(), source })?;
    Ok(LibvirtRestored {
        machine,
        guard,
        disks,
        restore_ms: started.elapsed().as_secs_f64() * 1000.0,
        qmp_socket: qmp,
        _dir: dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The XML in a libvirt 9.0 save image of the test's domain (shortened).
    const SAVED: &str = r"<domain type='qemu'>
  <name>guest1</name>
  <uuid>f10e7531-780e-480c-8d96-53d88b7f3bda</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64' machine='pc-q35-10.0'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/vm/root.img' index='1'/>
      <backingStore type='file'><format type='raw'/><source file='/vm/base.img'/><backingStore/></backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <serial type='file'><source path='/vm/serial.log'/><target type='isa-serial' port='0'/></serial>
    <console type='file'><source path='/vm/serial.log'/><target type='serial' port='0'/></console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
  </devices>
</domain>";

    fn rw<'a>(disks: &'a [(String, PathBuf)]) -> Rewrite<'a> {
        Rewrite {
            name: "guest1-restored",
            disks,
            agent_socket: Path::new("/r/qga.sock"),
            qmp_socket: Path::new("/r/qmp,x.sock"),
            serial_log: Path::new("/r/serial.log"),
        }
    }

    #[test]
    fn the_saved_xml_is_pointed_at_the_restore() {
        let disks = [("vda".to_owned(), PathBuf::from("/r/vda.qcow2"))];
        let out = rewrite_xml(SAVED, &rw(&disks)).unwrap();
        let doc = roxmltree::Document::parse(&out).unwrap();
        let root = doc.root_element();
        let find = |tag: &'static str| root.descendants().filter(move |n| n.has_tag_name(tag));
        assert_eq!(find("name").next().unwrap().text(), Some("guest1-restored"));
        assert!(find("uuid").next().is_none());
        let sources: Vec<&str> = find("source").filter_map(|s| s.attribute("file").or(s.attribute("path"))).collect();
        assert_eq!(sources, ["/r/vda.qcow2", "/iso/x.iso", "/r/serial.log", "/r/serial.log", "/r/qga.sock"]);
        assert!(find("backingStore").next().is_none());
        let driver = find("driver").next().unwrap();
        assert_eq!((driver.attribute("type"), driver.attribute("cache")), (Some("qcow2"), Some("none")));
        // The PCI address, and so the device layout the stream needs, is kept.
        assert_eq!(find("address").next().unwrap().attribute("bus"), Some("0x02"));
        let args: Vec<&str> = find("arg").filter_map(|a| a.attribute("value")).collect();
        assert_eq!(args, ["-qmp", "unix:/r/qmp,,x.sock,server=on,wait=off"]);
    }

    #[test]
    fn what_the_restore_cannot_rewrite_is_named() {
        let gone = [("vdb".to_owned(), PathBuf::from("/r/vdb.qcow2"))];
        assert!(rewrite_xml(SAVED, &rw(&gone)).unwrap_err().contains("vdb is not in it"));
        let disks = [("vda".to_owned(), PathBuf::from("/r/vda.qcow2"))];
        let no_agent = SAVED.replace("org.qemu.guest_agent.0", "org.other");
        assert!(rewrite_xml(&no_agent, &rw(&disks)).unwrap_err().contains("no guest agent channel"));
        let ns = SAVED.replace("<domain type='qemu'>", &format!("<domain type='qemu' xmlns:qemu='{QEMU_NS}'>"));
        assert!(rewrite_xml(&ns, &rw(&disks)).unwrap_err().contains("qemu namespace"));
        assert!(rewrite_xml("<domain", &rw(&disks)).unwrap_err().contains("does not parse"));
    }
}
