//! Which QEMU programs quiesce runs: the emulator, `qemu-img`, `qemu-io` and
//! `qemu-storage-daemon`, each overridable the same way, so that quiesce can be pointed at
//! another QEMU as a whole (a build in a folder, or Debian 12's own 7.2 unpacked with
//! `dpkg -x`) without mixing its tools with the system's.
//!
//! For each program: its own variable if set (`QUIESCE_QEMU`, `QUIESCE_QEMU_IMG`,
//! `QUIESCE_QEMU_IO`, `QUIESCE_QEMU_STORAGE_DAEMON`); else, when `QUIESCE_QEMU` names a
//! path, the program of that name beside it, if there is one; else its name, found on
//! `PATH`. `QUIESCE_QEMU_DATADIR` gives the emulator its firmware folder (`-L`), for an
//! emulator whose own data is not where it was built to look.

use std::path::{Path, PathBuf};

/// A program of QEMU's that quiesce runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QemuProgram {
    /// `qemu-system-x86_64`: the machines, and the capability probe.
    System,
    /// `qemu-img`: creating, converting, comparing and describing images.
    Img,
    /// `qemu-io`: reading a few bytes of a disk as the guest sees them.
    Io,
    /// `qemu-storage-daemon`: serving images over NBD for the block compare.
    StorageDaemon,
}

impl QemuProgram {
    pub const ALL: [QemuProgram; 4] =
        [QemuProgram::System, QemuProgram::Img, QemuProgram::Io, QemuProgram::StorageDaemon];

    /// Its name on `PATH`.
    pub fn name(self) -> &'static str {
        match self {
            QemuProgram::System => "qemu-system-x86_64",
            QemuProgram::Img => "qemu-img",
            QemuProgram::Io => "qemu-io",
            QemuProgram::StorageDaemon => "qemu-storage-daemon",
        }
    }

    /// The variable that points quiesce at another one.
    pub fn env(self) -> &'static str {
        match self {
            QemuProgram::System => "QUIESCE_QEMU",
            QemuProgram::Img => "QUIESCE_QEMU_IMG",
            QemuProgram::Io => "QUIESCE_QEMU_IO",
            QemuProgram::StorageDaemon => "QUIESCE_QEMU_STORAGE_DAEMON",
        }
    }

    /// What to run, from the environment (see the module's documentation).
    pub fn path(self) -> PathBuf {
        resolve(self, &|var| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from), &|p| p.is_file())
    }
}

/// The variable naming the emulator's firmware folder, passed as `-L`.
pub const DATADIR_ENV: &str = "QUIESCE_QEMU_DATADIR";

/// `$QUIESCE_QEMU_DATADIR`, if set.
pub fn datadir() -> Option<PathBuf> {
    std::env::var_os(DATADIR_ENV).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Pure: the resolution, over a lookup of variables and a test for files.
fn resolve(program: QemuProgram, var: &dyn Fn(&str) -> Option<PathBuf>, is_file: &dyn Fn(&Path) -> bool) -> PathBuf {
    if let Some(p) = var(program.env()) {
        return p;
    }
    let beside = var(QemuProgram::System.env())
        .filter(|emulator| emulator.components().count() > 1)
        .and_then(|emulator| emulator.parent().map(|dir| dir.join(program.name())));
    match beside {
        Some(p) if is_file(&p) => p,
        _ => PathBuf::from(program.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<PathBuf> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| PathBuf::from(v))
    }

    #[test]
    fn defaults_are_names_on_path() {
        let none = vars(&[]);
        for p in QemuProgram::ALL {
            assert_eq!(resolve(p, &none, &|_| true), PathBuf::from(p.name()));
        }
    }

    #[test]
    fn tools_come_from_beside_the_emulator_unless_named() {
        let v = vars(&[("QUIESCE_QEMU", "/opt/q72/usr/bin/qemu-system-x86_64"), ("QUIESCE_QEMU_IO", "/x/qemu-io")]);
        let there = |p: &Path| p != Path::new("/opt/q72/usr/bin/qemu-storage-daemon");
        assert_eq!(resolve(QemuProgram::System, &v, &there), PathBuf::from("/opt/q72/usr/bin/qemu-system-x86_64"));
        assert_eq!(resolve(QemuProgram::Img, &v, &there), PathBuf::from("/opt/q72/usr/bin/qemu-img"));
        assert_eq!(resolve(QemuProgram::Io, &v, &there), PathBuf::from("/x/qemu-io"));
        // Not beside it: the one on PATH.
        assert_eq!(resolve(QemuProgram::StorageDaemon, &v, &there), PathBuf::from("qemu-storage-daemon"));
        // A bare name for the emulator says nothing about where the tools are.
        let bare = vars(&[("QUIESCE_QEMU", "qemu-system-x86_64")]);
        assert_eq!(resolve(QemuProgram::Img, &bare, &|_| true), PathBuf::from("qemu-img"));
    }
}
