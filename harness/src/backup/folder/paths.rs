//! The files a backup's manifest names, found without ever leaving the backup's folder.
//!
//! A backup folder is input from elsewhere (a colleague's, a CI artifact), and its manifest
//! names its files. A name is refused unless it is a plain relative path: not absolute, no
//! `..` or `.`, no empty component. Then it is opened one component at a time with
//! `openat(O_NOFOLLOW)` from the backup's folder: a symbolic link anywhere below the folder
//! is refused (quiesce never writes one), and so is anything that is not a folder on the way
//! or a regular file at the end (a FIFO would hang a reader; a device is not a backup's).
//!
//! Why a walk of `openat`s rather than canonicalising and checking the prefix: a path that
//! is checked and then opened by name can be swapped for a symbolic link in between. Files
//! this process reads (checksums) are read through the descriptor the walk opened, so what
//! is hashed is what was checked. QEMU and qemu-img still open a restored file by name; that
//! name was checked just before (see [`checked_path`]), and what remains is a race only a
//! local user who can write into the backup folder during the restore can run, who could as
//! well change the file's bytes. (`openat2`'s RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS does the
//! same walk in the kernel; the portable walk needs no kernel newer than Linux has had for
//! decades, and `rustix` keeps it free of `unsafe`.)

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// What is wrong with a path that a backup's manifest names. Nothing was read through it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    /// The name is empty.
    #[error("it is empty")]
    Empty,
    /// The name is absolute: it names a file of the host, not of the backup.
    #[error("it is absolute; a backup names its files relative to its own folder")]
    Absolute,
    /// The name has a `..`, a `.` or an empty component (`a//b`): only plain names are allowed,
    /// so that no name can climb out of the backup's folder.
    #[error("it has a {component:?} component; only plain names are allowed")]
    NotPlain { component: String },
    /// The name has a NUL byte, which no file name can hold.
    #[error("it has a NUL byte")]
    Nul,
    /// A VM's name is used as one folder name, so it may not hold a `/`.
    #[error("a VM name is one folder name and may not hold '/'")]
    Slash,
    /// A component is a symbolic link. A backup quiesce writes has none, and one can be
    /// changed after it was checked, so it is refused wherever it leads.
    #[error("{at} is a symbolic link to {target:?}, {leads}")]
    Symlink { at: String, target: String, leads: Leads },
    /// A component is not what the path needs: not a folder on the way, or not a regular
    /// file at the end (a FIFO, a device, a socket).
    #[error("{at} is a {found}, not a {expected}")]
    WrongKind { at: String, found: &'static str, expected: &'static str },
}

/// Where a symbolic link in a backup leads (said in the error, never followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leads {
    Inside,
    Outside,
    /// Its target does not exist.
    Nowhere,
}

impl std::fmt::Display for Leads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Leads::Inside => "which stays inside the backup, but a backup holds no links",
            Leads::Outside => "which leads outside the backup",
            Leads::Nowhere => "which leads nowhere",
        })
    }
}

/// Checks the text of a relative file name: plain components only.
pub fn plain_relative(name: &str) -> Result<(), PathProblem> {
    if name.is_empty() {
        return Err(PathProblem::Empty);
    }
    if name.contains('\0') {
        return Err(PathProblem::Nul);
    }
    if name.starts_with('/') {
        return Err(PathProblem::Absolute);
    }
    // Split by hand: `Path::components` drops `.` and empty components, which are refused.
    match name.split('/').find(|c| c.is_empty() || *c == "." || *c == "..") {
        Some(c) => Err(PathProblem::NotPlain { component: c.to_owned() }),
        None => Ok(()),
    }
}

/// Checks a VM's name, which is one folder name of the backup (`vms/<name>`).
pub fn plain_name(name: &str) -> Result<(), PathProblem> {
    plain_relative(name)?;
    if name.contains('/') {
        return Err(PathProblem::Slash);
    }
    Ok(())
}

/// Why a file of the backup could not be opened: a refused path, or the file system's error
/// (most often: the file is missing).
#[derive(Debug)]
pub enum Resolve {
    Refused(PathProblem),
    Io(std::io::Error),
}

impl From<rustix::io::Errno> for Resolve {
    fn from(e: rustix::io::Errno) -> Self {
        Resolve::Io(e.into())
    }
}

fn kind(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "regular file",
        FileType::Directory => "folder",
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "file of unknown type",
    }
}

/// Opens `rel` (components joined by `/`, already [`plain_relative`]) below the folder
/// `root` for reading, following no symbolic link on the way. `root` itself may be a link:
/// it is the path the user gave.
pub fn open_beneath(root: &Path, rel: &str) -> Result<File, Resolve> {
    plain_relative(rel).map_err(Resolve::Refused)?;
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut dir: OwnedFd = rustix::fs::open(root, dir_flags, Mode::empty())?;
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, name) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let at = parts[..=i].join("/");
        let expected = if last { FileType::RegularFile } else { FileType::Directory };
        // Looked at first without following, so a link or a device is never opened...
        let st = rustix::fs::statat(&dir, *name, AtFlags::SYMLINK_NOFOLLOW)?;
        let found = FileType::from_raw_mode(st.st_mode);
        if found == FileType::Symlink {
            return Err(Resolve::Refused(symlink(root, &dir, name, at)));
        }
        if found != expected {
            return Err(Resolve::Refused(PathProblem::WrongKind { at, found: kind(found), expected: kind(expected) }));
        }
        // ...then opened without following (a FIFO swapped in meanwhile is not waited on),
        // and what was opened is checked again, so a swap in between is caught too.
        let flags = if last { OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC } else { dir_flags };
        let fd = rustix::fs::openat(&dir, *name, flags | OFlags::NOFOLLOW, Mode::empty()).map_err(|e| {
            if e == rustix::io::Errno::LOOP {
                Resolve::Refused(symlink(root, &dir, name, at.clone()))
            } else {
                e.into()
            }
        })?;
        let opened = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
        if opened != expected {
            return Err(Resolve::Refused(PathProblem::WrongKind { at, found: kind(opened), expected: kind(expected) }));
        }
        if last {
            return Ok(File::from(fd));
        }
        dir = fd;
    }
    unreachable!("a plain relative name has at least one component")
}

