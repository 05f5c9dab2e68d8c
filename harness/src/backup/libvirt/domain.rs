//! A libvirt domain as its XML (`virsh dumpxml`) describes it: what a backup needs of it.
//! The XML is untrusted input (a person's domain, and libvirt's answer about it): its size
//! and disk count are bounded, and anything quiesce cannot back up is a clear error naming
//! the disk, before anything is touched.

use std::path::PathBuf;

use crate::qemu::{Accel, DiskFormat, KernelBoot};

/// More than any domain's XML (a few KiB, tens with many devices).
pub const MAX_XML_BYTES: usize = 4 << 20;
/// More disks than QEMU gives one machine's buses in practice.
pub const MAX_DISKS: usize = 64;
/// The guest agent's virtio-serial port, as libvirt names it in `<channel><target name>`.
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// Why a domain's XML cannot be used; nothing was touched.
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    /// libvirt's answer is larger than any domain XML should be.
    #[error("its XML is {0} bytes, more than the {MAX_XML_BYTES} quiesce reads")]
    TooLarge(usize),
    /// libvirt's answer is not well-formed XML.
    #[error("its XML does not parse: {0}")]
    Parse(#[from] roxmltree::Error),
    /// A part every domain has is missing or not what libvirt writes.
    #[error("its XML has {0}")]
    Missing(String),
    /// A disk quiesce cannot back up (a host device, network storage, a format it does
    /// not copy): the domain is not backed up at all, rather than backed up in part.
    #[error("disk {target}: {why}")]
    Disk { target: String, why: String },
    /// More disks than [`MAX_DISKS`].
    #[error("it has more than {MAX_DISKS} disks")]
    TooManyDisks,
    /// No disk to back up (only CD-ROMs, read-only images or none).
    #[error("it has no writable disk image to back up")]
    NoDisks,
}

/// One disk of the domain that the backup copies.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainDisk {
    /// libvirt's target name (`vda`, `sdb`): the disk's name in the backup and in virsh.
    pub target: String,
    /// The image at the top of its chain, as the domain runs now.
    pub path: PathBuf,
    pub format: DiskFormat,
    /// The serial the guest sees (`<serial>`), if it has one.
    pub serial: Option<String>,
}

