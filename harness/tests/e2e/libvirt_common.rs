//! What the libvirt tests share (`libvirt`, `libvirt_recovery`): libvirtd
//! started the way the benchmarks start it (quiesce-bench's `Libvirt`: the running one if
//! there is one, else one of its own in a mount namespace), a transient domain defined
//! from the cached Linux guest, and how a domain must be left.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use quiesce::image::{qemu_img, recipe};
use quiesce::qemu::{Accel, DiskFormat};
use quiesce::sys::{deadline, Tool};
use quiesce_bench::libvirt::{find_program, DomainSpec, Libvirt};
use serde_json::json;

pub const T: Duration = Duration::from_secs(60);
/// A whole `quiesce backup` or restore of a 256 MiB guest under TCG on a shared machine.
pub const BACKUP: Duration = Duration::from_secs(600);

pub fn quiesce() -> &'static str {
    env!("CARGO_BIN_EXE_quiesce")
}

/// `quiesce` run by a test, within `BACKUP`: its recovery journals go to a folder of the
/// tests' own, never to the user's ~/.local/state.
pub fn quiesce_tool<'a>() -> Tool<'a> {
    let state = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("libvirt-tests-state");
    Tool::new(quiesce(), BACKUP).env("QUIESCE_STATE_DIR", state)
}

/// Why this machine cannot run the test, if it cannot.
pub fn unavailable() -> Option<String> {
    for p in ["virsh", "libvirtd"] {
        if find_program(p).is_none() {
            return Some(format!("libvirt is not installed ({p} not found): apt-get install libvirt-daemon-system libvirt-clients (ci/setup-debian.sh does)"));
        }
    }
    if !nix::unistd::geteuid().is_root() && !Path::new("/run/libvirt/libvirt-sock").exists() {
        return Some("no libvirtd is running and starting one needs root".into());
    }
    None
}

/// The domain as quiesce must leave it: its state and each disk's source.
pub async fn look(lv: &Libvirt, name: &str) -> (String, String) {
    let state = lv.virsh(&["domstate", name], T).await.unwrap().trim().to_owned();
    let disks = lv.virsh(&["domblklist", name, "--details"], T).await.unwrap();
    (state, disks)
}

/// Asserts the domain is as it was: same state and disks, no snapshot recorded, no overlay
/// file left, the guest thawed and answering.
pub async fn as_it_was(lv: &Libvirt, name: &str, before: &(String, String), dir: &Path) {
    assert_eq!(&look(lv, name).await, before, "the domain is not as it was");
    let snaps = lv.virsh(&["snapshot-list", name, "--name"], T).await.unwrap();
    assert!(snaps.trim().is_empty(), "snapshots left in libvirt's records: {snaps}");
    let left: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("-quiesce-overlay-"))
        .collect();
    assert!(left.is_empty(), "overlays left: {left:?}");
    let frozen = lv.agent(name, &json!({"execute": "guest-fsfreeze-status"}), T).await.unwrap();
    assert_eq!(frozen, json!("thawed"));
    let up = lv.guest_sh(name, "cat /proc/uptime", T).await.expect("the guest still runs commands");
    assert!(!up.trim().is_empty());
}

pub fn backup_args(lv: &Libvirt, name: &str, method: &str, out: &Path) -> Vec<String> {
    let mut a: Vec<String> =
        ["backup", "--libvirt", name, "--connect", lv.uri(), "--method", method].map(str::to_owned).to_vec();
    a.push(out.display().to_string());
    a
}

pub fn backup(lv: &Libvirt, name: &str, method: &str, out: &Path) -> quiesce::sys::Output {
    let o = Tool::new(quiesce(), BACKUP).args(backup_args(lv, name, method, out)).output().unwrap();
    eprintln!("{}\n{}", o.stdout_text(), o.stderr);
    o
}

pub fn no_backup_at(out: &Path) {
    assert!(!out.exists(), "{} was left", out.display());
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let partial = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(&format!(".{name}.partial")));
    assert!(!partial, "a partial backup was left beside {}", out.display());
}

/// A domain defined (transiently) from the cached Linux guest, with its own copies of the
/// files in `dir`; started, its agent answering.
pub async fn start_domain(lv: &Libvirt, image: &recipe::GuestImage, accel: Accel, dir: &Path, name: &str) {
    // The domain's own copies of the cached files (hard links where they can be).
    let own = |from: &Path, to: &str| {
        let to = dir.join(to);
        std::fs::hard_link(from, &to).or_else(|_| std::fs::copy(from, &to).map(|_| ())).unwrap();
        to
    };
    let base = own(&image.root, "base.img");
    let overlay = dir.join("root.qcow2");
    qemu_img::create_overlay(&base, DiskFormat::Raw, &overlay).unwrap();
    let boot = image.kernel_boot();
    let qemu = quiesce::qemu::config::default_qemu_binary();
    let emulator = if qemu.starts_with('/') { PathBuf::from(&qemu) } else { find_program(&qemu).unwrap() };
    let spec = DomainSpec {
        name: name.to_owned(),
        kvm: accel == Accel::Kvm,
        emulator,
        memory_mib: 256,
        cpus: 1,
        kernel: own(&boot.kernel, "vmlinuz"),
        initrd: own(&boot.initrd, "initrd.img"),
        cmdline: boot.append.clone(),
        overlay,
        backing: base,
        backing_format: "raw".into(),
        data_disks: vec![],
        serial_log: dir.join("serial.log"),
    };
    lv.create(&spec).await.expect("the domain starts");
    lv.wait_agent(name, &spec.serial_log, deadline::BOOT_TO_AGENT).await.expect("its agent answers");
}

/// libvirt (started or found) and the cached guest image, or why the test cannot run.
pub async fn setup() -> Result<(Libvirt, recipe::GuestImage, Accel), String> {
    if let Some(why) = unavailable() {
        return Err(why);
    }
    let image = recipe::ensure("linux", false, &mut |s| eprintln!("  {s}")).expect("the test guest image");
    let accel = quiesce::testguest::accel_for(&image, None).expect("an accelerator").accel;
    // Where KVM does not work, libvirt must not see /dev/kvm (see quiesce-bench's notes).
    let mask_kvm = accel != Accel::Kvm && Path::new("/dev/kvm").exists();
    let lv = Libvirt::start(mask_kvm, &mut |s| eprintln!("  {s}")).await.expect("libvirtd answers");
    eprintln!("libvirt: {}", lv.how);
    Ok((lv, image, accel))
}

/// The guest's uptime in seconds: it goes up while the guest runs.
pub async fn uptime(lv: &Libvirt, name: &str) -> f64 {
    let up = lv.guest_sh(name, "cat /proc/uptime", T).await.expect("the guest runs commands");
    up.split_whitespace().next().and_then(|u| u.parse().ok()).unwrap_or_else(|| panic!("uptime {up:?}"))
}

pub fn verify(dest: &Path) {
    let v = Tool::new(quiesce(), BACKUP).arg("verify").arg(dest).output().unwrap();
    assert!(v.status.success(), "quiesce verify: {}{}", v.stdout_text(), v.stderr);
}
