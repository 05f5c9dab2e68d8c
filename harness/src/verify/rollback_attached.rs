//! Rolling a running VM that quiesce did not start back to a backup, in place, through its
//! own QMP socket ([`crate::qemu::attach`]). quiesce may not stop or restart that QEMU, so
//! the disks are written under it: the VM is paused, its disks are made inactive (QEMU
//! then drops its image locks and caches, `blockdev-set-active`, QEMU 10.0+), the backup's
//! disk contents are written onto the VM's own image files, the disks are made active again
//! (QEMU re-reads them) and the VM is reset, so the guest boots from the restored disks.
//!
//! A saved state cannot be loaded into a QEMU that is already running (QEMU loads one only
//! when started with `-incoming`): for a Saved State backup the disks go back to the save
//! point and the guest boots from them, which [`RolledBack::state_not_loaded`] says.
//!
//! Nothing is written unless the VM's disks match the backup's in number, order, format and
//! size. On a failure after the pause and before any disk is written, the disks are made
//! active again and the VM is resumed if it was running.
//!
//! **Never on half-written disks.** Once the first write has begun, a disk may be
//! half-written: a failure from there on leaves the VM paused, and the restore is kept in
//! the VM's recovery journal ([`crate::backup::recovery`], written before the pause with
//! the backup, the VM's identity and its run state). A quiesce killed mid-write leaves the
//! same. The next `quiesce recover`, `backup` or in-place restore on that VM rolls it
//! forward ([`roll_forward`]): the backup verified, written again (the write is
//! idempotent), compared block for block, and only then the VM reset and resumed. A backup
//! that is gone or no longer verifies leaves the VM paused, and the error says why.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::backup::manifest::{Entry, Method};
use crate::backup::recovery::{Before, Identity, InPlaceRecord, Journal, JournalError, RollingForward};
use crate::backup::runstate;
use crate::backup::{Backup, FolderError};
use crate::image::qemu_img::QemuImgError;
use crate::qemu::{DiskConfig, DiskFormat, Machine, MachineError};
use crate::sys::deadline;
use crate::verify::blockcmp::{self, BlockCompareError};

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// The backup holds no VM of that name.
    #[error("the backup has no VM named {0}")]
    NoSuchVm(String),
    /// A file of the backup is refused or missing; nothing was touched.
    #[error(transparent)]
    Backup(#[from] FolderError),
    /// The VM's disks do not match the backup's (number, format, size), or the backup left a
    /// disk out: nothing was touched.
    #[error("the VM does not match the backup, so nothing was touched: {0}")]
    Mismatch(String),
    /// This QEMU cannot release its disks while it runs (`blockdev-set-active` is QEMU 10.0+);
    /// nothing was touched.
    #[error("QEMU {0} cannot make its disks inactive (blockdev-set-active, QEMU 10.0+), so they cannot be written under it; nothing was touched")]
    Unsupported(String),
    /// A QMP step failed; `written` names the disks already written back.
    #[error("{step}: {error}\n{}", written_text(.written))]
    Qmp { step: String, error: MachineError, written: Vec<String> },
    /// Writing a disk back (or reading it back for the check) failed.
    #[error("writing the backup's disk {disk} onto {path} failed: {error}\n{}", written_text(.written))]
    Write { disk: String, path: PathBuf, error: QemuImgError, written: Vec<String> },
    /// The block comparison after writing could not run.
    #[error("comparing disk {disk} with the backup: {error}")]
    Compare { disk: String, error: BlockCompareError },
    /// A host thread doing `what` failed (panicked): a bug in quiesce.
    #[error("{what}: the thread doing it failed: {error}\n{}", written_text(.written))]
    Task { what: String, error: String, written: Vec<String> },
    /// Writing failed, and so did putting the VM back in use: it may be paused with its
    /// disks inactive, and needs a person.
    #[error("{error}\n  and then making the VM's disks active and resuming it failed too: {undo}")]
    UndoFailed { error: Box<RollbackError>, undo: Box<RollbackError> },
    /// The recovery journal could not be written (before the VM was paused: nothing was
    /// touched) or removed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// QEMU's process could not be told apart (its pid from the QMP socket, its start
    /// time), so no recovery journal can name it: nothing was touched.
    #[error("QEMU's pid could not be learnt from its QMP socket {0}, so no recovery journal can name the VM; nothing was touched")]
    NoIdentity(PathBuf),
    /// The backup does not match its checksums (or a file it lists is missing): it cannot
    /// finish the restore, and nothing was written.
    #[error("the backup {backup} no longer verifies: {}", .files.join(", "))]
    NotVerified { backup: PathBuf, files: Vec<String> },
    /// After writing, a disk does not read the same as the backup's image: the VM is left
    /// paused, its journal kept.
    #[error("after writing, disk {disk} differs from the backup's image{}", .at.map_or(" in size".into(), |a| format!(" first at byte {a}")))]
    Differs { disk: String, at: Option<u64> },
    /// A disk was not compared with the backup's image after writing (a bug in quiesce):
    /// the VM is left paused.
    #[error("disk {0} was not compared with the backup's image after writing")]
    NotCompared(String),
    /// A disk's write had begun when this failed: the VM's disks may be half-written, so it
    /// is left paused and the restore kept in its recovery journal. `quiesce recover --qmp`
    /// (or the in-place restore again) finishes it.
    #[error("{error}\n  the VM is left paused: its disks may be half-written, so it must not run on them; `quiesce recover --qmp SOCKET` or the in-place restore again finishes the restore (its journal: {journal})")]
    LeftPaused { error: Box<RollbackError>, journal: PathBuf },
}

