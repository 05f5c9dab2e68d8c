//! Guest images built from the recipes in `guest-images/`, cached under a key that is the
//! hash of the recipe, and rebuilt when the recipe changes. Builds are serialised across
//! processes with a file lock, and land in the cache by an atomic rename, so a half-built
//! image is never used.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::cache::cache_dir;
use crate::qemu::KernelBoot;
use crate::sys::{deadline, Tool, ToolError};

include!(concat!(env!("OUT_DIR"), "/recipes.rs"));

/// The files a recipe's build must produce.
const OUTPUTS: [&str; 4] = ["vmlinuz", "initrd.img", "root.img", "cmdline"];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No recipe of that name is built into this quiesce; the known ones are listed.
    #[error("no guest image recipe named {0:?} (known: {1})")]
    UnknownRecipe(String, String),
    /// The image cache (see `QUIESCE_CACHE_DIR`) could not be read or written.
    #[error("guest image cache {path}: {source}")]
    Cache { path: PathBuf, source: std::io::Error },
    /// The recipe's build script failed; its log says why, and its last lines are shown.
    #[error("building guest image {recipe} failed ({status}); its log is {log}\nlast lines:\n{tail}")]
    BuildFailed { recipe: String, status: String, log: PathBuf, tail: String },
    /// The build script could not start, or ran past its deadline (a stalled download) and
    /// was killed; its log shows how far it got.
    #[error("building guest image {recipe}: {error}; its log is {log}")]
    BuildDidNotFinish { recipe: String, log: PathBuf, error: ToolError },
    /// The build script succeeded but did not make every file an image needs.
    #[error("guest image {recipe} build produced no {missing}")]
    Incomplete { recipe: String, missing: String },
}

/// A built guest image in the cache. Its files are never written to: machines boot from
/// qcow2 overlays over `root`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub recipe: String,
    pub key: String,
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub root: PathBuf,
    pub cmdline: String,
}

impl GuestImage {
    pub fn kernel_boot(&self) -> KernelBoot {
        KernelBoot { kernel: self.kernel.clone(), initrd: self.initrd.clone(), append: self.cmdline.clone() }
    }

    /// `name version` lines of the Debian packages it was built from.
    pub fn packages(&self) -> String {
        std::fs::read_to_string(self.dir.join("packages.lock")).unwrap_or_default()
    }

    /// The guest kernel's release, from the first line of packages.lock.
    pub fn kernel_release(&self) -> Option<String> {
        self.packages().lines().next()?.strip_prefix("@kernel-release ").map(|s| s.trim().to_owned())
    }
}

fn recipe(name: &str) -> Result<&'static [(&'static str, &'static [u8])], ImageError> {
    RECIPES.iter().find(|(n, _)| *n == name).map(|(_, files)| *files).ok_or_else(|| {
        ImageError::UnknownRecipe(name.to_owned(), RECIPES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))
    })
}

