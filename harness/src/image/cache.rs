//! Where quiesce keeps what it builds once and reuses: guest images, downloaded packages
//! and the accelerator verdict.

use std::path::PathBuf;

/// `$QUIESCE_CACHE_DIR`, else `$XDG_CACHE_HOME/quiesce`, else `~/.cache/quiesce`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("QUIESCE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("quiesce");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("quiesce")
}
