//! Turns a [`MachineConfig`] into QEMU's arguments. Pure, so it is unit tested.
//!
//! The sockets are bound by the harness and handed to QEMU as inherited file descriptors
//! (`fd=N`): the harness connects before QEMU starts, so there is no polling for a socket
//! file to appear.

use std::path::Path;

use serde_json::json;

use super::config::MachineConfig;

/// Listening sockets QEMU inherits.
#[derive(Debug, Clone, Copy)]
pub struct Fds {
    pub qmp: i32,
    pub agent: Option<i32>,
}

/// QEMU's arguments; the serial console goes to `serial_log`, written by QEMU itself.
pub fn qemu_args(cfg: &MachineConfig, fds: Fds, serial_log: &Path) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("{},debug-threads=on", cfg.name.replace(',', "_"))]);
    push(&["-M", &cfg.machine_type, "-accel", cfg.accel.as_str()]);
    if cfg.accel == super::config::Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-m", &format!("{}M", cfg.memory_mib), "-smp", &cfg.cpus.to_string()]);
    // No default devices, no display, and a guest reboot ends QEMU instead of looping.
    push(&["-nodefaults", "-display", "none", "-no-user-config", "-no-reboot"]);
    if !cfg.boot.is_firmware() {
        push(&["-kernel", &cfg.boot.kernel.to_string_lossy(), "-initrd", &cfg.boot.initrd.to_string_lossy()]);
        push(&["-append", &cfg.boot.append]);
    }
    push(&[
        "-chardev",
        &format!("socket,id=qmp,fd={},server=on,wait=off", fds.qmp),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    // Commas in option values are escaped by doubling them.
    let serial_path = serial_log.to_string_lossy().replace(',', ",,");
    push(&["-chardev", &format!("file,id=serial0,path={serial_path}"), "-serial", "chardev:serial0"]);
    if let Some(fd) = fds.agent {
        push(&["-chardev", &format!("socket,id=qga0,fd={fd},server=on,wait=off")]);
        push(&["-device", "virtio-serial-pci,id=vser0"]);
        push(&["-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"]);
    }
    for d in &cfg.disks {
        // JSON syntax keeps paths with commas intact; the format is always explicit.
        let node = json!({
            "driver": d.format.driver(),
            "node-name": d.node_name,
            "read-only": d.read_only,
            "file": {
                "driver": "file",
                "filename": d.path,
                "node-name": format!("{}-file", d.node_name),
                "read-only": d.read_only,
            },
        });
        push(&["-blockdev", &node.to_string()]);
        // werror=enospc: a write that finds its volume full (a full snapshot volume) is
        // held and the VM paused with BLOCK_IO_ERROR, never failed to the guest; a backup
        // relies on that to merge and continue with nothing lost. QEMU's default, written
        // out so that no other default can creep in.
        let dev = format!("virtio-blk-pci,drive={0},id={0}-dev,serial={0},werror=enospc,rerror=report", d.node_name);
        push(&["-device", &dev]);
    }
    if cfg.start_paused {
        push(&["-S"]);
    }
    if cfg.incoming_defer {
        push(&["-incoming", "defer"]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::config::{Accel, DiskConfig, DiskFormat, KernelBoot};

    fn cfg() -> MachineConfig {
        let mut c = MachineConfig::new(
            "vm1",
            Accel::Tcg,
            KernelBoot { kernel: "/k".into(), initrd: "/i".into(), append: "console=ttyS0 root=/dev/vda".into() },
        );
        c.disks.push(DiskConfig {
            node_name: "root".into(),
            path: "/a,b/root.qcow2".into(),
            format: DiskFormat::Qcow2,
            read_only: false,
        });
        c
    }

    #[test]
    fn disks_have_explicit_formats_and_serials() {
        let args = qemu_args(&cfg(), Fds { qmp: 3, agent: Some(5) }, Path::new("/run/x,y/serial.log"));
        let i = args.iter().position(|a| a == "-blockdev").unwrap();
        let node: serde_json::Value = serde_json::from_str(&args[i + 1]).unwrap();
        assert_eq!(node["driver"], "qcow2");
        assert_eq!(node["file"]["filename"], "/a,b/root.qcow2");
        assert_eq!(args[i + 3], "virtio-blk-pci,drive=root,id=root-dev,serial=root,werror=enospc,rerror=report");
    }

    #[test]
    fn sockets_are_inherited_fds() {
        let args = qemu_args(&cfg(), Fds { qmp: 3, agent: Some(5) }, Path::new("/run/x,y/serial.log")).join(" ");
        assert!(args.contains("socket,id=qmp,fd=3,server=on,wait=off"));
        assert!(args.contains("file,id=serial0,path=/run/x,,y/serial.log -serial chardev:serial0"));
        assert!(args.contains("name=org.qemu.guest_agent.0"));
        assert!(!args.contains("-cpu host"));
    }

    #[test]
    fn a_firmware_boot_has_no_kernel() {
        let mut c = cfg();
        c.boot = KernelBoot::firmware();
        let args = qemu_args(&c, Fds { qmp: 3, agent: Some(5) }, Path::new("/s.log")).join(" ");
        assert!(!args.contains("-kernel") && !args.contains("-append"), "{args}");
    }

    #[test]
    fn no_agent_no_port() {
        let mut c = cfg();
        c.agent = false;
        c.accel = Accel::Kvm;
        c.start_paused = true;
        c.incoming_defer = true;
        let args = qemu_args(&c, Fds { qmp: 3, agent: None }, Path::new("/s.log")).join(" ");
        assert!(!args.contains("virtserialport"));
        assert!(args.contains("-accel kvm -cpu host"));
        assert!(args.ends_with("-S -incoming defer"));
    }
}
