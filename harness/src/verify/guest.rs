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

/// The `guest` check of a restore, from the agent's `guest-fsfreeze-status` reply and the
/// guest's `/proc/mounts`: it passes when the filesystems are thawed and the root filesystem
/// is mounted read-write (a guest that came up on a damaged root remounts it read-only).
/// Returns the verdict and its detail, for a restore through QEMU or through libvirt alike.
pub fn judge_restored(freeze_status: &serde_json::Value, mounts: &str) -> (bool, String) {
    let root_rw = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/") && f.get(3).is_some_and(|o| o.split(',').any(|o| o == "rw"))
    });
    let ok = *freeze_status == serde_json::json!("thawed") && root_rw;
    let detail =
        format!("filesystems {freeze_status}; root filesystem mounted {}", if root_rw { "rw" } else { "NOT rw" });
    (ok, detail)
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

/// A data disk mounted for the first time in a guest booted on its own: whether the
/// kernel had to replay its journal, and whether it is clean afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub disk: String,
    pub device: String,
    /// The kernel mounted it.
    pub mounted: bool,
    /// The kernel said it replayed the journal ("EXT4-fs (vdX): recovery complete").
    pub replayed: bool,
    /// The kernel's lines about the device, for the report.
    pub kernel: Vec<String>,
    /// `e2fsck -fn` once the kernel had mounted and unmounted it (None if it never mounted).
    pub fsck_exit: Option<i64>,
    pub fsck_tail: String,
}

impl Recovery {
    /// Mounted, and clean after whatever the kernel had to do.
    pub fn recovered(&self) -> bool {
        self.mounted && self.fsck_exit == Some(0)
    }
}

/// Mounts the ext4 disk whose serial is `serial` at `/mnt/<serial>` for the first time in
/// this boot, reads what the kernel said about it, unmounts it for `e2fsck -fn`, and
/// mounts it again (left mounted for the checks that follow).
pub async fn recover_ext4(agent: &GuestAgent, serial: &str, timeout: Duration) -> Result<Recovery, ExecError> {
    let script = format!(
        "dev=; for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = '{serial}' ] && dev=/dev/${{b##*/}}; done; \
         [ -n \"$dev\" ] || {{ echo 'no disk with serial {serial}'; exit 8; }}; \
         if grep -q \"^$dev \" /proc/mounts; then echo \"$dev is mounted already\"; exit 8; fi; \
         echo \"device $dev\"; mnt=/mnt/{serial}; mkdir -p $mnt; \
         mount -t ext4 $dev $mnt 2>&1 || {{ echo 'not mounted'; exit 0; }}; echo mounted; \
         dmesg | grep \"EXT4-fs (${{dev#/dev/}})\" | tail -n 20 | sed 's/^/kernel /'; \
         umount $mnt || exit 8; e2fsck -fn $dev > /tmp/recover.fsck 2>&1; echo \"fsck $?\"; \
         tail -n {TAIL_LINES} /tmp/recover.fsck; mount -t ext4 $dev $mnt || exit 8"
    );
    let out = exec::run(agent, &["/bin/sh", "-c", &script], timeout).await?;
    if out.exit_code != 0 {
        return Err(ExecError::Failed {
            argv: vec!["/bin/sh".into(), "-c".into(), format!("(mount, e2fsck and mount {serial})")],
            exit_code: out.exit_code,
            stderr: format!("{}{}", out.stdout.trim(), out.stderr.trim()),
        });
    }
    Ok(parse_recovery(serial, &out.stdout))
}

fn parse_recovery(serial: &str, out: &str) -> Recovery {
    let mut r = Recovery {
        disk: serial.to_owned(),
        device: "?".into(),
        mounted: false,
        replayed: false,
        kernel: vec![],
        fsck_exit: None,
        fsck_tail: String::new(),
    };
    let mut tail = Vec::new();
    for line in out.lines() {
        if let Some(d) = line.strip_prefix("device ") {
            r.device = d.to_owned();
        } else if line == "mounted" {
            r.mounted = true;
        } else if let Some(k) = line.strip_prefix("kernel ") {
            r.replayed |= k.ends_with("recovery complete");
            r.kernel.push(k.to_owned());
        } else if let Some(code) = line.strip_prefix("fsck ") {
            r.fsck_exit = code.trim().parse().ok();
        } else if r.fsck_exit.is_some() {
            tail.push(line);
        }
    }
    r.fsck_tail = tail.join("\n");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_passes_when_thawed_on_a_read_write_root() {
        let thawed = serde_json::json!("thawed");
        let rw = "sysfs /sys sysfs rw,nosuid 0 0\n/dev/vda / ext4 rw,relatime 0 0\n";
        let ro = "/dev/vda / ext4 ro,relatime 0 0\n/dev/vdb /mnt/rw ext4 rw 0 0\n";
        assert_eq!(judge_restored(&thawed, rw), (true, "filesystems \"thawed\"; root filesystem mounted rw".into()));
        // A root remounted read-only after errors fails, whatever else is mounted rw.
        assert!(!judge_restored(&thawed, ro).0);
        assert!(!judge_restored(&serde_json::json!("frozen"), rw).0);
        // Garbage from an untrusted guest is no pass.
        assert!(!judge_restored(&thawed, "\u{0}/ / \n").0);
    }

    #[test]
    fn recoveries_read_from_the_guest() {
        let out = "device /dev/vdb\nmounted\nkernel [    6.1] EXT4-fs (vdb): recovery complete\n\
                   kernel [    6.2] EXT4-fs (vdb): mounted filesystem r/w with ordered data mode\nfsck 0\n\
                   data: 12/16384 files\n";
        let r = parse_recovery("data", out);
        assert!(r.replayed && r.recovered() && r.device == "/dev/vdb", "{r:?}");
        assert_eq!(r.fsck_tail, "data: 12/16384 files");
        let clean =
            parse_recovery("data", "device /dev/vdb\nmounted\nkernel EXT4-fs (vdb): mounted filesystem\nfsck 0\n");
        assert!(!clean.replayed && clean.recovered());
        let bad = parse_recovery("data", "device /dev/vdb\nmount: invalid argument\nnot mounted\n");
        assert!(!bad.mounted && !bad.recovered());
        assert!(!parse_recovery("data", "device /dev/vdb\nmounted\nfsck 4\nerrors\n").recovered());
    }
}
