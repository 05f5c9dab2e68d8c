//! The domain XML of a benchmark guest: the test guest's kernel, initrd and command line
//! over a qcow2 overlay of its root image, data disks after it, and the agent channel.

use std::path::{Path, PathBuf};

/// A data disk after the root disk: a standalone image, on virtio-blk with `serial` as its
/// guest-visible serial (as quiesce's own launch gives each disk its node name).
#[derive(Debug, Clone)]
pub struct DataDisk {
    pub serial: String,
    pub path: PathBuf,
    /// QEMU's driver name of the image's format (`qcow2`, `raw`, ...).
    pub format: String,
}

/// What a domain is made of: the test guest's kernel, initrd and command line, a qcow2
/// overlay over its root image, any data disks, its RAM and vCPUs, and the agent's
/// virtio-serial port.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    pub name: String,
    pub kvm: bool,
    pub emulator: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub overlay: PathBuf,
    pub backing: PathBuf,
    pub backing_format: String,
    /// Attached after the root disk, as vdb, vdc, ...
    pub data_disks: Vec<DataDisk>,
    pub serial_log: PathBuf,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

fn escp(p: &Path) -> String {
    esc(&p.to_string_lossy())
}

/// The domain XML. ACPI is named explicitly: without it libvirt 9.0 passes `-no-acpi`,
/// which QEMU 10 no longer accepts. QEMU runs as root with the files left as they are
/// (static DAC label, no relabelling), as quiesce's own QEMU does.
pub fn domain_xml(d: &DomainSpec) -> String {
    format!(
        "<domain type='{ty}'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <currentMemory unit='MiB'>{mem}</currentMemory>
  <vcpu>{cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
{cpu}  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{overlay}'/>
      <backingStore type='file'>
        <format type='{bfmt}'/>
        <source file='{backing}'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <serial>root</serial>
    </disk>
{data}    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <console type='file'><source path='{serial}'/><target type='serial' port='0'/></console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
",
        ty = if d.kvm { "kvm" } else { "qemu" },
        // As quiesce's own launch does: the host CPU under KVM, QEMU's default under TCG.
        cpu = if d.kvm { "  <cpu mode='host-passthrough'/>\n" } else { "" },
        name = esc(&d.name),
        mem = d.memory_mib,
        cpus = d.cpus,
        kernel = escp(&d.kernel),
        initrd = escp(&d.initrd),
        cmdline = esc(&d.cmdline),
        emulator = escp(&d.emulator),
        overlay = escp(&d.overlay),
        bfmt = esc(&d.backing_format),
        backing = escp(&d.backing),
        data = data_disks_xml(&d.data_disks),
        serial = escp(&d.serial_log),
    )
}

/// The `<disk>` elements of the data disks, targets vdb onwards (at most 25 of them).
fn data_disks_xml(disks: &[DataDisk]) -> String {
    disks
        .iter()
        .zip(b'b'..=b'z')
        .map(|(d, letter)| {
            format!(
                "    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{path}'/>
      <backingStore/>
      <target dev='vd{letter}' bus='virtio'/>
      <serial>{serial}</serial>
    </disk>
",
                fmt = esc(&d.format),
                path = escp(&d.path),
                letter = letter as char,
                serial = esc(&d.serial),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_xml_names_the_backing_format_and_escapes() {
        let d = DomainSpec {
            name: "b&d".into(),
            kvm: false,
            emulator: "/usr/bin/qemu-system-x86_64".into(),
            memory_mib: 1024,
            cpus: 1,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "console=ttyS0 a='b'".into(),
            overlay: "/o.qcow2".into(),
            backing: "/root.img".into(),
            backing_format: "raw".into(),
            data_disks: vec![DataDisk { serial: "data1".into(), path: "/d1.qcow2".into(), format: "qcow2".into() }],
            serial_log: "/s.log".into(),
        };
        let x = domain_xml(&d);
        assert!(x.starts_with("<domain type='qemu'>"));
        assert!(x.contains("<name>b&amp;d</name>"));
        assert!(x.contains("<format type='raw'/>"));
        assert!(x.contains("<cmdline>console=ttyS0 a=&apos;b&apos;</cmdline>"));
        assert!(x.contains("name='org.qemu.guest_agent.0'"));
        assert!(x.contains("<memory unit='MiB'>1024</memory>"));
        assert!(x.contains("<source file='/d1.qcow2'/>"));
        assert!(x.contains("<target dev='vdb' bus='virtio'/>\n      <serial>data1</serial>"));
    }
}
