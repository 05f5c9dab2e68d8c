//! Runs left behind by a quiesce that was killed (SIGKILL, the OOM killer, a power cut),
//! so that no undo could run. Its QEMUs die with it (PDEATHSIG, see `sys::child`), but its
//! run folder stays: disks, overlays, a partial backup, and a fault's tmpfs still mounted.
//!
//! Each run holds an exclusive `flock` on a file in its folder for as long as it runs. The
//! kernel drops the lock when the process dies, however it dies, so a folder whose lock
//! can be taken belongs to no live run. [`sweep`] removes such folders (unmounting what is
//! mounted under them first) unless a live process still names the folder on its command
//! line; `quiesce run` sweeps its work folder before it starts, and `quiesce doctor` shows
//! and sweeps it too.

use std::fs::File;

use nix::fcntl::{Flock, FlockArg};
use std::path::{Path, PathBuf};

use crate::sys::{deadline, Tool};

/// The lock file in every run folder.
pub const LOCK_FILE: &str = ".quiesce-run.lock";

/// The lock of a run folder, held while the run lasts (the kernel drops it with the process).
#[derive(Debug)]
pub struct RunLock(#[allow(dead_code)] Flock<File>);

/// Takes the lock of run folder `dir` (which this run has just created).
pub fn claim(dir: &Path) -> std::io::Result<RunLock> {
    let f = File::create(dir.join(LOCK_FILE))?;
    let held = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| std::io::Error::from(e))?;
    Ok(RunLock(held))
}

/// A run folder found with no live run, and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub path: PathBuf,
    /// Mount points under it that were unmounted (a fault's tmpfs).
    pub unmounted: Vec<PathBuf>,
    /// Overlay and merge-reserve files that were in it (left by a backup under way).
    pub overlays: Vec<String>,
    /// Partial backup folders that were in it.
    pub partial_backups: Vec<String>,
    pub outcome: Swept,
}

/// What [`sweep`] did with a leftover run folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swept {
    /// Removed, with everything in it.
    Removed,
    /// Kept: a live process names it on its command line (`pid`), perhaps a QEMU that
    /// outlived its quiesce; stop that process first.
    InUse { pid: u32 },
    /// Kept: removing it failed (`error`).
    Failed { error: String },
}

impl std::fmt::Display for Leftover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: a run left by a quiesce that was killed", self.path.display())?;
        if !self.overlays.is_empty() {
            write!(f, "; overlays {:?}", self.overlays)?;
        }
        if !self.partial_backups.is_empty() {
            write!(f, "; partial backups {:?}", self.partial_backups)?;
        }
        if !self.unmounted.is_empty() {
            write!(f, "; unmounted {:?}", self.unmounted)?;
        }
        match &self.outcome {
            Swept::Removed => write!(f, "; removed"),
            Swept::InUse { pid } => write!(f, "; KEPT: process {pid} still uses it"),
            Swept::Failed { error } => write!(f, "; KEPT: could not remove it: {error}"),
        }
    }
}

/// Finds the run folders in `work_dir` that no live run holds, and removes them. A folder
/// without a lock file is not a run folder (a kept backup) and is left alone.
pub fn sweep(work_dir: &Path) -> Vec<Leftover> {
    let Ok(entries) = std::fs::read_dir(work_dir) else { return vec![] };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let dir = e.path();
        // Not through a link: a run folder is a real folder quiesce made.
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(lock) = File::open(dir.join(LOCK_FILE)) else { continue };
        // Taken and dropped at once; a live run holds it and refuses.
        if Flock::lock(lock, FlockArg::LockExclusiveNonblock).is_err() {
            continue;
        }
        found.push(clean(&dir));
    }
    found
}

fn clean(dir: &Path) -> Leftover {
    let mut all = Vec::new();
    walk(dir, 3, &mut all);
    let named = |f: &dyn Fn(&str) -> bool| -> Vec<String> {
        let mut v: Vec<String> = all
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| f(&n.to_string_lossy())))
            .filter_map(|p| p.strip_prefix(dir).ok().map(|r| r.display().to_string()))
            .collect();
        v.sort();
        v
    };
    let overlays = named(&|n| n.ends_with("-overlay.qcow2") || n.ends_with("-merge-reserve"));
    let partial_backups = named(&|n| n.contains(".partial-"));
    let mut left =
        Leftover { path: dir.to_owned(), unmounted: vec![], overlays, partial_backups, outcome: Swept::Removed };
    if let Some(pid) = user_of(dir) {
        left.outcome = Swept::InUse { pid };
        return left;
    }
    // Deepest first, so a mount inside another comes off before it.
    let mut mounts: Vec<PathBuf> = mount_points().into_iter().filter(|m| m.starts_with(dir) && m != dir).collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mounts {
        match Tool::new("umount", deadline::MOUNT).arg("-l").arg(&m).run() {
            Ok(_) => left.unmounted.push(m),
            Err(e) => {
                left.outcome = Swept::Failed { error: format!("unmounting {}: {e}", m.display()) };
                return left;
            }
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        left.outcome = Swept::Failed { error: e.to_string() };
    }
    left
}

/// Every mount point in this process's mount namespace (`/proc/self/mountinfo`, field 5,
/// with the kernel's octal escapes undone).
pub fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(|m| PathBuf::from(unescape(m))).collect()
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Every path under `dir`, `depth` levels down, not following links or crossing mounts
/// (only names are read).
fn walk(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        out.push(p.clone());
        if depth > 0 && e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&p, depth - 1, out);
        }
    }
}

/// A live process whose command line names a path in `dir` (a QEMU that outlived its
/// quiesce would), if any.
fn user_of(dir: &Path) -> Option<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            return Some(pid);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_run_is_kept_and_a_dead_one_swept() {
        let work = tempfile::tempdir().unwrap();
        let live = work.path().join("live-run");
        let dead = work.path().join("dead-run");
        let kept_backup = work.path().join("kept-backup");
        for d in [&live, &dead, &kept_backup] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(dead.join("vm1-data-overlay.qcow2"), b"x").unwrap();
        std::fs::create_dir_all(dead.join(".backup.partial-abc")).unwrap();
        let _held = claim(&live).unwrap();
        // The dead run's lock was taken and dropped, as a killed process's is.
        drop(claim(&dead).unwrap());
        let found = sweep(work.path());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, dead);
        assert_eq!(found[0].outcome, Swept::Removed);
        assert_eq!(found[0].overlays, vec!["vm1-data-overlay.qcow2".to_owned()]);
        assert_eq!(found[0].partial_backups, vec![".backup.partial-abc".to_owned()]);
        assert!(!dead.exists() && live.exists() && kept_backup.exists());
        // A second claim on a held folder fails: one run per folder.
        assert!(claim(&live).is_err());
    }
}