/// Describes the link `name` in `dir` (at `at` below `root`): where it points, and whether
/// that is inside the backup. Only said, never followed for reading.
fn symlink(root: &Path, dir: &OwnedFd, name: &str, at: String) -> PathProblem {
    let target = rustix::fs::readlinkat(dir, name, Vec::new())
        .map(|t| crate::qemu::message::snippet(t.as_bytes()))
        .unwrap_or_else(|e| format!("(unreadable: {e})"));
    let leads = match (std::fs::canonicalize(root.join(&at)), std::fs::canonicalize(root)) {
        (Ok(to), Ok(root)) if to.starts_with(&root) => Leads::Inside,
        (Ok(_), _) => Leads::Outside,
        (Err(_), _) => Leads::Nowhere,
    };
    PathProblem::Symlink { at, target, leads }
}

/// The path of `rel` below `root`, for a program that opens it by name (QEMU, qemu-img),
/// after the same walk as [`open_beneath`]: it exists, is a regular file, and no link is on
/// the way.
pub fn checked_path(root: &Path, rel: &str) -> Result<PathBuf, Resolve> {
    open_beneath(root, rel)?;
    Ok(root.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink as ln;

    #[test]
    fn only_plain_relative_names_pass() {
        for ok in ["d.raw", "boot/vmlinuz", "a b/c..d/.hidden", "...", "x\\..\\y"] {
            assert_eq!(plain_relative(ok), Ok(()), "{ok}");
        }
        let not_plain = |c: &str| Err(PathProblem::NotPlain { component: c.into() });
        assert_eq!(plain_relative("../../../../etc/passwd"), not_plain(".."));
        assert_eq!(plain_relative("boot/../../x"), not_plain(".."));
        assert_eq!(plain_relative("./d.raw"), not_plain("."));
        assert_eq!(plain_relative("boot//vmlinuz"), not_plain(""));
        assert_eq!(plain_relative("boot/"), not_plain(""));
        assert_eq!(plain_relative("/etc/passwd"), Err(PathProblem::Absolute));
        assert_eq!(plain_relative(""), Err(PathProblem::Empty));
        assert_eq!(plain_relative("a\0b"), Err(PathProblem::Nul));
        assert_eq!(plain_name("vm1"), Ok(()));
        assert_eq!(plain_name("vm1/boot"), Err(PathProblem::Slash));
        assert_eq!(plain_name(".."), not_plain(".."));
    }

    #[test]
    fn the_walk_refuses_links_and_special_files_and_opens_what_is_plain() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("vms/vm1/boot")).unwrap();
        std::fs::write(r.join("vms/vm1/boot/vmlinuz"), b"kernel").unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        let mut f = open_beneath(r, "vms/vm1/boot/vmlinuz").unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!(s, "kernel");

        let refused = |rel: &str| match open_beneath(r, rel) {
            Err(Resolve::Refused(p)) => p,
            Err(Resolve::Io(e)) => panic!("{rel}: expected a refusal, got {e}"),
            Ok(_) => panic!("{rel}: opened"),
        };
        ln("/etc/passwd", r.join("vms/vm1/passwd")).unwrap();
        let p = refused("vms/vm1/passwd");
        assert_eq!(
            p,
            PathProblem::Symlink { at: "vms/vm1/passwd".into(), target: "/etc/passwd".into(), leads: Leads::Outside }
        );
        ln(outside.path(), r.join("vms/vm2")).unwrap();
        assert!(
            matches!(refused("vms/vm2/secret"), PathProblem::Symlink { at, leads: Leads::Outside, .. } if at == "vms/vm2")
        );
        ln("boot/vmlinuz", r.join("vms/vm1/k")).unwrap();
        assert!(matches!(refused("vms/vm1/k"), PathProblem::Symlink { leads: Leads::Inside, .. }));
        ln("nothing-here", r.join("vms/vm1/dangling")).unwrap();
        assert!(matches!(refused("vms/vm1/dangling"), PathProblem::Symlink { leads: Leads::Nowhere, .. }));
        nix::unistd::mkfifo(&r.join("vms/vm1/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(
            refused("vms/vm1/fifo"),
            PathProblem::WrongKind { at: "vms/vm1/fifo".into(), found: "FIFO", expected: "regular file" }
        );
        assert!(matches!(refused("vms/vm1/boot"), PathProblem::WrongKind { found: "folder", .. }));
        assert!(matches!(refused("vms/vm1/boot/vmlinuz/x"), PathProblem::WrongKind { found: "regular file", .. }));
        assert!(matches!(refused("../secret"), PathProblem::NotPlain { .. }));
        assert!(
            matches!(open_beneath(r, "vms/vm1/missing"), Err(Resolve::Io(e)) if e.kind() == std::io::ErrorKind::NotFound)
        );
        // The root itself may be a link: it is the path the user gave.
        ln(r, outside.path().join("backup-link")).unwrap();
        assert!(open_beneath(&outside.path().join("backup-link"), "vms/vm1/boot/vmlinuz").is_ok());
    }
}
