//! QEMU's command line for the Windows install, as plain data turned into arguments by a
//! pure function, so `--dry-run` prints exactly what would run and tests read it back.
//!
//! What peers do, and what this follows: q35 with SeaBIOS (which boots the Windows CD with
//! no "press any key" prompt on the first boot), the Windows ISO, virtio-win's and the
//! provisioning CD on the q35 AHCI ports, the target disk on virtio-blk (Setup loads
//! viostor from virtio-win through the answer file's DriverPaths), a virtio-serial port
//! named `org.qemu.guest_agent.0` for qemu-ga, COM1 to a file, a VGA device so QMP
//! `screendump` can keep a picture of a failure, no NIC. The guest reboots during Setup,
//! so there is no `-no-reboot`; it powers itself off at the end of its first logon.

use std::path::PathBuf;

use serde_json::json;

use crate::qemu::Accel;

#[derive(Debug, Clone, PartialEq)]
pub struct InstallPlan {
    pub qemu_binary: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub windows_iso: PathBuf,
    pub virtio_iso: PathBuf,
    pub provisioning_iso: PathBuf,
    /// The qcow2 Windows is installed onto.
    pub disk: PathBuf,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
}

/// The size of the target disk: Server 2022 with Desktop Experience takes about 12 GB
/// after Setup; the rest is room for the guest's own updates and logs.
pub const DISK_SIZE: u64 = 40 << 30;
/// Setup wants 2 GB at least; 4 GB keeps it off the page file.
pub const MEMORY_MIB: u32 = 4096;
pub const CPUS: u32 = 2;

fn esc(p: &std::path::Path) -> String {
    // QEMU option values escape a comma by doubling it.
    p.to_string_lossy().replace(',', ",,")
}

/// QEMU's arguments for the install.
pub fn qemu_args(p: &InstallPlan) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", "quiesce-windows-install", "-M", "q35", "-accel", p.accel.as_str()]);
    if p.accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-m", &format!("{}M", p.memory_mib), "-smp", &p.cpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-vga", "std"]);
    // The CD on the first boot only; every reboot of Setup after it starts from the disk.
    push(&["-boot", "once=d"]);
    for (i, (id, iso)) in
        [("cd-windows", &p.windows_iso), ("cd-virtio", &p.virtio_iso), ("cd-provision", &p.provisioning_iso)]
            .into_iter()
            .enumerate()
    {
        push(&["-drive", &format!("if=none,id={id},media=cdrom,readonly=on,format=raw,file={}", esc(iso))]);
        push(&["-device", &format!("ide-cd,drive={id},bus=ide.{i}")]);
    }
    let disk = json!({"driver": "qcow2", "node-name": "root",
                      "file": {"driver": "file", "filename": p.disk, "node-name": "root-file"}});
    push(&["-blockdev", &disk.to_string(), "-device", "virtio-blk-pci,drive=root,id=root-dev,serial=root"]);
    push(&["-chardev", &format!("socket,id=qmp,path={},server=on,wait=off", esc(&p.qmp_socket))]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    push(&["-chardev", &format!("socket,id=qga0,path={},server=on,wait=off", esc(&p.agent_socket))]);
    push(&["-device", "virtio-serial-pci,id=vser0"]);
    push(&["-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"]);
    push(&["-chardev", &format!("file,id=serial0,path={}", esc(&p.serial_log)), "-serial", "chardev:serial0"]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_install_command_line_has_what_setup_needs() {
        let p = InstallPlan {
            qemu_binary: "qemu-system-x86_64".into(),
            accel: Accel::Kvm,
            memory_mib: MEMORY_MIB,
            cpus: CPUS,
            windows_iso: "/isos/Win,2022.iso".into(),
            virtio_iso: "/isos/virtio-win.iso".into(),
            provisioning_iso: "/w/provision.iso".into(),
            disk: "/w/disk.qcow2".into(),
            serial_log: "/w/serial.log".into(),
            qmp_socket: "/w/qmp.sock".into(),
            agent_socket: "/w/qga.sock".into(),
        };
        let line = qemu_args(&p).join(" ");
        assert!(line.contains("-M q35 -accel kvm -cpu host -m 4096M -smp 2"), "{line}");
        assert!(line.contains("file=/isos/Win,,2022.iso -device ide-cd,drive=cd-windows,bus=ide.0"), "{line}");
        assert!(line.contains("ide-cd,drive=cd-provision,bus=ide.2"), "{line}");
        assert!(line.contains("virtio-blk-pci,drive=root"), "{line}");
        assert!(line.contains("name=org.qemu.guest_agent.0"), "{line}");
        assert!(line.contains("-serial chardev:serial0") && line.contains("-boot once=d"), "{line}");
        assert!(!line.contains("-no-reboot") && !line.contains("-kernel"), "{line}");
    }
}