/// What a backup needs of a domain.
#[derive(Debug, Clone, PartialEq)]
pub struct Domain {
    pub name: String,
    pub accel: Accel,
    /// As the live XML names it (`pc-q35-10.0`): QEMU's own machine type.
    pub machine_type: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub boot: KernelBoot,
    pub disks: Vec<DomainDisk>,
    /// A virtio-serial port for the guest agent (`<channel>` to org.qemu.guest_agent.0).
    pub agent_channel: bool,
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

fn text_of(n: roxmltree::Node, tag: &str) -> Option<String> {
    child(n, tag).and_then(|c| c.text()).map(|t| t.trim().to_owned())
}

/// A `<memory unit=...>` amount in MiB (libvirt's units; KiB when none is given).
fn mib(amount: u64, unit: &str) -> Option<u64> {
    let bytes: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" | "" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    amount.checked_mul(bytes).map(|b| b >> 20)
}

/// Pure: the domain described by `xml` (`virsh dumpxml` of a running domain). Removable
/// media and read-only disks are left out, as for a QEMU attached by its sockets.
pub fn parse(xml: &str) -> Result<Domain, DomainXmlError> {
    if xml.len() > MAX_XML_BYTES {
        return Err(DomainXmlError::TooLarge(xml.len()));
    }
    let doc = roxmltree::Document::parse(xml)?;
    let root = doc.root_element();
    let missing = |what: &str| DomainXmlError::Missing(what.to_owned());
    if !root.has_tag_name("domain") {
        return Err(missing("no <domain> at its root"));
    }
    let name = text_of(root, "name").filter(|n| !n.is_empty()).ok_or_else(|| missing("no <name>"))?;
    let accel = match root.attribute("type") {
        Some("kvm") => Accel::Kvm,
        Some("qemu") => Accel::Tcg,
        other => return Err(DomainXmlError::Missing(format!("a domain type {other:?}, not kvm or qemu"))),
    };
    let memory = child(root, "memory").ok_or_else(|| missing("no <memory>"))?;
    let amount: u64 =
        memory.text().unwrap_or("").trim().parse().map_err(|_| missing("a <memory> that is no number"))?;
    let memory_mib = mib(amount, memory.attribute("unit").unwrap_or(""))
        .and_then(|m| u32::try_from(m).ok())
        .filter(|&m| m > 0)
        .ok_or_else(|| missing("a <memory> quiesce cannot read"))?;
    let cpus: u32 = text_of(root, "vcpu").and_then(|v| v.parse().ok()).filter(|&c| c > 0).unwrap_or(1);
    let os = child(root, "os").ok_or_else(|| missing("no <os>"))?;
    let machine_type = child(os, "type").and_then(|t| t.attribute("machine")).unwrap_or("").to_owned();
    if machine_type.is_empty() {
        return Err(missing("no machine type in <os><type machine=...>"));
    }
    let boot = match text_of(os, "kernel").filter(|k| !k.is_empty()) {
        Some(kernel) => KernelBoot {
            kernel: kernel.into(),
            initrd: text_of(os, "initrd").unwrap_or_default().into(),
            append: text_of(os, "cmdline").unwrap_or_default(),
        },
        None => KernelBoot::firmware(),
    };
    let devices = child(root, "devices").ok_or_else(|| missing("no <devices>"))?;
    let mut disks = Vec::new();
    for d in devices.children().filter(|c| c.has_tag_name("disk")) {
        if let Some(disk) = disk_of(d)? {
            if disks.len() == MAX_DISKS {
                return Err(DomainXmlError::TooManyDisks);
            }
            disks.push(disk);
        }
    }
    if disks.is_empty() {
        return Err(DomainXmlError::NoDisks);
    }
    let agent_channel = devices.children().filter(|c| c.has_tag_name("channel")).any(|c| {
        child(c, "target")
            .is_some_and(|t| t.attribute("type") == Some("virtio") && t.attribute("name") == Some(AGENT_CHANNEL))
    });
    Ok(Domain { name, accel, machine_type, memory_mib, cpus, boot, disks, agent_channel })
}

/// One `<disk>`: Some if it is backed up, None if it is not the domain's own (a CD-ROM, a
/// floppy, a read-only or shareable image), an error if quiesce cannot copy it.
fn disk_of(d: roxmltree::Node) -> Result<Option<DomainDisk>, DomainXmlError> {
    let target = child(d, "target").and_then(|t| t.attribute("dev")).unwrap_or("").to_owned();
    if target.is_empty() || target.len() > 32 || !target.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(DomainXmlError::Disk {
            target: format!("{target:?}"),
            why: "its <target dev> is not a plain name".into(),
        });
    }
    let device = d.attribute("device").unwrap_or("disk");
    if device != "disk" || child(d, "readonly").is_some() || child(d, "shareable").is_some() {
        return Ok(None);
    }
    let bad = |why: String| DomainXmlError::Disk { target: target.clone(), why };
    let kind = d.attribute("type").unwrap_or("");
    if kind != "file" {
        return Err(bad(format!(
            "it is a disk of type {kind:?}; quiesce backs up image files (type 'file'), not host devices, volumes or network storage"
        )));
    }
    let path = child(d, "source").and_then(|s| s.attribute("file")).unwrap_or("");
    if path.is_empty() {
        return Err(bad("it has no <source file>".into()));
    }
    let format = match child(d, "driver").and_then(|x| x.attribute("type")).unwrap_or("raw") {
        "qcow2" => DiskFormat::Qcow2,
        "raw" => DiskFormat::Raw,
        "vpc" => DiskFormat::Vpc,
        "vhdx" => DiskFormat::Vhdx,
        other => return Err(bad(format!("its format is {other}; quiesce backs up qcow2, raw, vpc and vhdx"))),
    };
    let serial = text_of(d, "serial").filter(|s| !s.is_empty());
    Ok(Some(DomainDisk { target, path: path.into(), format, serial }))
}

