//! Backing up a libvirt domain (`quiesce backup --libvirt DOMAIN`): a VM whose QEMU libvirt
//! started and whose monitor libvirt owns. The six conditions are checked and the backup
//! folder is the one a scenario writes (verify, diff and restore work on it), but every
//! change to the domain goes through libvirt's own APIs, by `virsh`:
//!
//! - the disks, their formats and the machine come from the live XML (`virsh dumpxml`,
//!   [`domain`]); the guest-side conditions from the agent (`virsh qemu-agent-command`,
//!   questions only: `guest-info`, `guest-get-fsinfo`, `guest-get-disks`, `guest-get-osinfo`);
//! - Child VM Snapshot is libvirt's external disk-only snapshot with the agent's freeze
//!   (`virsh snapshot-create-as --disk-only --quiesce --atomic --no-metadata`, overlays in the
//!   snapshot folder), a copy of the images under the overlays, then `virsh blockcommit
//!   --active --shallow --pivot` per disk and the overlays deleted;
//! - Saved State is libvirt's external checkpoint (`snapshot-create-as --no-metadata
//!   --memspec file=STATE` without `--live`): libvirt pauses the domain, saves its RAM and
//!   devices into the backup, puts the overlays on and continues it, so the downtime is the
//!   save alone; then the same copy and merge. A paused domain stays paused: its state is
//!   saved with no overlay (`--diskspec DISK,snapshot=no`: nothing can write to its disks),
//!   and its disks are copied as they are. (With overlays, the paused domain's disks would
//!   stay inactive in QEMU 10 after the save, and `blockcommit` fails on them until it is
//!   continued, measured on libvirt 9.0.) The domain's XML is kept in the backup, and the
//!   restore goes through libvirt ([`restore`]): a libvirt save image loads only into the
//!   devices libvirt builds for it.
//!
//! Several domains are one set, all or nothing, through the phases of a set of QEMUs
//! ([`crate::backup::set`]): PrepareForSnapshot (every domain's snapshot or checkpoint),
//! Freeze and Thaw (recorded), PostSnapshot (copies and merges). If any domain fails, or
//! the run is interrupted, every domain is put back and no backup is left.
//!
//! Why libvirt's APIs and not QMP passed through it (`virsh qemu-monitor-command`), measured
//! on libvirt 9.0 with QEMU 10.0 under TCG (README, "Back up a libvirt domain", and the
//! figures below): the methods
//! change the block graph, and libvirt tracks that graph itself. Overlays added behind its
//! back are missing from its XML (so a later `virsh snapshot`, `blockcommit` or migration
//! acts on a chain that is not there), libvirt marks the domain tainted
//! (`custom-monitor`) for the rest of its life, and the files QEMU must open get no
//! security labels, so a confined QEMU cannot open them. libvirt's snapshot does the same
//! freeze, overlay and thaw in one call with its labels, its XML and its own clean-up when it
//! fails (`--atomic`), and `--no-metadata` leaves no snapshot behind in its records. Each
//! virsh call costs a process and a connection (tens of ms), which only matters for a
//! many-step protocol over QMP, not for the few calls made here. The `virt` crate would save
//! that process but needs libvirt's C library to build, and quiesce must build where
//! libvirt is absent; virsh also gives each call a deadline for free.
//!
//! The domain is left as it was on every path: after the snapshot, the put-back reads the
//! live XML (not what was asked: a virsh past its deadline may have left libvirt to finish
//! alone) and commits each disk still on its overlay; after a failure the agent is thawed
//! (`virsh domfsthaw`, harmless on a thawed guest). SIGINT is acted on between libvirt
//! calls: a snapshot or commit under way finishes (virsh runs in a process group of its
//! own, so a Ctrl-C at the terminal does not cut it half-way; libvirt would finish it alone
//! anyway), a copy of the disks is stopped (its qemu-img killed), then every domain is put
//! back. quiesce never destroys, undefines or reconfigures the domain, and saves it only
//! by the checkpoint that leaves it running (or paused, if it was).
//!
//! A quiesce killed with SIGKILL runs no put-back: before libvirt's snapshot or checkpoint
//! it writes the domain's recovery journal ([`journal`]), and the next run on the domain
//! replays it first (commits the overlays the domain is still on), as `quiesce recover
//! --libvirt` does alone.
//!
//! The measurements (README): a virsh call costs 77-134 ms here (a process and a
//! connection), QMP on a socket under 1 ms; `qemu-monitor-command` taints the domain
//! (`custom-monitor`) and a `blockdev-add` through it is missing from the XML afterwards;
//! block job events do arrive through `qemu-monitor-event`; libvirt's quiesced disk-only
//! snapshot took 1.3 s and its active commit 0.15 s on an idle guest under TCG.

