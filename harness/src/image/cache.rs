//! Where quiesce keeps what it builds once and reuses: guest images, downloaded packages
//! and the accelerator verdict.

use std::path::PathBuf;

/// `$QUIESCE_CACHE_DIR`, else `$XDG_CACHE_HOME/quiesce`, else `~/.cache/quiesce`, made
/// absolute: the paths under it are handed to QEMU, written into overlays as backing files
/// and kept in backups, all read from other folders than the one quiesce was started in.
pub fn cache_dir() -> PathBuf {
    let dir = if let Some(d) = std::env::var_os("QUIESCE_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("quiesce")
    } else {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        home.join(".cache").join("quiesce")
    };
    // `absolute` fails only on an empty path (an empty variable): kept as it is, the
    // folders made under it say so in their own errors.
    std::path::absolute(&dir).unwrap_or(dir)
}
