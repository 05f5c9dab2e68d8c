//! Checks run inside a restored guest through `guest-exec`. The guest is untrusted: its
//! output is bounded by the exec client, and only a short tail of it is kept.

use std::time::Duration;

use crate::qemu::exec::{self, ExecError};
use crate::qemu::GuestAgent;
use crate::sys::shell_quote;

/// Lines of a check's output kept for the report.
const TAIL_LINES: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFsck {
    pub disk: String,
    pub device: String,
    /// e2fsck's exit status: 0 clean; 4 errors left uncorrected (with -n); 8 operational error.
    pub exit_code: i64,
    pub tail: String,
}

impl GuestFsck {
    pub fn clean(&self) -> bool {
        self.exit_code == 0
    }
}

/// `e2fsck -fn` of the unmounted disk whose serial is `serial`, in the guest, within
/// `timeout`. A disk that is not there is an error of its own (exit code 8 from the shell).
pub async fn fsck_ext4(agent: &GuestAgent, serial: &str, timeout: Duration) -> Result<GuestFsck, ExecError> {
    // The disk is found by serial through sysfs (no udev in the guest); a mounted disk is
    // refused rather than checked, since e2fsck -n on a live filesystem reports noise.
    let word = shell_quote(serial);
    let script = format!(
        "dev=; for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = {word} ] && dev=/dev/${{b##*/}}; done; \
         [ -n \"$dev\" ] || {{ echo no disk with serial {word}; exit 8; }}; \
         if grep -q \"^$dev \" /proc/mounts; then echo \"$dev is mounted\"; exit 8; fi; \
         echo \"device $dev\"; e2fsck -fn \"$dev\" 2>&1"
    );
    let out = exec::run(agent, &["/bin/sh", "-c", &script], timeout).await?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    let device = lines.first().and_then(|l| l.strip_prefix("device ")).unwrap_or("?").to_owned();
    let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    Ok(GuestFsck { disk: serial.to_owned(), device, exit_code: out.exit_code, tail })
}
