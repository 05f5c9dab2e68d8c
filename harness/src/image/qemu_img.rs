//! Thin, typed calls of `qemu-img`, each with a deadline for its kind of work. Overlays
//! always name their backing format: QEMU must never probe a format.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use crate::qemu::programs::QemuProgram;
use crate::qemu::DiskFormat;
use crate::sys::{deadline, Tool, ToolError};

#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    /// qemu-img could not run, ran past its deadline, or failed; the error names the
    /// command and ends with qemu-img's own words.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// qemu-img succeeded but printed JSON we could not read (a qemu-img too different
    /// from the ones quiesce knows).
    #[error("`qemu-img {args}` printed JSON we could not read: {error}")]
    Json { args: String, error: String },
}

/// `qemu-img args...`, which must finish within `timeout`.
pub(crate) fn qemu_img<'a>(timeout: Duration, args: &[&OsStr]) -> Tool<'a> {
    Tool::new(QemuProgram::Img.path(), timeout).args(args)
}

fn run(timeout: Duration, args: &[&OsStr]) -> Result<Vec<u8>, QemuImgError> {
    Ok(qemu_img(timeout, args).run()?.stdout)
}

/// Creates a qcow2 overlay at `path` over `base`, whose format is given explicitly.
pub fn create_overlay(base: &Path, base_format: DiskFormat, path: &Path) -> Result<(), QemuImgError> {
    overlay(base, base_format, None, path)
}

/// The same, over an image that a running QEMU holds open: `-u` keeps qemu-img from
/// opening the backing file, so the size must be given.
pub fn create_overlay_unsafe(base: &Path, base_format: DiskFormat, size: u64, path: &Path) -> Result<(), QemuImgError> {
    overlay(base, base_format, Some(size), path)
}

fn overlay(base: &Path, base_format: DiskFormat, size: Option<u64>, path: &Path) -> Result<(), QemuImgError> {
    // qemu-img reads a relative backing name from the overlay's folder, not from ours: a
    // base named relative to the working directory (a relative QUIESCE_CACHE_DIR, an image
    // given as `images/root.img`) would be looked for beside the overlay and not found.
    // (`absolute` fails only on an empty path, which qemu-img then refuses itself.)
    let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    let size = size.map(|s| s.to_string());
    let mut args: Vec<&OsStr> = vec!["create".as_ref(), "-q".as_ref()];
    if size.is_some() {
        args.push("-u".as_ref());
    }
    args.extend::<[&OsStr; 6]>([
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        base_format.driver().as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
    ]);
    args.push(path.as_os_str());
    if let Some(s) = &size {
        args.push(s.as_ref());
    }
    run(deadline::QEMU_IMG_METADATA, &args)?;
    Ok(())
}

/// `qemu-img info` as JSON; `-U` so an image in use by a running QEMU can be inspected.
pub fn info(path: &Path) -> Result<serde_json::Value, QemuImgError> {
    let out = run(
        deadline::QEMU_IMG_METADATA,
        &["info".as_ref(), "-U".as_ref(), "--output=json".as_ref(), path.as_os_str()],
    )?;
    serde_json::from_slice(&out)
        .map_err(|e| QemuImgError::Json { args: format!("info {}", path.display()), error: e.to_string() })
}

/// Copies the guest-visible content of `src` (through its backing chain) into a standalone
/// image `dst` of `dst_format`. Sparse regions stay sparse.
pub fn convert(src: &Path, src_format: DiskFormat, dst: &Path, dst_format: DiskFormat) -> Result<(), QemuImgError> {
    run(
        deadline::QEMU_IMG_COPY,
        &[
            "convert".as_ref(),
            "-f".as_ref(),
            src_format.driver().as_ref(),
            "-O".as_ref(),
            dst_format.driver().as_ref(),
            src.as_os_str(),
            dst.as_os_str(),
        ],
    )?;
    Ok(())
}

/// True if the two images hold the same guest-visible content.
pub fn identical(a: &Path, a_format: DiskFormat, b: &Path, b_format: DiskFormat) -> Result<bool, QemuImgError> {
    let out = qemu_img(
        deadline::QEMU_IMG_COPY,
        &[
            "compare".as_ref(),
            "-U".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            a_format.driver().as_ref(),
            "-F".as_ref(),
            b_format.driver().as_ref(),
            a.as_os_str(),
            b.as_os_str(),
        ],
    )
    .output()?;
    // 0: identical; 1: they differ; anything else: the comparison itself failed.
    match out.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(out.into_failure().into()),
    }
}

/// The virtual size of an image in bytes.
pub fn virtual_size(path: &Path) -> Result<u64, QemuImgError> {
    let v = info(path)?;
    v["virtual-size"]
        .as_u64()
        .ok_or_else(|| QemuImgError::Json { args: format!("info {}", path.display()), error: "no virtual-size".into() })
}

/// A new, empty image.
pub fn create(path: &Path, format: DiskFormat, size: u64) -> Result<(), QemuImgError> {
    run(
        deadline::QEMU_IMG_METADATA,
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            format.driver().as_ref(),
            path.as_os_str(),
            size.to_string().as_ref(),
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// `abs` named from the working directory, climbing to the root and down again: a
    /// relative path, whatever folder the tests run in.
    fn relative_to_cwd(abs: &Path) -> PathBuf {
        let cwd = std::env::current_dir().unwrap();
        let up: PathBuf = cwd.components().skip(1).map(|_| "..").collect();
        up.join(abs.strip_prefix("/").unwrap())
    }

    #[test]
    fn an_overlay_over_a_base_named_relative_to_the_working_directory_opens() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        create(&base, DiskFormat::Raw, 1 << 20).unwrap();
        let relative = relative_to_cwd(&base);
        // The overlay deeper than the working directory: read from the overlay's folder,
        // the relative name climbs no higher than the temporary folder and finds nothing
        // (from a shallower folder it would climb to `/` and, stopped there, find the base).
        let depth = std::env::current_dir().unwrap().components().count();
        let vm: PathBuf = std::iter::once(dir.path().to_owned()).chain((0..=depth).map(|_| "vm".into())).collect();
        std::fs::create_dir_all(&vm).unwrap();
        let overlay_path = vm.join("disk.qcow2");
        assert!(relative.is_relative() && relative.exists(), "{}", relative.display());
        // Broken before: qemu-img looked for the base from the overlay's folder.
        create_overlay(&relative, DiskFormat::Raw, &overlay_path).unwrap();
        let chain = info(&overlay_path).unwrap();
        let backing = chain["full-backing-filename"].as_str().or(chain["backing-filename"].as_str()).unwrap();
        assert!(Path::new(backing).is_absolute(), "{chain}");
        assert_eq!(std::fs::canonicalize(backing).unwrap(), std::fs::canonicalize(&base).unwrap(), "{chain}");
    }
}
