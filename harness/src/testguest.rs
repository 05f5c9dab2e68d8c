//! Boots quiesce's own Linux test guest: the cached image, a private qcow2 overlay over its
//! root disk (the cached image is never written), the accelerator verdict, and a machine
//! guard. Everything it creates is removed when the [`TestGuest`] is dropped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::image::qemu_img::{self, QemuImgError};
use crate::image::{recipe, GuestImage, ImageError};
use crate::qemu::accel::{self, AccelChoice, AccelError, Verdict};
use crate::qemu::{Accel, DiskConfig, DiskFormat, KernelBoot, Machine, MachineConfig, MachineError};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest image could not be built or found in the cache.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// QEMU did not start, or the guest's agent did not answer in time.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The private overlay over the cached root disk could not be made.
    #[error("creating the root overlay: {0}")]
    Overlay(#[from] QemuImgError),
    /// The folder for the guest's disks could not be made.
    #[error("making a folder for the guest's disks: {0}")]
    Io(#[from] std::io::Error),
    /// The accelerator asked for (`--accel`, `QUIESCE_ACCEL`) is not one this program knows.
    #[error(transparent)]
    Accel(#[from] AccelError),
}

#[derive(Debug, Clone)]
pub struct GuestOptions {
    pub name: String,
    pub accel: Option<AccelChoice>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Extra disks after the root disk, which is always first and named `root`.
    pub extra_disks: Vec<DiskConfig>,
    pub artifacts_dir: Option<PathBuf>,
    /// Where the root overlay goes; by default a folder of its own, removed with the guest.
    pub disk_dir: Option<PathBuf>,
}

impl GuestOptions {
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            accel: None,
            memory_mib: 512,
            cpus: 1,
            extra_disks: Vec::new(),
            artifacts_dir: None,
            disk_dir: None,
        }
    }
}

pub struct TestGuest {
    // Drop order: the machine (and QEMU) before the folder that holds its disks.
    pub machine: Machine,
    pub image: GuestImage,
    pub accel: Verdict,
    /// From launch until the agent answered.
    pub boot_time: Duration,
    disks: tempfile::TempDir,
}

impl TestGuest {
    /// A guest booted by a layer above from another image (the Windows guest, see
    /// `windows::guest`): it owns `machine` and the folder `disks` of its overlay, and is
    /// dropped as this module's own guests are (QEMU first, then the folder). A firmware
    /// boot's `image` has no kernel, as a backup of it has none.
    pub fn adopt(
        machine: Machine,
        image: GuestImage,
        accel: Verdict,
        boot_time: Duration,
        disks: tempfile::TempDir,
    ) -> Self {
        TestGuest { machine, image, accel, boot_time, disks }
    }

    /// The folder holding this guest's overlay and any disks placed there by the caller.
    pub fn disk_dir(&self) -> &std::path::Path {
        self.disks.path()
    }
}

/// Resolves the accelerator for the cached Linux image.
pub fn accel_for(image: &GuestImage, choice: Option<AccelChoice>) -> Result<Verdict, GuestError> {
    let choice = AccelChoice::from_env(choice)?;
    let qemu = crate::qemu::config::default_qemu_binary();
    Ok(accel::resolve(choice, &qemu, &image.kernel, &crate::image::cache::cache_dir()))
}

/// The machine `opts` asks for, booted by `boot`, and the folder of its disks (removed with
/// the guest): its root disk, named `root`, is a private qcow2 overlay over `base` (of
/// format `base_format`), so the cached image is never written; `opts`' extra disks follow.
/// Every guest of the crate, Linux or Windows, is set up so.
pub fn machine_config(
    opts: GuestOptions,
    accel: Accel,
    boot: KernelBoot,
    base: &Path,
    base_format: DiskFormat,
) -> Result<(MachineConfig, tempfile::TempDir), GuestError> {
    let prefix = format!("quiesce-{}-disks-", opts.name);
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix);
    let disks = match &opts.disk_dir {
        Some(d) => b.tempdir_in(d)?,
        None => b.tempdir()?,
    };
    let root = disks.path().join("root.qcow2");
    qemu_img::create_overlay(base, base_format, &root)?;
    let mut cfg = MachineConfig::new(&opts.name, accel, boot);
    cfg.memory_mib = opts.memory_mib;
    cfg.cpus = opts.cpus;
    if let Some(dir) = opts.artifacts_dir {
        cfg.artifacts_dir = dir;
    }
    cfg.disks.push(DiskConfig { node_name: "root".into(), path: root, format: DiskFormat::Qcow2, read_only: false });
    cfg.disks.extend(opts.extra_disks);
    Ok((cfg, disks))
}

/// Builds the image if needed, then boots it and waits for the agent.
pub async fn boot(opts: GuestOptions, progress: &mut dyn FnMut(&str)) -> Result<TestGuest, GuestError> {
    let image = recipe::ensure("linux", false, progress)?;
    progress("choosing the accelerator");
    let verdict = accel_for(&image, opts.accel)?;
    let name = opts.name.clone();
    let (cfg, disks) = machine_config(opts, verdict.accel, image.kernel_boot(), &image.root, DiskFormat::Raw)?;
    progress(&format!("booting {name} under {}", verdict.accel.as_str().to_uppercase()));
    let started = Instant::now();
    let mut machine = Machine::launch(cfg).await?;
    machine.wait_agent(crate::sys::deadline::boot_to_agent()).await?;
    Ok(TestGuest { machine, image, accel: verdict, boot_time: started.elapsed(), disks })
}

/// An image the user brings (a scenario's `image = { path, ... }`): the file, its format,
/// and how it boots (its own bootloader, or the kernel given beside it).
#[derive(Debug, Clone)]
pub struct OwnBoot {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub boot: KernelBoot,
}

/// Boots a Linux image the user brought, as [`boot`] boots the recipe's: under a private
/// qcow2 overlay (QEMU opens the image read-only, as the overlay's backing file, so it is
/// never written), and waits for its agent. The accelerator is probed with the cached
/// recipe's kernel, as everywhere.
pub async fn boot_own(
    opts: GuestOptions,
    own: OwnBoot,
    progress: &mut dyn FnMut(&str),
) -> Result<TestGuest, GuestError> {
    let probe = recipe::ensure("linux", false, progress)?;
    progress("choosing the accelerator");
    let verdict = accel_for(&probe, opts.accel)?;
    let name = opts.name.clone();
    let (cfg, disks) = machine_config(opts, verdict.accel, own.boot.clone(), &own.path, own.format)?;
    progress(&format!("booting {name} from {} under {}", own.path.display(), verdict.accel.as_str().to_uppercase()));
    let started = Instant::now();
    let mut machine = Machine::launch(cfg).await?;
    machine.wait_agent(crate::sys::deadline::boot_to_agent()).await?;
    // What the backup and the restores know of the image: no recipe, no cache entry.
    let image = GuestImage {
        recipe: "own".into(),
        key: String::new(),
        dir: own.path.parent().map(Path::to_owned).unwrap_or_default(),
        kernel: own.boot.kernel.clone(),
        initrd: own.boot.initrd.clone(),
        root: own.path.clone(),
        cmdline: own.boot.append.clone(),
    };
    Ok(TestGuest { machine, image, accel: verdict, boot_time: started.elapsed(), disks })
}