fn written_text(written: &[String]) -> String {
    if written.is_empty() {
        "no disk of the VM was changed".into()
    } else {
        format!("disks already written back (the VM's disks are now mixed): {}", written.join(", "))
    }
}

/// What a rollback did.
#[derive(Debug)]
pub struct RolledBack {
    /// Each disk written: (the backup's name, the VM's image).
    pub disks: Vec<(String, PathBuf)>,
    /// Per disk, after writing and before the VM ran: identical to the backup's image, and
    /// the first differing byte if not (only when asked).
    pub blocks: Vec<(String, bool, Option<u64>)>,
    /// The VM was running before and runs again (rebooted).
    pub was_running: bool,
    /// The backup was a Saved State one, whose RAM could not be loaded.
    pub state_not_loaded: bool,
}

async fn ask(m: &Machine, step: &str, cmd: &str, args: Value, written: &[String]) -> Result<Value, RollbackError> {
    m.qmp().execute_raw(cmd, args, deadline::QMP_COMMAND).await.map_err(|e| RollbackError::Qmp {
        step: step.to_owned(),
        error: m.qmp_err(e),
        written: written.to_vec(),
    })
}

/// Rolls `m` (reached at `qmp`) back to VM `vm_name` of `backup`, in place. With
/// `check_blocks`, each written disk is compared with the backup's image before the VM
/// runs again. `prior`: the run state before an in-place restore this one takes over (a
/// killed one that could not be finished), whose pause is not the VM's own.
pub async fn roll_back(
    backup: &Backup,
    vm_name: &str,
    m: &Machine,
    qmp: &Path,
    check_blocks: bool,
    prior: Option<&Before>,
) -> Result<RolledBack, RollbackError> {
    let vb = backup.vm(vm_name).ok_or_else(|| RollbackError::NoSuchVm(vm_name.to_owned()))?;
    let pairs = matching(backup, vm_name, m).await?;
    let schema = ask(m, "query-qmp-schema", "query-qmp-schema", Value::Null, &[]).await?;
    let can = schema.as_array().is_some_and(|a| a.iter().any(|e| e["name"] == "blockdev-set-active"));
    if !can {
        let v = m.qmp().version().map(|(a, b, c)| format!("{a}.{b}.{c}")).unwrap_or_else(|| "?".into());
        return Err(RollbackError::Unsupported(v));
    }
    let now = runstate::query(m).await.map_err(|error| RollbackError::Qmp {
        step: "query-status".into(),
        error,
        written: vec![],
    })?;
    let before = prior.cloned().unwrap_or(Before { running: now.running, status: now.status.clone() });
    let id = Identity::of(qmp, m.pid(), m.name())
        .filter(|_| m.pid() != 0)
        .ok_or_else(|| RollbackError::NoIdentity(qmp.to_owned()))?;
    // Journaled before the pause: a quiesce killed from here on leaves the next run the
    // backup to finish the restore with, and the run state to put back.
    let journal = Journal::in_place(id, before.clone(), &backup.path, vm_name)?;
    if now.running {
        let _ = m.qmp().events().drain("STOP");
        if let Err(e) = ask(m, "pause the VM", "stop", Value::Null, &[]).await {
            let _ = journal.clear();
            return Err(e);
        }
    }
    let mut written = Vec::new();
    let mut blocks = Vec::new();
    let mut begun = false;
    let result = write_all(m, &pairs, check_blocks, &mut written, &mut blocks, &mut begun).await;
    if let Err(error) = result {
        if begun {
            return Err(RollbackError::LeftPaused { error: Box::new(error), journal: journal.path().to_owned() });
        }
        // Nothing written: the VM back as it was, and so the journal no longer needed.
        return match put_in_use(m, false, before.running, &written).await {
            Ok(()) => {
                journal.clear()?;
                Err(error)
            }
            Err(undo) => Err(RollbackError::UndoFailed { error: Box::new(error), undo: Box::new(undo) }),
        };
    }
    // Every disk written: the guest started afresh on them, and running again if it was.
    // Should this fail, the journal stays, and the next run finishes it.
    put_in_use(m, true, before.running, &written).await?;
    journal.clear()?;
    Ok(RolledBack {
        disks: pairs.iter().map(|(name, d, _, _)| (name.clone(), d.path.clone())).collect(),
        blocks,
        was_running: before.running,
        state_not_loaded: vb.method == Method::SavedState,
    })
}

