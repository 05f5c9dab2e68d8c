//! The saved-state benchmark's third baseline: `virsh save` / `virsh restore` of the same
//! guest under a libvirtd started by hand (see [`crate::libvirt`]).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quiesce::image::{qemu_img, GuestImage};
use quiesce::qemu::{Accel, DiskFormat};
use quiesce::sys::deadline;

use super::report::LibvirtNumbers;
use super::{settle, ROUNDS};
use crate::fill;
use crate::libvirt::{self, DomainSpec, DomainState, Libvirt, LibvirtError};

/// What the libvirt guest is made of and where its files go.
pub(super) struct LibvirtRun<'a> {
    pub(super) image: &'a GuestImage,
    pub(super) accel: Accel,
    pub(super) memory_mib: u32,
    /// What our guest was filled with; the libvirt guest gets the same.
    pub(super) fill_mib: u32,
    pub(super) dir: &'a Path,
    pub(super) deadline: Duration,
}

/// Boots the same guest under libvirt, fills it the same way, and times `virsh save` and
/// `virsh restore`. The daemon is stopped whatever happens.
pub(super) async fn libvirt_phase(
    run: &LibvirtRun<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<LibvirtNumbers, String> {
    // Where KVM does not work, libvirt must not see /dev/kvm (see crate::libvirt).
    let mask_kvm = run.accel != Accel::Kvm && Path::new("/dev/kvm").exists();
    let mut lv = Libvirt::start(mask_kvm, progress).await.map_err(|e| e.to_string())?;
    let result = libvirt_rounds(&lv, run, progress).await;
    progress("destroying the libvirt domain and stopping the daemons");
    // Blocking (virsh destroy, waits on pidfds): off the runtime's workers.
    let (lv, problems) = tokio::task::spawn_blocking(move || {
        let problems = lv.stop();
        (lv, problems)
    })
    .await
    .map_err(|e| format!("libvirt clean-up panicked: {e}"))?;
    let mut numbers = result.map_err(|e| e.to_string())?;
    if !problems.is_empty() {
        return Err(format!("clean-up failed: {}", problems.join("; ")));
    }
    numbers.how = lv.how.clone();
    Ok(numbers)
}

async fn libvirt_rounds(
    lv: &Libvirt,
    run: &LibvirtRun<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<LibvirtNumbers, LibvirtError> {
    let LibvirtRun { image, accel, memory_mib, fill_mib: target, dir: rd, deadline } = *run;
    let name = format!("quiesce-bench-{}", std::process::id());
    let overlay = lv.dir().join("root.qcow2");
    qemu_img::create_overlay(&image.root, DiskFormat::Raw, &overlay)
        .map_err(|e| LibvirtError::Io { what: "create the root overlay".into(), source: std::io::Error::other(e) })?;
    let qemu = quiesce::qemu::config::default_qemu_binary();
    let emulator =
        if qemu.starts_with('/') { PathBuf::from(&qemu) } else { libvirt::find_program(&qemu).unwrap_or(qemu.into()) };
    let serial_log = lv.dir().join("serial.log");
    let spec = DomainSpec {
        name: name.clone(),
        kvm: accel == Accel::Kvm,
        emulator,
        memory_mib,
        cpus: 1,
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        cmdline: image.cmdline.clone(),
        overlay,
        backing: image.root.clone(),
        backing_format: "raw".into(),
        data_disks: vec![],
        serial_log: serial_log.clone(),
    };
    progress(&format!("booting the same guest under libvirt ({name})"));
    lv.create(&spec).await?;
    lv.wait_agent(&name, &serial_log, deadline::BOOT_TO_AGENT).await?;
    progress(&format!("filling {target} MiB of the libvirt guest's RAM"));
    let out = lv.guest_sh(&name, &fill::script(target, fill::headroom_mib(memory_mib)), fill::FILL_DEADLINE).await?;
    let fill_mib = fill::parse_filled(&out).ok_or_else(|| LibvirtError::GuestExec {
        domain: name.clone(),
        what: format!("the fill script printed no size: {out:?}"),
    })?;
    let mut n = LibvirtNumbers { how: String::new(), fill_mib, save: vec![], restore: vec![], bytes: vec![] };
    for i in 0..ROUNDS {
        let file = rd.join(format!("virsh-{i}.save"));
        progress(&format!("virsh save, {}/{ROUNDS}", i + 1));
        settle().await;
        let t = Instant::now();
        lv.save(&name, &file, deadline).await?;
        n.save.push(t.elapsed().as_secs_f64());
        n.bytes.push(std::fs::metadata(&file).map(|m| m.blocks() * 512).unwrap_or(0));
        progress(&format!("virsh restore, {}/{ROUNDS}", i + 1));
        settle().await;
        let t = Instant::now();
        lv.restore(&name, &file, deadline).await?;
        n.restore.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(&file);
        let state = lv.state(&name).await?;
        if state != DomainState::Running {
            return Err(LibvirtError::GuestExec {
                domain: name.clone(),
                what: format!("is {state} after virsh restore, not running"),
            });
        }
    }
    // Not timed: the restored guest's agent answers.
    lv.wait_agent(&name, &serial_log, deadline::AGENT_AFTER_RESUME).await?;
    Ok(n)
}
