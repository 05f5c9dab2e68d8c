//! Where built Windows images are kept: `images/windows-<recipe key>-<input key>/` in the
//! image cache, holding `disk.qcow2` (compressed) and `image.json` (what it was built from).
//! The recipe key is the hash of `guest-images/windows/` (as for the Linux guest); the
//! input key hashes the two ISOs' SHA-256 and the edition, so another ISO is another image.
//!
//! Pruning: a build removes only Windows images of *other recipe keys* (dead weight once
//! the recipe changed). It never touches another input's image, nor anything of another
//! recipe: the Linux guest's `linux-<key>` folders do not match `windows-<key>-<key>`, and
//! the Linux build's own pruning matches only `linux-<key>` (both are tested here).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{WindowsImageError, RECIPE};
use crate::image::cache::cache_dir;
use crate::image::recipe;

/// What a built image was made from, kept beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub recipe_key: String,
    pub input_key: String,
    pub edition: String,
    pub build: Option<u32>,
    pub virtio_os: String,
    pub windows_iso_sha256: String,
    pub virtio_iso_sha256: String,
    /// The ready line the guest wrote to COM1 at the end of its first logon.
    pub ready_line: String,
    /// Seconds since the epoch.
    pub built_at: u64,
}

/// A built Windows image in the cache.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub info: ImageInfo,
}

pub fn images_dir() -> PathBuf {
    cache_dir().join("images")
}

/// The recipe's key (the hash of guest-images/windows/ built into this quiesce).
pub fn recipe_key() -> String {
    recipe::recipe_key(RECIPE).unwrap_or_else(|_| "0".repeat(16))
}

/// The key of one set of inputs.
pub fn input_key(windows_sha: &str, virtio_sha: &str, edition: &str) -> String {
    let mut h = Sha256::new();
    for part in [windows_sha, virtio_sha, edition] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

pub fn dir_name(recipe_key: &str, input_key: &str) -> String {
    format!("{RECIPE}-{recipe_key}-{input_key}")
}

fn is_key(s: &str) -> bool {
    s.len() == 16 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// (recipe key, input key) of a folder name this module made.
fn parse_dir_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(&format!("{RECIPE}-"))?;
    let (r, i) = rest.split_once('-')?;
    (is_key(r) && is_key(i)).then_some((r, i))
}

/// Every Windows image built from this recipe, newest first.
pub fn built_in(images: &Path) -> Vec<BuiltImage> {
    let key = recipe_key();
    let mut out: Vec<BuiltImage> = std::fs::read_dir(images)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (r, _) = parse_dir_name(&name)?;
            if r != key {
                return None;
            }
            let dir = e.path();
            let info: ImageInfo = serde_json::from_slice(&std::fs::read(dir.join("image.json")).ok()?).ok()?;
            let disk = dir.join("disk.qcow2");
            disk.is_file().then_some(BuiltImage { dir, disk, info })
        })
        .collect();
    out.sort_by_key(|b| std::cmp::Reverse(b.info.built_at));
    out
}

/// The newest Windows image built from this recipe, if any.
pub fn latest() -> Option<BuiltImage> {
    built_in(&images_dir()).into_iter().next()
}

/// Removes Windows images (and their build logs) made from other versions of the recipe.
pub fn prune_other_recipes(images: &Path, keep_recipe_key: &str) {
    let Ok(entries) = std::fs::read_dir(images) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((r, _)) = parse_dir_name(name.trim_end_matches(".build.log")) else { continue };
        if r != keep_recipe_key {
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
}

/// SHA-256 of a (large) file, in hex.
pub fn sha256_file(path: &Path, what: &'static str) -> Result<String, WindowsImageError> {
    let mut f = std::fs::File::open(path).map_err(|source| WindowsImageError::Missing {
        what,
        path: path.to_owned(),
        source,
    })?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(WindowsImageError::io("reading", path))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_linux_builds_never_prune_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path();
        let linux = recipe::recipe_key("linux").unwrap();
        let win_old = dir_name("00000000000000aa", "1111111111111111");
        let win_now = dir_name(&recipe_key(), "2222222222222222");
        let win_now_other_iso = dir_name(&recipe_key(), "3333333333333333");
        for d in [
            format!("linux-{linux}"),
            "linux-00000000000000bb".into(),
            win_old.clone(),
            win_now.clone(),
            win_now_other_iso.clone(),
        ] {
            std::fs::create_dir(images.join(d)).unwrap();
        }
        std::fs::write(images.join(format!("{win_old}.build.log")), "").unwrap();
        // A Windows build keeps every Linux image and every Windows image of this recipe.
        prune_other_recipes(images, &recipe_key());
        let left = |n: &str| images.join(n).exists();
        assert!(left(&format!("linux-{linux}")) && left("linux-00000000000000bb"));
        assert!(left(&win_now) && left(&win_now_other_iso));
        assert!(!left(&win_old) && !left(&format!("{win_old}.build.log")));
        // A Linux build prunes only Linux images of other keys.
        recipe::prune_stale(images, "linux", &linux);
        assert!(!left("linux-00000000000000bb") && left(&format!("linux-{linux}")));
        assert!(left(&win_now) && left(&win_now_other_iso));
    }

    #[test]
    fn built_images_are_found_by_their_info() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join(dir_name(&recipe_key(), "2222222222222222"));
        std::fs::create_dir(&d).unwrap();
        assert!(built_in(dir.path()).is_empty(), "no image.json, no disk: not an image");
        let info = ImageInfo {
            recipe_key: recipe_key(),
            input_key: "2222222222222222".into(),
            edition: "Windows Server 2022 SERVERSTANDARD".into(),
            build: Some(20348),
            virtio_os: "2k22".into(),
            windows_iso_sha256: "a".into(),
            virtio_iso_sha256: "b".into(),
            ready_line: "QUIESCE-WINDOWS-READY".into(),
            built_at: 1,
        };
        std::fs::write(d.join("image.json"), serde_json::to_vec(&info).unwrap()).unwrap();
        std::fs::write(d.join("disk.qcow2"), b"").unwrap();
        let found = built_in(dir.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].info, info);
        assert_ne!(input_key("a", "b", "x"), input_key("a", "b", "y"));
    }
}
