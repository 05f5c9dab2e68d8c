//! The freeze-window benchmark's libvirt side: the same guest booted under libvirt, and one
//! timed `virsh snapshot-create-as --quiesce` whose freeze window is read from the daemon's
//! log.

use std::path::{Path, PathBuf};
use std::time::Instant;

use quiesce::image::{qemu_img, seed, GuestImage};
use quiesce::qemu::{Accel, DiskFormat};
use quiesce::sys::deadline;
use quiesce::workload;

use super::report::disks_label;
use super::{data_seed, LibvirtCase, MEMORY_MIB, SNAPSHOT_DEADLINE};
use crate::libvirt::{self, DataDisk, DomainSpec, Libvirt, LibvirtError};

fn lv_io(what: &str) -> impl FnOnce(std::io::Error) -> LibvirtError + '_ {
    move |source| LibvirtError::Io { what: what.to_owned(), source }
}

/// The part of the daemon's log written since `offset`.
fn read_log_from(path: &Path, offset: u64) -> Result<String, LibvirtError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(lv_io("open libvirtd's log"))?;
    f.seek(SeekFrom::Start(offset)).map_err(lv_io("read libvirtd's log"))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(lv_io("read libvirtd's log"))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A libvirt domain being measured.
#[derive(Debug)]
pub(super) struct Domain {
    pub(super) name: String,
    /// Its disks and files.
    pub(super) dir: PathBuf,
    /// Each disk's target and image when it started; every run returns to these.
    pub(super) chains: Vec<(String, PathBuf)>,
}

/// Boots the same guest under libvirt with `n` disks and mounts its data disks.
pub(super) async fn domain_up(
    lv: &Libvirt,
    image: &GuestImage,
    accel: Accel,
    n: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Domain, LibvirtError> {
    let name = format!("quiesce-freeze-{}-{n}", std::process::id());
    let dir = lv.dir().join(format!("{n}-disks"));
    std::fs::create_dir(&dir).map_err(lv_io("make a folder for the domain's disks"))?;
    let overlay = dir.join("root.qcow2");
    qemu_img::create_overlay(&image.root, DiskFormat::Raw, &overlay)
        .map_err(|e| LibvirtError::Io { what: "create the root overlay".into(), source: std::io::Error::other(e) })?;
    let mut data_disks = Vec::new();
    for k in 1..n {
        let s = data_seed(k);
        let path = seed::create(&dir, &s)
            .map_err(|e| LibvirtError::Io { what: "create a data disk".into(), source: std::io::Error::other(e) })?;
        data_disks.push(DataDisk { serial: s.name, path, format: "qcow2".into() });
    }
    let qemu = quiesce::qemu::config::default_qemu_binary();
    let emulator =
        if qemu.starts_with('/') { PathBuf::from(&qemu) } else { libvirt::find_program(&qemu).unwrap_or(qemu.into()) };
    let serial_log = dir.join("serial.log");
    let spec = DomainSpec {
        name: name.clone(),
        kvm: accel == Accel::Kvm,
        emulator,
        memory_mib: MEMORY_MIB,
        cpus: 1,
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        cmdline: image.cmdline.clone(),
        overlay,
        backing: image.root.clone(),
        backing_format: "raw".into(),
        data_disks: data_disks.clone(),
        serial_log: serial_log.clone(),
    };
    progress(&format!("{}: booting the same guest under libvirt ({name})", disks_label(n)));
    lv.create(&spec).await?;
    lv.wait_agent(&name, &serial_log, deadline::BOOT_TO_AGENT).await?;
    for d in &data_disks {
        lv.guest_sh(&name, &workload::mount_script(&d.serial, "ext4"), deadline::guest_exec()).await?;
    }
    let chains = lv.disks(&name).await?;
    Ok(Domain { name, dir, chains })
}

/// One timed `virsh snapshot-create-as --disk-only --quiesce --atomic --no-metadata`, its
/// window read from the daemon's log; then every new overlay is merged into the image
/// under it and removed, so the next run starts from the same chains.
pub(super) async fn libvirt_round(lv: &Libvirt, d: &Domain, i: usize, c: &mut LibvirtCase) -> Result<(), LibvirtError> {
    let name = &d.name;
    let offset = match lv.log_path() {
        Some(p) => std::fs::metadata(p).map_err(lv_io("read libvirtd's log"))?.len(),
        None => 0,
    };
    let t = Instant::now();
    lv.snapshot_disk_only(name, &format!("freeze{i}"), SNAPSHOT_DEADLINE).await?;
    let whole = t.elapsed().as_secs_f64() * 1000.0;
    let window = match lv.log_path() {
        Some(p) => Some(
            libvirt::freeze_window(&read_log_from(p, offset)?)
                .map_err(|source| LibvirtError::FreezeLog { domain: name.clone(), source })?,
        ),
        None => None,
    };
    let on = lv.disks(name).await?;
    for (target, _) in &on {
        lv.commit_top(name, target, deadline::BLOCK_MERGE).await?;
    }
    let now = lv.disks(name).await?;
    if now != d.chains {
        return Err(LibvirtError::GuestExec {
            domain: name.clone(),
            what: format!("after blockcommit the disks are {now:?}, not {:?}", d.chains),
        });
    }
    for (_, top) in on.iter().filter(|(_, p)| p.starts_with(&d.dir) && !d.chains.iter().any(|(_, c)| c == p)) {
        std::fs::remove_file(top).map_err(lv_io("remove a merged libvirt overlay"))?;
    }
    let s = &mut c.series;
    s.whole.push(whole);
    if let Some(w) = window {
        s.window.push(w.window_ms());
        s.freeze.push(w.guest_freeze_ms());
        s.host.push(w.host_ms());
        s.thaw.push(w.thaw_ms());
        c.frozen = w.frozen.or(c.frozen);
    }
    Ok(())
}
