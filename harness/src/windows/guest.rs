//! Booting the Windows test guest in a scenario, from the image `quiesce image build
//! windows` cached: a private qcow2 overlay over the cached disk (the cache is never
//! written), the machine the recipe's install used (q35, SeaBIOS booting the first disk,
//! virtio-blk disks with their node names as serials, the `org.qemu.guest_agent.0` port),
//! and readiness as [`super::ready`] defines it (the agent answers and VSS is ready) under
//! the Windows boot deadline. What it returns is a [`TestGuest`], so the scenario runner
//! holds a Windows VM as it holds a Linux one.
//!
//! NEVER RUN AGAINST A LIVE WINDOWS GUEST. The scenario runner's use of it is driven in
//! tests by a scripted agent over a real QEMU booting no OS (`scenario/run/windows_tests.rs`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::deadline;
use super::ready::{self, ReadyError};
use crate::image::windows::cache::{self, BuiltImage};
use crate::image::windows::{plan, BUILD_COMMAND, RECIPE};
use crate::image::{recipe, GuestImage, ImageError};
use crate::qemu::accel::{AccelChoice, AccelError, Verdict};
use crate::qemu::{Accel, DiskFormat, KernelBoot, Machine, MachineError};
use crate::testguest::{self, GuestError, GuestOptions, TestGuest};

/// Why a Windows guest did not boot to ready.
#[derive(Debug, thiserror::Error)]
pub enum WindowsGuestError {
    /// No Windows image is built on this host.
    #[error("no Windows guest image is built; build it on a KVM host with `{BUILD_COMMAND}`")]
    NoImage,
    /// `auto` found no working KVM. Windows boots in a minute or two under KVM; under TCG
    /// it takes far longer than the boot deadline. Nothing was booted.
    #[error("refusing to boot Windows under TCG: {reason}. Run the Windows scenarios on a host with working KVM, or pass --accel tcg to try anyway (expect the {minutes} min boot deadline to pass)")]
    NeedsKvm { reason: String, minutes: u64 },
    /// `--accel`/`QUIESCE_ACCEL` names an accelerator this program does not know.
    #[error(transparent)]
    Accel(#[from] AccelError),
    /// The KVM probe boots the Linux guest's kernel, and it could not be built.
    #[error("the KVM probe needs the Linux guest's kernel: {0}")]
    Probe(#[from] ImageError),
    /// The probe could not resolve the accelerator, or the guest's disks could not be set
    /// up (the folder for them, or the private overlay over the cached Windows disk).
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// QEMU did not start.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Windows did not become ready: its agent never answered, or VSS never did.
    #[error("the Windows guest was not ready within {minutes} min: {error}")]
    NotReady { minutes: u64, error: ReadyError },
}

#[cfg(test)]
tokio::task_local! {
    /// TESTS ONLY: the image a test stands in for a built one (a blank disk under a QEMU
    /// that boots no OS; see `qemu::stand_in`).
    static STAND_IN_IMAGE: BuiltImage;
}

/// TESTS ONLY: runs `f` as if `image` were the built Windows image.
#[cfg(test)]
pub(crate) async fn with_image<F: std::future::Future>(image: BuiltImage, f: F) -> F::Output {
    STAND_IN_IMAGE.scope(image, f).await
}

/// The Windows image a scenario boots: the newest one built from this recipe.
pub fn image() -> Option<BuiltImage> {
    #[cfg(test)]
    if let Ok(img) = STAND_IN_IMAGE.try_with(Clone::clone) {
        return Some(img);
    }
    cache::latest()
}

/// The accelerator for a Windows guest: the one asked for, or KVM if `auto` finds it
/// working (probed with the Linux guest's kernel, as everywhere); never TCG unasked.
fn accel(choice: Option<AccelChoice>, progress: &mut dyn FnMut(&str)) -> Result<Verdict, WindowsGuestError> {
    match AccelChoice::from_env(choice)? {
        AccelChoice::Fixed(a) => {
            Ok(Verdict { accel: a, reason: "chosen explicitly (--accel or QUIESCE_ACCEL)".into(), cached: false })
        }
        AccelChoice::Auto => {
            let linux = recipe::ensure("linux", false, progress)?;
            let v = testguest::accel_for(&linux, Some(AccelChoice::Auto))?;
            match v.accel {
                Accel::Kvm => Ok(v),
                Accel::Tcg => {
                    Err(WindowsGuestError::NeedsKvm { reason: v.reason, minutes: deadline::BOOT.as_secs() / 60 })
                }
            }
        }
    }
}

/// The cached Windows image as a guest image: a disk booted by the firmware, no kernel.
fn guest_image(img: &BuiltImage) -> GuestImage {
    GuestImage {
        recipe: RECIPE.into(),
        key: img.info.recipe_key.clone(),
        dir: img.dir.clone(),
        kernel: PathBuf::new(),
        initrd: PathBuf::new(),
        root: img.disk.clone(),
        cmdline: String::new(),
    }
}

/// Boots the built Windows image as `opts` says (its root disk is an overlay named `root`,
/// the extra disks follow) and waits until it is ready for VSS.
pub async fn boot(opts: GuestOptions, progress: &mut dyn FnMut(&str)) -> Result<TestGuest, WindowsGuestError> {
    let img = image().ok_or(WindowsGuestError::NoImage)?;
    let what = format!("Windows ({})", img.info.edition);
    boot_disk(opts, &img.disk, DiskFormat::Qcow2, guest_image(&img), &what, progress).await
}

/// Boots a Windows image the user brought (a scenario's `image = { path, os = "windows" }`)
/// as [`boot`] boots the built one: from its own bootloader, under a private overlay (the
/// image is only ever the overlay's read-only backing file).
pub async fn boot_own(
    opts: GuestOptions,
    disk: &Path,
    format: DiskFormat,
    progress: &mut dyn FnMut(&str),
) -> Result<TestGuest, WindowsGuestError> {
    let image = GuestImage {
        recipe: "own".into(),
        key: String::new(),
        dir: disk.parent().map(Path::to_owned).unwrap_or_default(),
        kernel: PathBuf::new(),
        initrd: PathBuf::new(),
        root: disk.to_owned(),
        cmdline: String::new(),
    };
    boot_disk(opts, disk, format, image, &format!("Windows from {}", disk.display()), progress).await
}

async fn boot_disk(
    opts: GuestOptions,
    disk: &Path,
    format: DiskFormat,
    image: GuestImage,
    what: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<TestGuest, WindowsGuestError> {
    progress("choosing the accelerator");
    let verdict = accel(opts.accel, progress)?;
    let name = opts.name.clone();
    // The install's machine: q35 (MachineConfig's default), SeaBIOS (no kernel), at least the
    // install's CPU count, virtio-blk disks whose serials are their node names.
    let (mut cfg, disks) = testguest::machine_config(opts, verdict.accel, KernelBoot::firmware(), disk, format)?;
    cfg.cpus = cfg.cpus.max(plan::CPUS);
    progress(&format!(
        "booting {what} as {} under {}; ready when its agent answers and VSS is ready (deadline {} min)",
        name,
        verdict.accel.as_str().to_uppercase(),
        deadline::BOOT.as_secs() / 60
    ));
    let started = Instant::now();
    let mut machine = Machine::launch(cfg).await?;
    if let Err(error) = ready::wait_ready(&mut machine, deadline::BOOT).await {
        machine.mark_failed("the Windows guest did not become ready");
        return Err(WindowsGuestError::NotReady { minutes: deadline::BOOT.as_secs() / 60, error });
    }
    Ok(TestGuest::adopt(machine, image, verdict, started.elapsed(), disks))
}