/// The cache key of a recipe: a hash over its file names and contents.
pub fn recipe_key(name: &str) -> Result<String, ImageError> {
    let mut h = Sha256::new();
    for (path, bytes) in recipe(name)? {
        h.update((path.len() as u64).to_le_bytes());
        h.update(path.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    Ok(hex::encode(&h.finalize()[..8]))
}

fn images_dir() -> PathBuf {
    cache_dir().join("images")
}

fn cache_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Cache { path: path.to_owned(), source }
}

/// Removes builds of this recipe under other keys: a changed recipe makes them dead weight
/// (about 170 MiB each). Best effort; runs under the build lock.
pub(crate) fn prune_stale(images: &Path, name: &str, key: &str) {
    let Ok(entries) = std::fs::read_dir(images) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&format!("{name}-")) else { continue };
        let other = rest.trim_end_matches(".build.log");
        if other != key && other.len() == key.len() && other.chars().all(|c| c.is_ascii_hexdigit()) {
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
}

/// The cached image if it is there, without building it.
pub fn cached(name: &str) -> Result<Option<GuestImage>, ImageError> {
    let key = recipe_key(name)?;
    let dir = images_dir().join(format!("{name}-{key}"));
    if !OUTPUTS.iter().all(|f| dir.join(f).is_file()) {
        return Ok(None);
    }
    let cmdline = std::fs::read_to_string(dir.join("cmdline")).map_err(cache_err(&dir))?.trim().to_owned();
    Ok(Some(GuestImage {
        recipe: name.to_owned(),
        key,
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        root: dir.join("root.img"),
        cmdline,
        dir,
    }))
}

/// The cached image, built first if it is missing (or if `rebuild`). `progress` gets the
/// build's progress lines.
pub fn ensure(name: &str, rebuild: bool, progress: &mut dyn FnMut(&str)) -> Result<GuestImage, ImageError> {
    let files = recipe(name)?;
    let images = images_dir();
    std::fs::create_dir_all(&images).map_err(cache_err(&images))?;
    let lock_path = images.join(".lock");
    let lock_file = std::fs::File::create(&lock_path).map_err(cache_err(&lock_path))?;
    // Another process may be building the same image; wait for it rather than build twice.
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| ImageError::Cache { path: lock_path.clone(), source: e.into() })?;
    if !rebuild {
        if let Some(img) = cached(name)? {
            return Ok(img);
        }
    }
    let key = recipe_key(name)?;
    let work =
        tempfile::Builder::new().prefix(&format!(".build-{name}-")).tempdir_in(&images).map_err(cache_err(&images))?;
    let recipe_dir = work.path().join("recipe");
    for (rel, bytes) in files {
        let p = recipe_dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("recipe files live in a folder")).map_err(cache_err(&p))?;
        std::fs::write(&p, bytes).map_err(cache_err(&p))?;
        if bytes.starts_with(b"#!") {
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).map_err(cache_err(&p))?;
        }
    }
    let out = work.path().join("out");
    let log_path = images.join(format!("{name}-{key}.build.log"));
    let mut log = std::fs::File::create(&log_path).map_err(cache_err(&log_path))?;
    let debs = cache_dir().join("debs");
    std::fs::create_dir_all(&debs).map_err(cache_err(&debs))?;
    let stdout_log = log.try_clone().map_err(cache_err(&log_path))?;
    let mut tail: Vec<String> = Vec::new();
    let mut on_line = |line: &str| {
        let _ = writeln!(log, "{line}");
        if let Some(step) = line.strip_prefix("==> ") {
            progress(step);
        }
        tail.push(line.to_owned());
        if tail.len() > 20 {
            tail.remove(0);
        }
    };
    let build = Tool::new("sh", deadline::IMAGE_BUILD)
        .arg(recipe_dir.join("build.sh"))
        .arg(&out)
        .current_dir(&recipe_dir)
        .env("QUIESCE_DEB_CACHE", &debs)
        .stdout_to(stdout_log)
        .on_stderr_line(&mut on_line)
        .output();
    let status = match build {
        Ok(done) => done.status,
        Err(error) => return Err(ImageError::BuildDidNotFinish { recipe: name.to_owned(), log: log_path, error }),
    };
    if !status.success() {
        return Err(ImageError::BuildFailed {
            recipe: name.to_owned(),
            status: status.to_string(),
            log: log_path,
            tail: tail.join("\n"),
        });
    }
    if let Some(missing) = OUTPUTS.iter().find(|f| !out.join(f).is_file()) {
        return Err(ImageError::Incomplete { recipe: name.to_owned(), missing: missing.to_string() });
    }
    let dest = images.join(format!("{name}-{key}"));
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(cache_err(&dest))?;
    }
    std::fs::rename(&out, &dest).map_err(cache_err(&dest))?;
    prune_stale(&images, name, &key);
    Ok(cached(name)?.expect("the image was just put in place"))
}