/// Pure: each `<disk>`'s target and the file at the top of its chain, from a live XML.
/// What the put-back compares with the disks as they were.
pub fn sources(xml: &str) -> Result<Vec<(String, PathBuf)>, DomainXmlError> {
    if xml.len() > MAX_XML_BYTES {
        return Err(DomainXmlError::TooLarge(xml.len()));
    }
    let doc = roxmltree::Document::parse(xml)?;
    let devices = child(doc.root_element(), "devices").ok_or_else(|| DomainXmlError::Missing("no <devices>".into()))?;
    Ok(devices
        .children()
        .filter(|c| c.has_tag_name("disk"))
        .filter_map(|d| {
            let target = child(d, "target")?.attribute("dev")?.to_owned();
            let file = child(d, "source")?.attribute("file")?;
            Some((target, PathBuf::from(file)))
        })
        .take(MAX_DISKS * 4)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As libvirt 9.0 prints a running domain (shortened).
    const LIVE: &str = r#"<domain type='qemu' id='3'>
  <name>guest1</name>
  <memory unit='KiB'>262144</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-10.0'>hvm</type>
    <kernel>/var/lib/g/vmlinuz</kernel>
    <initrd>/var/lib/g/initrd.img</initrd>
    <cmdline>console=ttyS0 root=/dev/vda</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/g/root.qcow2' index='2'/>
      <backingStore type='file' index='3'><format type='raw'/><source file='/var/lib/g/base.img'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <serial>root</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/g/data &amp; more.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/3-guest1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
  </devices>
</domain>"#;

    #[test]
    fn a_live_domain_is_read() {
        let d = parse(LIVE).unwrap();
        assert_eq!((d.name.as_str(), d.accel, d.memory_mib, d.cpus), ("guest1", Accel::Tcg, 256, 2));
        assert_eq!(d.machine_type, "pc-q35-10.0");
        assert_eq!(d.boot.append, "console=ttyS0 root=/dev/vda");
        assert!(d.agent_channel);
        let disks: Vec<(&str, &str, DiskFormat, Option<&str>)> = d
            .disks
            .iter()
            .map(|x| (x.target.as_str(), x.path.to_str().unwrap(), x.format, x.serial.as_deref()))
            .collect();
        assert_eq!(
            disks,
            [
                ("vda", "/var/lib/g/root.qcow2", DiskFormat::Qcow2, Some("root")),
                ("vdb", "/var/lib/g/data & more.img", DiskFormat::Raw, None)
            ]
        );
        let s = sources(LIVE).unwrap();
        assert_eq!(s[0], ("vda".to_owned(), PathBuf::from("/var/lib/g/root.qcow2")));
        assert_eq!(s.len(), 2, "the CD-ROM has no source");
    }

    #[test]
    fn what_quiesce_cannot_back_up_is_named() {
        let block = LIVE.replace(
            "<disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>",
            "<disk type='block' device='disk'>\n      <driver name='qemu' type='raw'/>",
        );
        let e = parse(&block).unwrap_err().to_string();
        assert!(e.starts_with("disk vdb: it is a disk of type \"block\""), "{e}");
        let vmdk = LIVE.replace(
            "type='raw'/>\n      <source file='/var/lib/g/data",
            "type='vmdk'/>\n      <source file='/var/lib/g/data",
        );
        let e = parse(&vmdk).unwrap_err().to_string();
        assert!(e.contains("vdb") && e.contains("vmdk"), "{e}");
        let no_agent = LIVE.replace("org.qemu.guest_agent.0' state", "org.other' state");
        assert!(!parse(&no_agent).unwrap().agent_channel);
        let evil_target = LIVE.replace("dev='vdb'", "dev='../x'");
        assert!(parse(&evil_target).unwrap_err().to_string().contains("not a plain name"));
    }

    #[test]
    fn bad_xml_is_refused_clearly() {
        assert!(matches!(parse("<domain"), Err(DomainXmlError::Parse(_))));
        assert!(matches!(parse("<network/>"), Err(DomainXmlError::Missing(_))));
        assert!(matches!(parse(&" ".repeat(MAX_XML_BYTES + 1)), Err(DomainXmlError::TooLarge(_))));
        let many = LIVE.replace(
            "<disk type='file' device='cdrom'>",
            &format!(
                "{}<disk type='file' device='cdrom'>",
                "<disk type='file' device='disk'><source file='/x'/><target dev='vdz'/></disk>".repeat(MAX_DISKS + 1)
            ),
        );
        assert!(matches!(parse(&many), Err(DomainXmlError::TooManyDisks)));
        let cd_only = r"<domain type='kvm'><name>a</name><memory unit='MiB'>64</memory><os><type machine='pc'>hvm</type></os>
            <devices><disk type='file' device='cdrom'><target dev='hdc'/></disk></devices></domain>";
        assert!(matches!(parse(cd_only), Err(DomainXmlError::NoDisks)));
        assert_eq!(mib(4, "GiB"), Some(4096));
        assert_eq!(mib(u64::MAX, "GiB"), None);
        assert_eq!(mib(1, "furlong"), None);
    }
}