pub mod domain;
pub mod journal;
pub mod member;
pub mod restore;
pub mod save_image;
pub mod virsh;

use std::path::{Path, PathBuf};

use futures::future::join_all;

use self::domain::{DomainDisk, DomainXmlError};
use self::journal::{DomainId, Journal, OverlayRecord};
use self::member::Member;
use self::virsh::{Virsh, VirshError};
use super::conditions::Verdict;
use super::job::MethodChoice;
use super::manifest::Method;
use super::{BackupError, BackupWriter};
use crate::interrupt::Interrupt;
use crate::timeline::Timeline;

/// Why libvirt domains were not backed up. In every case each domain was put back as it
/// was, unless the error says otherwise ([`LibvirtError::NotPutBack`], or a put-back named
/// in [`LibvirtError::SetFailed`]).
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// virsh failed or timed out; libvirt's own words follow.
    #[error(transparent)]
    Virsh(#[from] VirshError),
    /// The domain's XML cannot be used (a disk quiesce cannot copy, a malformed answer).
    /// Nothing was touched.
    #[error("libvirt domain {domain}: {source}")]
    Domain { domain: String, source: DomainXmlError },
    /// The method asked for cannot be used on the domain (a condition of Child VM Snapshot
    /// failed, or Saved State on a domain neither running nor paused); nothing was touched.
    #[error("libvirt domain {domain}: refused: {reasons}")]
    Refused { domain: String, reasons: String },
    /// Two domains of the set have the same name in the backup; nothing was touched.
    #[error("two domains are both named {vm} in the backup: give each once; nothing was touched")]
    Duplicate { vm: String },
    /// An overlay file of this run's name exists already in the snapshot folder (another
    /// quiesce backup of the domain under way, or one killed): remove it or give
    /// --snapshot-dir. Nothing was touched.
    #[error("libvirt domain {domain}: {0} exists already; is another backup of it under way?", .path.display())]
    OverlayExists { domain: String, path: PathBuf },
    /// Copying or writing the backup failed; the domain was put back.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The recovery journal a killed quiesce left for a domain could not be replayed: this
    /// run did nothing to any domain (the error says what the domain may still hold).
    #[error(transparent)]
    Recovery(#[from] journal::RecoveryError),
    /// The domain's recovery journal could not be written (the state folder is not
    /// writable, or full): without it a quiesce killed mid-backup could not be undone, so
    /// the change it was to precede was not made.
    #[error("libvirt domain {domain}: {source}")]
    Journal { domain: String, source: crate::backup::recovery::JournalError },
    /// A domain failed in a phase: no backup was written, and every domain of the set was
    /// put back (`undone` says how, per domain, and names any that could not be).
    #[error("{phase} failed: {error}\nno domain was backed up; undone: {undone}")]
    SetFailed { phase: &'static str, error: Box<LibvirtError>, undone: String },
    /// SIGINT or SIGTERM: every domain was put back and no backup was left.
    #[error("interrupted in {phase}; every domain was put back as it was and no backup was written{undone}")]
    Interrupted { phase: &'static str, undone: String },
    /// The backup failed, and putting the domain back failed too: it may still run on an
    /// overlay (named here) and needs a person: `virsh blockcommit DOMAIN DISK --active
    /// --shallow --pivot`, then delete the overlay.
    #[error("libvirt domain {domain}: {error}\n  and putting it back failed: {put_back}")]
    NotPutBack { domain: String, error: String, put_back: String },
}

/// What to back up, and how.
#[derive(Debug, Clone)]
pub struct LibvirtBackup {
    /// The domains (names or UUIDs): one set, all or nothing.
    pub domains: Vec<String>,
    /// libvirt's connection URI (`virsh -c`); virsh's default when None.
    pub connect: Option<String>,
    pub method: MethodChoice,
    /// Where the overlays go while the backup runs; by default each domain's first disk's
    /// folder.
    pub snapshot_dir: Option<PathBuf>,
}

/// What the run learnt of one domain before it acted.
#[derive(Debug, Clone)]
pub struct Seen {
    pub domain: String,
    /// Its name in the backup.
    pub vm: String,
    pub disks: Vec<DomainDisk>,
    pub verdicts: Vec<Verdict>,
    /// The method and why; None if it stopped before choosing.
    pub method: Option<(Method, String)>,
}

/// What a run found and did: what a killed quiesce's journals left and what was undone of
/// it (per domain, as named), each domain as it was seen (before anything was touched),
/// and the backup's folder or the error.
#[derive(Debug)]
pub struct Outcome {
    pub recovered: Vec<(String, journal::Found)>,
    pub seen: Vec<Seen>,
    pub result: Result<PathBuf, LibvirtError>,
}

/// Backs up `opts.domains` as one set into `out` (a folder that must not exist).
pub async fn run(opts: &LibvirtBackup, out: &Path, tl: &Timeline, interrupt: &Interrupt) -> Outcome {
    let (mut recovered, mut seen) = (Vec::new(), Vec::new());
    let result = backup(opts, out, tl, interrupt, &mut recovered, &mut seen).await;
    Outcome { recovered, seen, result }
}

async fn backup(
    opts: &LibvirtBackup,
    out: &Path,
    tl: &Timeline,
    interrupt: &Interrupt,
    recovered: &mut Vec<(String, journal::Found)>,
    seen: &mut Vec<Seen>,
) -> Result<PathBuf, LibvirtError> {
    let virsh = Virsh::new(opts.connect.clone())?;
    // First, what a quiesce killed mid-backup left in these domains (its journals).
    for domain in &opts.domains {
        let found = journal::replay(&virsh, domain, tl).await?;
        recovered.push((domain.clone(), found));
    }
    // Questions only: a refusal or an error here has touched nothing.
    let mut members: Vec<Member> = Vec::new();
    for domain in &opts.domains {
        let (mut m, snapshot_dir) = member::inspect(&virsh, domain, opts.snapshot_dir.as_deref(), tl).await?;
        let chosen = member::choose(&mut m, opts.method, &snapshot_dir);
        seen.push(Seen {
            domain: domain.clone(),
            vm: m.vm.clone(),
            disks: m.dom.disks.clone(),
            verdicts: m.verdicts.clone(),
            method: chosen.is_ok().then(|| (m.method, m.reason.clone())),
        });
        chosen?;
        if members.iter().any(|o| o.vm == m.vm) {
            return Err(LibvirtError::Duplicate { vm: m.vm });
        }
        members.push(m);
        if interrupt.is_triggered() {
            return Err(LibvirtError::Interrupted { phase: "the conditions", undone: String::new() });
        }
    }
    let journals = journals_of(&virsh, &members).await?;
    let version = qemu_version(&virsh).await;
    let out_abs = std::path::absolute(out).map_err(|e| BackupError::io("-", "find the backup folder", e))?;
    let mut writer = BackupWriter::create(&out_abs, &version).map_err(BackupError::from)?;
    let mut dirs = Vec::new();
    let mut specs = Vec::new();
    for m in &members {
        let dir = writer.vm_dir(&m.vm).map_err(BackupError::from)?;
        specs.push(super::job::machine_spec_of(&m.vm, &m.cfg, &dir)?);
        // The domain's XML as libvirt would define it elsewhere: the record of the domain,
        // and what marks the backup as a libvirt domain's for `quiesce restore`.
        let xml = virsh.run(&["dumpxml", &m.domain, "--migratable"], virsh::COMMAND).await?;
        std::fs::write(dir.join(restore::DOMAIN_XML), xml)
            .map_err(|e| BackupError::io(&m.vm, "write the domain XML", e))?;
        dirs.push(dir);
    }

    // PrepareForSnapshot, every domain at once. Not raced with the interruption: a virsh
    // snapshot cut half-way leaves libvirt to finish alone; it is acted on after the phase.
    let prepared = tl
        .step(None, "PrepareForSnapshot", async {
            let all = join_all(members.iter().zip(&dirs).zip(&journals).map(|((m, dir), j)| {
                let step = if m.method == Method::SavedState {
                    "save the state, overlays on (libvirt checkpoint)"
                } else {
                    "snapshot with the freeze (libvirt)"
                };
                let (state, virsh) = (dir.join(member::STATE_FILE), &virsh);
                async move { tl.step(Some(&m.vm), step, journaled_prepare(virsh, m, j.as_ref(), &state)).await }
            }))
            .await;
            all.into_iter().collect::<Result<Vec<_>, LibvirtError>>()
        })
        .await;
    let prepared = match prepared {
        Err(e) => return Err(failed("PrepareForSnapshot", e, undo_all(&virsh, &members, &journals, tl).await)),
        Ok(_) if interrupt.is_triggered() => {
            return Err(interrupted("PrepareForSnapshot", &virsh, &members, &journals, tl).await)
        }
        Ok(p) => p,
    };
    // As in Hyper-V, the writer does nothing in these two; they are recorded all the same.
    tl.step(None, "Freeze", async { Ok::<_, LibvirtError>(()) }).await?;
    tl.step(None, "Thaw", async { Ok::<_, LibvirtError>(()) }).await?;

    // PostSnapshot: the copies (an interruption stops them) and the merges.
    let posted = tl
        .step(None, "PostSnapshot", async {
            let all = join_all(
                members
                    .iter()
                    .zip(&dirs)
                    .zip(prepared.iter().zip(specs))
                    .map(|((m, dir), (p, spec))| member::post(&virsh, m, *p, dir, spec, tl, interrupt)),
            )
            .await;
            all.into_iter().collect::<Result<Vec<_>, LibvirtError>>()
        })
        .await;
    let vms = match posted {
        Err(LibvirtError::Interrupted { .. }) => {
            return Err(interrupted("PostSnapshot", &virsh, &members, &journals, tl).await);
        }
        Err(e) => return Err(failed("PostSnapshot", e, undo_all(&virsh, &members, &journals, tl).await)),
        Ok(_) if interrupt.is_triggered() => {
            return Err(interrupted("PostSnapshot", &virsh, &members, &journals, tl).await)
        }
        Ok(v) => v,
    };
    // Every domain is back on its own images (the merges of PostSnapshot).
    for (m, j) in members.iter().zip(&journals) {
        clear(m, j.as_ref());
    }
    for vb in vms {
        writer.add(vb);
    }
    let backup = writer.commit().map_err(BackupError::from)?;
    Ok(backup.path)
}

/// The set's error after `error` in `phase`; `undone` says how each domain was put back.
fn failed(phase: &'static str, error: LibvirtError, undone: Result<String, String>) -> LibvirtError {
    let (Ok(undone) | Err(undone)) = undone;
    LibvirtError::SetFailed { phase, error: Box::new(error), undone }
}

async fn interrupted(
    phase: &'static str,
    virsh: &Virsh,
    members: &[Member],
    journals: &[Option<Journal>],
    tl: &Timeline,
) -> LibvirtError {
    match undo_all(virsh, members, journals, tl).await {
        Ok(_) => LibvirtError::Interrupted { phase, undone: String::new() },
        Err(undone) => LibvirtError::SetFailed {
            phase,
            error: Box::new(LibvirtError::Interrupted { phase, undone: String::new() }),
            undone,
        },
    }
}

/// Puts every domain back (overlays merged and removed, guest thawed), all at once. Ok with
/// the summary if every domain was put back, Err with it if one could not be (its journal
/// is kept for the next run).
async fn undo_all(
    virsh: &Virsh,
    members: &[Member],
    journals: &[Option<Journal>],
    tl: &Timeline,
) -> Result<String, String> {
    let results = join_all(members.iter().zip(journals).map(|(m, j)| async move {
        let r = tl.step(Some(&m.vm), "undo: merge back and thaw", member::put_back(virsh, m)).await;
        member::thaw_after_failure(virsh, m).await;
        match r {
            Ok(()) => {
                clear(m, j.as_ref());
                (true, format!("{}: put back as it was ({})", m.vm, m.state))
            }
            Err(e) => (false, format!("{}: COULD NOT BE PUT BACK: {e}", m.vm)),
        }
    }))
    .await;
    let all_ok = results.iter().all(|(ok, _)| *ok);
    let text = results.into_iter().map(|(_, t)| t).collect::<Vec<_>>().join("; ");
    if all_ok {
        Ok(text)
    } else {
        Err(text)
    }
}

/// A journal for each domain quiesce is about to put overlays on (none for a paused
/// domain's Saved State: it changes nothing to undo), named by libvirt's URI and the
/// domain's UUID ([`journal`]). Nothing is written yet.
async fn journals_of(virsh: &Virsh, members: &[Member]) -> Result<Vec<Option<Journal>>, LibvirtError> {
    if members.iter().all(|m| m.overlays.is_empty()) {
        return Ok(members.iter().map(|_| None).collect());
    }
    let uri = journal::canonical_uri(virsh).await?;
    let mut out = Vec::new();
    for m in members {
        if m.overlays.is_empty() {
            out.push(None);
            continue;
        }
        let uuid = journal::uuid_of(virsh, &m.domain).await?;
        let id = DomainId { uri: uri.clone(), uuid, name: m.dom.name.clone() };
        let overlays = m
            .dom
            .disks
            .iter()
            .zip(&m.overlays)
            .map(|(d, o)| OverlayRecord { target: d.target.clone(), image: d.path.clone(), overlay: o.clone() })
            .collect();
        let j = Journal::new(id, m.state.clone(), overlays)
            .map_err(|source| LibvirtError::Journal { domain: m.domain.clone(), source })?;
        out.push(Some(j));
    }
    Ok(out)
}

/// [`member::prepare`], its journal written durably before libvirt's call (libvirt may
/// freeze the guest, or pause the running domain for a checkpoint, and puts the overlays
/// on) and again once the call returned (thawed and continued; the overlays stay).
async fn journaled_prepare(
    virsh: &Virsh,
    m: &Member,
    j: Option<&Journal>,
    state: &Path,
) -> Result<member::Prepared, LibvirtError> {
    let journal_error = |source| LibvirtError::Journal { domain: m.domain.clone(), source };
    if let Some(j) = j {
        let freezing = m.method == Method::ChildSnapshot;
        let pausing = m.method == Method::SavedState && !m.paused;
        j.before_call(freezing, pausing).map_err(journal_error)?;
    }
    let p = member::prepare(virsh, m, state).await?;
    if let Some(j) = j {
        j.call_returned().map_err(journal_error)?;
    }
    Ok(p)
}

/// Removes a domain's journal once it is back on its own images. A journal that cannot be
/// removed is only reported: the next run finds the domain as it was and removes it.
fn clear(m: &Member, j: Option<&Journal>) {
    if let Some(Err(e)) = j.map(Journal::clear) {
        eprintln!("quiesce: libvirt domain {}: {e}", m.domain);
    }
}

/// QEMU's version as libvirt reports it (`Running hypervisor: QEMU 10.0.2`), for the
/// manifest; "unknown" if virsh will not say.
async fn qemu_version(virsh: &Virsh) -> String {
    let out = virsh.run(&["version"], virsh::COMMAND).await.unwrap_or_default();
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Running hypervisor:"))
        .and_then(|h| h.split_whitespace().last())
        .unwrap_or("unknown")
        .to_owned()
}
