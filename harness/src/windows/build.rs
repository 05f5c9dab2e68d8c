//! `quiesce image build windows`: checks the inputs, builds the provisioning CD, refuses
//! TCG unless asked for, runs the install, and puts the compressed disk in the cache.
//! Every refusal comes before QEMU starts, and leaves no cache entry: the work happens in
//! a hidden folder of the cache that is renamed into place only at the very end.
//!
//! NEVER RUN WITH A REAL WINDOWS ISO (see [`crate::windows`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::install::{self, InstallError, Progress};
use crate::image::qemu_img::{self, QemuImgError};
use crate::image::recipe;
use crate::image::windows::cache::{self, BuiltImage, ImageInfo};
use crate::image::windows::media::{self, AnswerVars};
use crate::image::windows::plan::{self, InstallPlan};
use crate::image::windows::{editions, iso, virtio, Edition, VirtioOs, WindowsImageError};
use crate::qemu::accel::{self, AccelChoice, AccelError};
use crate::qemu::{Accel, DiskFormat};

/// What the person asked for.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub windows_iso: PathBuf,
    pub virtio_iso: PathBuf,
    pub edition: Option<String>,
    /// `--accel` (or `$QUIESCE_ACCEL`); TCG is taken only when asked for by name.
    pub accel: Option<AccelChoice>,
    pub deadline: Duration,
    /// Check everything and build the CD, print QEMU's command line, boot nothing.
    pub dry_run: bool,
    pub artifacts_dir: PathBuf,
}