/// Finishes an in-place restore a killed quiesce left in `m` ([`crate::backup::recovery::RollForward`]):
/// the backup opened and verified, written again, compared block for block, and only then
/// the VM reset and resumed if it ran before (`before`). Any error leaves the VM paused. A
/// VM that runs was never paused by the restore (it was killed before the pause), so no
/// disk was written: it is left alone (`None`).
pub fn roll_forward<'a>(m: &'a Machine, restore: &'a InPlaceRecord, before: &'a Before) -> RollingForward<'a> {
    Box::pin(async move {
        let now = runstate::query(m).await?;
        if now.running {
            return Ok(None);
        }
        let path = restore.backup.clone();
        let backup = tokio::task::spawn_blocking(move || -> Result<Backup, RollbackError> {
            let backup = Backup::open(&path)?;
            let bad = backup.verify()?;
            if bad.is_empty() {
                return Ok(backup);
            }
            let files = bad.iter().map(|b| b.file.display().to_string()).collect();
            Err(RollbackError::NotVerified { backup: path, files })
        })
        .await??;
        let pairs = matching(&backup, &restore.vm, m).await?;
        let (mut written, mut blocks, mut begun) = (Vec::new(), Vec::new(), false);
        write_all(m, &pairs, true, &mut written, &mut blocks, &mut begun).await?;
        // Resumed only on disks each read the same as the backup, block for block.
        for (name, ..) in &pairs {
            match blocks.iter().find(|(n, ..)| n == name) {
                Some((_, true, _)) => {}
                Some((_, false, at)) => return Err(RollbackError::Differs { disk: name.clone(), at: *at }.into()),
                None => return Err(RollbackError::NotCompared(name.clone()).into()),
            }
        }
        put_in_use(m, true, before.running, &written).await?;
        Ok(Some(written))
    })
}

type Pair = (String, DiskConfig, PathBuf, DiskFormat);

/// The backup's disks paired, in order, with the VM's: (backup name, VM disk, backup
/// image, its format). An error says what differs.
async fn matching(backup: &Backup, vm_name: &str, m: &Machine) -> Result<Vec<Pair>, RollbackError> {
    let vb = backup.vm(vm_name).ok_or_else(|| RollbackError::NoSuchVm(vm_name.to_owned()))?;
    if !vb.excluded.is_empty() {
        return Err(RollbackError::Mismatch("the backup left disks out (pass-through or iSCSI)".into()));
    }
    let order = &vb.machine.disk_order;
    let mut ours = vb.disks.clone();
    ours.sort_by_key(|d| order.iter().position(|n| n == &d.node_name).unwrap_or(usize::MAX));
    let theirs = &m.config().disks;
    if ours.len() != theirs.len() {
        return Err(RollbackError::Mismatch(format!("the backup has {} disks, the VM {}", ours.len(), theirs.len())));
    }
    let nodes = ask(m, "query-named-block-nodes", "query-named-block-nodes", json!({"flat": true}), &[]).await?;
    let size_of =
        |node: &str| nodes.as_array()?.iter().find(|n| n["node-name"] == node)?["image"]["virtual-size"].as_u64();
    let mut out = Vec::new();
    for (b, d) in ours.iter().zip(theirs) {
        if b.format != d.format {
            return Err(RollbackError::Mismatch(format!(
                "disk {} is {} in the backup, but the VM's disk {} is {}",
                b.node_name,
                b.format.driver(),
                d.node_name,
                d.format.driver()
            )));
        }
        let size = size_of(m.qemu_node(d));
        if size != Some(b.virtual_size) {
            return Err(RollbackError::Mismatch(format!(
                "disk {} is {} bytes in the backup, but the VM's disk {} is {}",
                b.node_name,
                b.virtual_size,
                d.node_name,
                size.map_or("of unknown size".into(), |s| format!("{s} bytes"))
            )));
        }
        let image = backup.file_path(vm_name, &Entry::Disk(b.node_name.clone()), &b.file)?;
        out.push((b.node_name.clone(), d.clone(), image, b.format));
    }
    Ok(out)
}

