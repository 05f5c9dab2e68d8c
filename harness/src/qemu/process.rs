//! A QEMU process: a [`sys::Child`](crate::sys::Child) that inherits the sockets it is told
//! about, writes its stdout and stderr to one file, and is killed if the thread that
//! launched it dies (PDEATHSIG), so launch it from a long-lived thread. Every wait on it
//! takes a deadline, and dropping it kills and reaps it.

use std::fs::File;
use std::ops::{Deref, DerefMut};
use std::os::fd::RawFd;
use std::path::Path;

use crate::sys::{Child, Spawn};

pub struct QemuProcess(Child);

impl QemuProcess {
    /// Starts `program` with `args`, letting it inherit `keep_fds`; its stderr and stdout
    /// go to `output`.
    pub fn spawn(program: &str, args: &[String], keep_fds: &[RawFd], output: &Path) -> std::io::Result<Self> {
        let out = File::create(output)?;
        let spawn = Spawn::new(program).args(args).stdout(out.try_clone()?).stderr(out).die_with_parent();
        let spawn = keep_fds.iter().fold(spawn, |s, &fd| s.keep_fd(fd));
        Ok(QemuProcess(spawn.spawn()?))
    }
}

impl Deref for QemuProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for QemuProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}