/// Why no image was built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An input is missing or wrong, or a host tool failed; nothing was booted.
    #[error(transparent)]
    Input(#[from] WindowsImageError),
    /// `--accel`/`$QUIESCE_ACCEL` names an accelerator this program does not know.
    #[error(transparent)]
    Accel(#[from] AccelError),
    /// Only TCG is available here and it was not asked for: Windows Setup under TCG takes
    /// many hours. Nothing was booted.
    #[error("refusing to install Windows under TCG: {reason}.\nWith KVM the install takes 20-60 minutes; TCG emulates every instruction and is commonly 10-50 times slower, so expect many hours (past the {deadline_h} h deadline). Run it on a host with working KVM, or pass --accel tcg (and a longer --deadline) to try anyway.")]
    NeedsKvm { reason: String, deadline_h: u64 },
    /// The Linux guest image, which the KVM probe boots, could not be built.
    #[error("the KVM probe needs the Linux guest's kernel: {0}")]
    Probe(#[from] recipe::ImageError),
    /// The install itself failed; its evidence is kept.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// The installed disk could not be made or compressed into the cache.
    #[error("the Windows disk: {0}")]
    Disk(#[from] QemuImgError),
}

/// What a build did.
#[derive(Debug)]
pub enum Built {
    /// `--dry-run`: what would boot.
    DryRun(DryRun),
    Image(BuiltImage),
}

#[derive(Debug)]
pub struct DryRun {
    pub edition: Edition,
    pub os: VirtioOs,
    /// The provisioning CD, kept for inspection.
    pub media: PathBuf,
    pub command_line: String,
    /// Why a real run would refuse to boot (TCG not asked for), if it would.
    pub would_refuse: Option<String>,
}

/// The steps of a build, as progress shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Phase(String),
    Install(Progress),
}

fn phase(progress: &mut dyn FnMut(Step), what: &str) {
    progress(Step::Phase(what.to_owned()));
}

/// The accelerator, refusing TCG that was not asked for.
fn choose_accel(opts: &BuildOptions, progress: &mut dyn FnMut(Step)) -> Result<Result<Accel, BuildError>, BuildError> {
    match AccelChoice::from_env(opts.accel)? {
        AccelChoice::Fixed(a) => Ok(Ok(a)),
        AccelChoice::Auto => {
            phase(progress, "probing KVM (boots the Linux guest's kernel)");
            let linux = recipe::ensure("linux", false, &mut |s| progress(Step::Phase(s.to_owned())))?;
            let qemu = crate::qemu::config::default_qemu_binary();
            let v = accel::resolve(AccelChoice::Auto, &qemu, &linux.kernel, &crate::image::cache::cache_dir());
            Ok(auto_verdict(v, opts.deadline))
        }
    }
}

/// What `auto` may take: KVM, or a refusal that says why TCG is not taken unasked.
pub fn auto_verdict(v: accel::Verdict, deadline: Duration) -> Result<Accel, BuildError> {
    match v.accel {
        Accel::Kvm => Ok(Accel::Kvm),
        Accel::Tcg => Err(BuildError::NeedsKvm { reason: v.reason, deadline_h: deadline.as_secs().div_ceil(3600) }),
    }
}

/// Builds the Windows image (or, with `dry_run`, everything up to the boot).
pub async fn build(opts: &BuildOptions, progress: &mut dyn FnMut(Step)) -> Result<Built, BuildError> {
    phase(progress, "checking the ISOs");
    for (what, p) in [("Windows ISO", &opts.windows_iso), ("virtio-win ISO", &opts.virtio_iso)] {
        std::fs::File::open(p).map_err(|source| WindowsImageError::Missing { what, path: p.clone(), source })?;
    }
    let images = cache::images_dir();
    std::fs::create_dir_all(&images).map_err(WindowsImageError::io("creating", &images))?;
    let work = tempfile::Builder::new()
        .prefix(".build-windows-")
        .tempdir_in(&images)
        .map_err(WindowsImageError::io("creating a work folder in", &images))?;

    phase(progress, "reading the editions from sources/install.wim");
    let all = editions::read(&opts.windows_iso, work.path())?;
    let edition = editions::choose(&opts.windows_iso, &all, opts.edition.as_deref())?;
    let os = edition.virtio_os()?;
    phase(
        progress,
        &format!("edition {} (build {}), virtio-win drivers {}", edition.name, edition.build.unwrap_or(0), os.dir()),
    );
    let entries = iso::list(&opts.virtio_iso, "virtio-win ISO")?;
    virtio::check(&opts.virtio_iso, &entries, os)?;

    phase(progress, "building the provisioning CD (answer file, first-logon scripts, workloads)");
    let stage = work.path().join("media");
    media::stage(&AnswerVars::for_edition(&edition, os), &stage)?;
    let media_iso = work.path().join("provision.iso");
    media::build_iso(&stage, &media_iso)?;

    let accel = choose_accel(opts, progress)?;
    // A dry run keeps its CD (a small file) outside the cache, for a person to look at;
    // everything else it made goes with the work folder.
    let kept = if opts.dry_run {
        let dir = tempfile::Builder::new()
            .prefix("quiesce-windows-media-")
            .tempdir()
            .map_err(WindowsImageError::io("creating a folder in", &std::env::temp_dir()))?
            .keep();
        let to = dir.join("provision.iso");
        std::fs::copy(&media_iso, &to).map_err(WindowsImageError::io("copying the CD to", &to))?;
        Some(to)
    } else {
        None
    };
    let plan = InstallPlan {
        qemu_binary: crate::qemu::config::default_qemu_binary().into(),
        accel: *accel.as_ref().unwrap_or(&Accel::Tcg),
        memory_mib: plan::MEMORY_MIB,
        cpus: plan::CPUS,
        windows_iso: absolute(&opts.windows_iso),
        virtio_iso: absolute(&opts.virtio_iso),
        provisioning_iso: kept.clone().unwrap_or(media_iso),
        disk: work.path().join("disk.qcow2"),
        serial_log: work.path().join("serial.log"),
        qmp_socket: work.path().join("qmp.sock"),
        agent_socket: work.path().join("qga.sock"),
    };
    if let Some(media) = kept {
        let program = plan.qemu_binary.to_string_lossy().into_owned();
        let command_line = crate::sys::shell_line(&program, &plan::qemu_args(&plan));
        return Ok(Built::DryRun(DryRun {
            edition,
            os,
            media,
            command_line,
            would_refuse: accel.err().map(|e| e.to_string()),
        }));
    }
    accel?;

    phase(progress, "hashing the ISOs (the cache key)");
    let win_sha = cache::sha256_file(&opts.windows_iso, "Windows ISO")?;
    let virtio_sha = cache::sha256_file(&opts.virtio_iso, "virtio-win ISO")?;
    let recipe_key = cache::recipe_key();
    let input_key = cache::input_key(&win_sha, &virtio_sha, &edition.name);

    qemu_img::create(&plan.disk, DiskFormat::Qcow2, plan::DISK_SIZE)?;
    phase(
        progress,
        &format!(
            "installing Windows under {} (20-60 min with KVM; deadline {:?})",
            plan.accel.as_str().to_uppercase(),
            opts.deadline
        ),
    );
    let ready =
        install::run(&plan, work.path(), &opts.artifacts_dir, opts.deadline, &mut |p| progress(Step::Install(p)))
            .await?;

    phase(progress, "compressing the installed disk into the cache");
    let out = work.path().join("out");
    std::fs::create_dir(&out).map_err(WindowsImageError::io("creating", &out))?;
    compress(&plan.disk, &out.join("disk.qcow2"))?;
    let info = ImageInfo {
        recipe_key: recipe_key.clone(),
        input_key: input_key.clone(),
        edition: edition.name.clone(),
        build: edition.build,
        virtio_os: os.dir().into(),
        windows_iso_sha256: win_sha,
        virtio_iso_sha256: virtio_sha,
        ready_line: ready,
        built_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    };
    let info_path = out.join("image.json");
    std::fs::write(&info_path, serde_json::to_vec_pretty(&info).unwrap_or_default())
        .map_err(WindowsImageError::io("writing", &info_path))?;
    let dest = images.join(cache::dir_name(&recipe_key, &input_key));
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(WindowsImageError::io("replacing", &dest))?;
    }
    std::fs::rename(&out, &dest).map_err(WindowsImageError::io("moving the image into", &dest))?;
    cache::prune_other_recipes(&images, &recipe_key);
    let disk = dest.join("disk.qcow2");
    Ok(Built::Image(BuiltImage { dir: dest, disk, info }))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// `qemu-img convert -c`: a compressed, standalone qcow2 of the installed disk (about a
/// third of its 12-15 GB). It reads the whole disk, so it gets the copy deadline.
fn compress(src: &Path, dst: &Path) -> Result<(), QemuImgError> {
    let args: [&std::ffi::OsStr; 8] = [
        "convert".as_ref(),
        "-c".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        src.as_os_str(),
        dst.as_os_str(),
    ];
    qemu_img::qemu_img(crate::sys::deadline::QEMU_IMG_COPY, &args).output()?.into_success()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_never_takes_tcg_for_the_install() {
        let tcg =
            accel::Verdict { accel: Accel::Tcg, reason: "KVM hung booting the guest kernel".into(), cached: true };
        let err = auto_verdict(tcg, Duration::from_secs(7200)).unwrap_err().to_string();
        assert!(err.starts_with("refusing to install Windows under TCG: KVM hung booting the guest kernel."), "{err}");
        assert!(
            err.contains("With KVM the install takes 20-60 minutes") && err.contains("past the 2 h deadline"),
            "{err}"
        );
        assert!(err.contains("pass --accel tcg"), "{err}");
        let kvm = accel::Verdict { accel: Accel::Kvm, reason: "KVM works".into(), cached: false };
        assert_eq!(auto_verdict(kvm, Duration::from_secs(60)).unwrap(), Accel::Kvm);
    }
}