async fn write_all(
    m: &Machine,
    pairs: &[Pair],
    check_blocks: bool,
    written: &mut Vec<String>,
    blocks: &mut Vec<(String, bool, Option<u64>)>,
    begun: &mut bool,
) -> Result<(), RollbackError> {
    ask(m, "make the VM's disks inactive", "blockdev-set-active", json!({"active": false}), written).await?;
    for (name, d, image, fmt) in pairs {
        // Test-only hold point, and a trace the recovery tests kill quiesce mid-write at.
        crate::timeline::hold_point(Some(m.name()), &format!("write disk {name} of the backup")).await;
        *begun = true;
        let (src, dst, f) = (image.clone(), d.path.clone(), *fmt);
        let task = |e: tokio::task::JoinError, written: &[String]| RollbackError::Task {
            what: format!("writing disk {name}"),
            error: e.to_string(),
            written: written.to_vec(),
        };
        let r = tokio::task::spawn_blocking(move || write_into(&src, &dst, f)).await.map_err(|e| task(e, written))?;
        if let Err(error) = r {
            return Err(RollbackError::Write {
                disk: name.clone(),
                path: d.path.clone(),
                error,
                written: written.clone(),
            });
        }
        written.push(name.clone());
        if check_blocks {
            let (a, b, f) = (d.path.clone(), image.clone(), *fmt);
            let c = tokio::task::spawn_blocking(move || blockcmp::compare(&a, f, &b, f))
                .await
                .map_err(|e| task(e, written))?
                .map_err(|error| RollbackError::Compare { disk: name.clone(), error })?;
            blocks.push((name.clone(), c.identical, c.first_difference));
        }
    }
    Ok(())
}

/// The disks active again; a guest whose disks were written is reset (it must not go on
/// with caches of the disks it had); resumed if it was running.
async fn put_in_use(m: &Machine, reset: bool, resume: bool, written: &[String]) -> Result<(), RollbackError> {
    ask(m, "make the VM's disks active again", "blockdev-set-active", json!({"active": true}), written).await?;
    if reset {
        ask(m, "reset the VM", "system_reset", Value::Null, written).await?;
    }
    if resume {
        let _ = m.qmp().events().drain("RESUME");
        ask(m, "resume the VM", "cont", Value::Null, written).await?;
        m.qmp().wait_event("RESUME", |_| true, deadline::COMMAND_EVENT).await.map_err(|e| RollbackError::Qmp {
            step: "wait for RESUME".into(),
            error: m.qmp_err(e),
            written: written.to_vec(),
        })?;
    }
    Ok(())
}

/// The guest-visible content of `src` written into the existing image `dst` of the same
/// format (`qemu-img convert -n`: `dst` keeps its path and backing file). The VM's QEMU has
/// made the disk inactive, so it holds no lock that would refuse this. qemu-img dies with
/// quiesce: a write must not go on behind a killed quiesce, racing the next run's.
fn write_into(src: &Path, dst: &Path, format: DiskFormat) -> Result<(), QemuImgError> {
    let f = format.driver();
    crate::sys::Tool::new("qemu-img", deadline::QEMU_IMG_COPY)
        .die_with_parent()
        .args(["convert", "-n", "-q", "-f", f, "-O", f])
        .arg(src)
        .arg(dst)
        .run()?;
    Ok(())
}
