//! A file mapped read-only into memory, so that a reader compares the page cache's own pages
//! instead of copying them out first (`verify::blockcmp`: a warm 1 GiB pair compared in
//! about half the time of reading it with `pread`).
//!
//! A plain mapping has one hazard a read does not: if the file shrinks after it was mapped
//! (another process truncates it) or a page cannot be read from the disk, touching that
//! page raises SIGBUS, which would kill the whole process. Here a SIGBUS handler, installed
//! once, looks up the faulting address among the live mappings; if it is in one, the page
//! is replaced by a page of zeros, the mapping is marked [`damaged`](Mapped::damaged), and
//! the read goes on. The reader checks `damaged` when it is done and reports the file as
//! changed or unreadable. A SIGBUS anywhere else goes to the handler that was there before
//! (Rust's own, or the default action), as if ours did not exist.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// Mappings live at once; when all slots are taken, [`Mapped::map`] gives None and the
/// caller reads the file instead.
const SLOTS: usize = 64;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    damaged: AtomicBool,
    taken: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    damaged: AtomicBool::new(false),
    taken: AtomicBool::new(false),
};
static SLOTS_IN_USE: [Slot; SLOTS] = [FREE; SLOTS];

/// The SIGBUS action that was installed before ours (set once, before ours is installed).
static PREVIOUS: std::sync::OnceLock<libc::sigaction> = std::sync::OnceLock::new();
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// A read-only, shared mapping of a whole file, as long as it was when mapped.
pub struct Mapped {
    ptr: *const u8,
    len: usize,
    slot: usize,
}

// SAFETY: the mapping is read-only memory owned by this value alone; it is unmapped only
// in Drop, so sharing references to it between threads is like sharing a `&[u8]`.
#[allow(unsafe_code)]
unsafe impl Send for Mapped {}
#[allow(unsafe_code)]
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Maps `file` whole. None if there is nothing to map (an empty file, not a regular
    /// file) or no slot is free: the caller then reads the file with `pread`.
    #[allow(unsafe_code)]
    pub fn map(file: &File) -> std::io::Result<Option<Mapped>> {
        let meta = file.metadata()?;
        let Ok(len) = usize::try_from(meta.len()) else { return Ok(None) };
        if !meta.is_file() || len == 0 || !install() {
            return Ok(None);
        }
        let Some(slot) = take_slot() else { return Ok(None) };
        // SAFETY: a new read-only mapping of an open file, at an address the kernel picks;
        // no existing memory is touched. The result is checked for MAP_FAILED.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            SLOTS_IN_USE[slot].taken.store(false, Ordering::Release);
            return Err(std::io::Error::last_os_error());
        }
        let s = &SLOTS_IN_USE[slot];
        s.damaged.store(false, Ordering::Relaxed);
        s.len.store(len, Ordering::Relaxed);
        // Published last: the handler matches a slot only once its start is set.
        s.start.store(ptr as usize, Ordering::Release);
        Ok(Some(Mapped { ptr: ptr as *const u8, len, slot }))
    }

    /// The file's bytes. If another process changes the file meanwhile, what is read is
    /// whatever the page holds at that moment (as with `pread`); a page that can no longer
    /// be read reads as zeros and sets [`damaged`](Self::damaged).
    #[allow(unsafe_code)]
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live mapping owned by self (unmapped only in Drop), and
        // SIGBUS inside it is turned into a zero page by the handler instead of a crash.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// True if a page could not be read since the file was mapped: the file shrank, or the
    /// disk failed. What was read from such a page is zeros, not the file.
    pub fn damaged(&self) -> bool {
        SLOTS_IN_USE[self.slot].damaged.load(Ordering::Acquire)
    }
}

impl Drop for Mapped {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        let s = &SLOTS_IN_USE[self.slot];
        s.start.store(0, Ordering::Release);
        s.len.store(0, Ordering::Release);
        // SAFETY: the mapping is ours and no reference to it outlives self.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        s.taken.store(false, Ordering::Release);
    }
}

fn take_slot() -> Option<usize> {
    SLOTS_IN_USE.iter().position(|s| s.taken.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok())
}

/// Installs the SIGBUS handler once; false if that failed (mapping is then not used).
#[allow(unsafe_code)]
fn install() -> bool {
    INSTALL.call_once(|| {
        // SAFETY: sigaction with a zeroed struct filled in field by field; the previous
        // action is saved before ours is installed, so the handler can always reach it.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return;
            }
            let _ = PREVIOUS.set(old);
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) == 0 {
                INSTALLED.store(true, Ordering::Release);
            }
        }
    });
    INSTALLED.load(Ordering::Acquire)
}

/// The SIGBUS handler. It only reads atomics, calls mmap (a system call) and the previous
/// handler: nothing that allocates or locks.
#[allow(unsafe_code)]
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &SLOTS_IN_USE {
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        if start != 0 && addr >= start && addr - start < len {
            // SAFETY: sysconf and mmap are system calls; the page replaced lies inside a
            // mapping of ours (checked above), so no other memory is touched.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
            let at = addr & !(page - 1);
            let zero = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if zero != libc::MAP_FAILED {
                s.damaged.store(true, Ordering::Release);
                return; // The faulting read runs again and reads zeros.
            }
        }
    }
    // Not ours: what would have happened without us.
    match PREVIOUS.get() {
        Some(old) if old.sa_flags & libc::SA_SIGINFO != 0 && old.sa_sigaction > libc::SIG_IGN => {
            // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this
            // signature; we pass it the kernel's own arguments.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(old.sa_sigaction) };
            f(sig, info, ctx);
        }
        Some(old) if old.sa_sigaction > libc::SIG_IGN => {
            // SAFETY: a plain handler, installed without SA_SIGINFO, takes the signal number.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(old.sa_sigaction) };
            f(sig);
        }
        _ => {
            // The default action: restore it and return, so the faulting access runs again
            // and the kernel ends the process as it would have.
            // SAFETY: sigaction with a zeroed struct whose handler is SIG_DFL.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_mapping_reads_the_file_and_survives_the_file_shrinking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        let data: Vec<u8> = (0..5 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all(&data).unwrap();
        let file = File::open(&path).unwrap();
        let m = Mapped::map(&file).unwrap().expect("a regular file maps");
        assert_eq!(m.bytes(), &data[..]);
        assert!(!m.damaged());
        // Another writer cuts the file to one page: the pages past its end read as zeros,
        // and the mapping says it was damaged, instead of SIGBUS ending the test process.
        f.set_len(4096).unwrap();
        let tail = &m.bytes()[4096..];
        assert!(tail.iter().all(|&b| b == 0));
        assert!(m.damaged());
        assert_eq!(&m.bytes()[..4096], &data[..4096]);
        drop(m);
        // A new mapping of the same slot starts undamaged.
        let m = Mapped::map(&file).unwrap().unwrap();
        assert!(!m.damaged());
        assert!(Mapped::map(&File::open(dir.path()).unwrap()).unwrap().is_none(), "a folder is not mapped");
    }
}
