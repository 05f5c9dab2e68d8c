//! Replaying a libvirt domain's journal a killed quiesce left: before anything else, the
//! next `quiesce backup --libvirt` (or `quiesce recover --libvirt`) on the domain undoes
//! what the journal names and the domain still shows, through libvirt as the backup's own
//! put-back does: each disk still on a journaled overlay is committed back
//! (`blockcommit --active --shallow --pivot`, with a deadline) and the overlay deleted, a
//! snapshot record of quiesce's name deleted (`--metadata` only), the guest thawed if a
//! freeze was under way, the domain continued if libvirt's checkpoint left it paused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{journal_path, read, remove, Record};
use crate::backup::libvirt::domain::{self, DomainXmlError};
use crate::backup::libvirt::member;
use crate::backup::libvirt::virsh::{self, Virsh, VirshError};
use crate::backup::recovery::JournalError;
use crate::timeline::Timeline;

/// How long a libvirt job a killed quiesce started (its snapshot, its commit) may still
/// run before the replay acts: as long as the backup gives the call itself.
const JOB_END: Duration = member::SNAPSHOT;
/// How often libvirt is asked whether that job has ended: libvirt's `domjobinfo` is a
/// question with no event behind it that virsh can wait on.
const JOB_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The journal folder could not be read, or a journal not removed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// libvirt failed or timed out while quiesce looked at the domain or put it back; the
    /// journal is kept, so the next run tries again.
    #[error("libvirt domain {domain}: undoing what a killed quiesce left ({left}): {error}; the journal {} is kept", .journal.display())]
    Undo { domain: String, left: String, journal: PathBuf, error: String },
    /// The domain is not running, but its disks are still on quiesce's overlays (a
    /// persistent domain shut down or restarted on them): libvirt merges only a running
    /// domain's overlays. Start it and run quiesce again (or `qemu-img commit` each overlay
    /// and point the disk back at its image with `virsh edit`). The journal is kept.
    #[error("libvirt domain {domain} is {state}, and its disks are still on quiesce's overlays ({left}): start it and run `quiesce recover --libvirt` again; the journal {} is kept", .journal.display())]
    NotRunning { domain: String, state: String, left: String, journal: PathBuf },
    /// libvirt could not be asked (not running, the URI is wrong): nothing was touched.
    #[error(transparent)]
    Virsh(#[from] VirshError),
}

/// One thing a replay found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A block job of the killed run was still on the disk: aborted (its overlay stays on
    /// top, and is committed again).
    JobAborted { target: String },
    /// The disk was still on its overlay: committed back and the overlay deleted.
    Merged { target: String, overlay: PathBuf },
    /// The disk was on its image again, its overlay file left: deleted.
    OverlayFileRemoved { file: PathBuf },
    /// The disk is on neither its image nor the overlay: someone changed it; left alone.
    LeftAlone { target: String, on: Option<PathBuf> },
    /// The guest was left frozen: thawed.
    Thawed,
    /// libvirt's checkpoint left the running domain paused: continued.
    Resumed,
    /// A snapshot record of quiesce's name: deleted (its record only, `--metadata`).
    MetadataDeleted { name: String },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::JobAborted { target } => write!(f, "a block job on {target} still running: aborted"),
            Step::Merged { target, overlay } => {
                write!(f, "disk {target} still on {}: committed back and deleted", overlay.display())
            }
            Step::OverlayFileRemoved { file } => write!(f, "overlay file {} no longer in use: deleted", file.display()),
            Step::LeftAlone { target, on } => write!(
                f,
                "disk {target} is on {}, neither its image nor quiesce's overlay: left alone",
                on.as_ref().map_or_else(|| "nothing".to_owned(), |p| p.display().to_string())
            ),
            Step::Thawed => f.write_str("guest left frozen: thawed"),
            Step::Resumed => f.write_str("domain left paused by the checkpoint: continued"),
            Step::MetadataDeleted { name } => write!(f, "snapshot record {name}: deleted (metadata only)"),
        }
    }
}

/// Why a journal is stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// libvirt knows no domain of that UUID (a transient domain destroyed, or undefined).
    DomainGone,
    /// The domain shows none of it: no disk on a journaled overlay, not paused by a
    /// checkpoint, not frozen.
    NothingLeft,
}

/// What the replay found for a domain.
#[derive(Debug)]
pub enum Found {
    /// No journal names this domain.
    Nothing,
    /// A stale journal: removed, and nothing else touched (overlay files still there are
    /// named in `files_left`, for a person: they may hold the only copy of writes).
    Stale { journal: PathBuf, why: Stale, left: String, files_left: Vec<PathBuf> },
    /// A file quiesce cannot read: moved aside (`moved_to`); nothing touched.
    Unreadable { journal: PathBuf, moved_to: PathBuf, why: String },
    /// The domain's journal: what it named and what was done. The journal was removed.
    Undone { journal: PathBuf, left: String, steps: Vec<Step> },
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Nothing => f.write_str("no recovery journal"),
            Found::Stale { journal, why, left, files_left } => {
                let why = match why {
                    Stale::DomainGone => "libvirt knows the domain no more",
                    Stale::NothingLeft => "the domain shows none of it",
                };
                write!(
                    f,
                    "stale recovery journal {} ({why}; it named: {left}): removed, nothing touched",
                    journal.display()
                )?;
                if !files_left.is_empty() {
                    let files: Vec<String> = files_left.iter().map(|p| p.display().to_string()).collect();
                    write!(f, "; overlay files left as they are: {}", files.join(", "))?;
                }
                Ok(())
            }
            Found::Unreadable { journal, moved_to, why } => write!(
                f,
                "unreadable recovery journal {} ({why}): moved to {}, nothing touched",
                journal.display(),
                moved_to.display()
            ),
            Found::Undone { journal, left, steps } => {
                let done: Vec<String> = steps.iter().map(Step::to_string).collect();
                let done = if done.is_empty() { "none of it was left".to_owned() } else { done.join("; ") };
                write!(f, "recovery journal {} of a killed quiesce named {left}: {done}", journal.display())
            }
        }
    }
}

/// True when libvirt's error says the domain does not exist.
fn no_such_domain(e: &VirshError) -> bool {
    matches!(e, VirshError::Failed { stderr, .. } if stderr.contains("Domain not found") || stderr.contains("failed to get domain"))
}

/// Finds the journal of `domain` (a name or UUID) on `virsh`'s connection and undoes what
/// it names that the domain still shows; a stale one is removed and nothing touched. Runs
/// before anything else is done to the domain.
pub async fn replay(virsh: &Virsh, domain: &str, tl: &Timeline) -> Result<Found, RecoveryError> {
    let uri = super::canonical_uri(virsh).await?;
    let uuid = match super::uuid_of(virsh, domain).await {
        Ok(u) => u,
        Err(e) if no_such_domain(&e) => return gone(&uri, domain),
        Err(e) => return Err(e.into()),
    };
    let path = journal_path(&uri, &uuid)?;
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(Found::Nothing);
    }
    let rec = match read(&path) {
        Ok(r) if r.domain.uri == uri && r.domain.uuid.eq_ignore_ascii_case(&uuid) => r,
        Ok(r) => {
            return set_aside(path, format!("it names domain {} on {}, not this one", r.domain.uuid, r.domain.uri))
        }
        Err(JournalError::Unreadable { why, .. }) => return set_aside(path, why),
        Err(e) => return Err(e.into()),
    };
    let left = rec.leftovers();
    let undo_error = |error: String| RecoveryError::Undo {
        domain: rec.domain.name.clone(),
        left: left.clone(),
        journal: path.clone(),
        error,
    };
    let steps =
        tl.step(Some(&rec.domain.name), "recover what a killed quiesce left (libvirt)", undo(virsh, &uuid, &rec)).await;
    let steps = match steps {
        Ok(Some(s)) => s,
        Ok(None) => {
            remove(&path)?;
            let files_left = rec.overlays.iter().filter(|o| o.overlay.exists()).map(|o| o.overlay.clone()).collect();
            return Ok(Found::Stale { journal: path, why: Stale::NothingLeft, left, files_left });
        }
        Err(Undo::NotRunning(state)) => {
            return Err(RecoveryError::NotRunning { domain: rec.domain.name.clone(), state, left, journal: path })
        }
        Err(Undo::Failed(e)) => return Err(undo_error(e)),
    };
    remove(&path)?;
    Ok(Found::Undone { journal: path, left, steps })
}

/// A file that is not a journal of this domain: moved aside, so that it is neither acted on
/// nor in the way of this run's own journal.
fn set_aside(path: PathBuf, why: String) -> Result<Found, RecoveryError> {
    let moved_to = path.with_extension("unreadable");
    std::fs::rename(&path, &moved_to).map_err(|source| JournalError::Io { path: path.clone(), source })?;
    Ok(Found::Unreadable { journal: path, moved_to, why })
}

/// libvirt knows no domain `domain` on connection `uri`: a journal of this connection that
/// names it (by name or UUID) is stale. None found: nothing (the caller's own look at the
/// domain says it does not exist).
fn gone(uri: &str, domain: &str) -> Result<Found, RecoveryError> {
    let (_, listed) = super::list()?;
    for (path, r) in listed {
        let Ok(rec) = r else { continue };
        if rec.domain.uri == uri && (rec.domain.name == domain || rec.domain.uuid.eq_ignore_ascii_case(domain)) {
            remove(&path)?;
            let files_left = rec.overlays.iter().filter(|o| o.overlay.exists()).map(|o| o.overlay.clone()).collect();
            return Ok(Found::Stale { journal: path, why: Stale::DomainGone, left: rec.leftovers(), files_left });
        }
    }
    Ok(Found::Nothing)
}

enum Undo {
    /// The domain is shut off (libvirt's word) with disks on overlays.
    NotRunning(String),
    Failed(String),
}

impl std::fmt::Display for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undo::NotRunning(s) => write!(f, "the domain is {s}, on quiesce's overlays"),
            Undo::Failed(e) => f.write_str(e),
        }
    }
}

impl From<VirshError> for Undo {
    fn from(e: VirshError) -> Undo {
        Undo::Failed(e.to_string())
    }
}

impl From<DomainXmlError> for Undo {
    fn from(e: DomainXmlError) -> Undo {
        Undo::Failed(format!("its XML: {e}"))
    }
}

/// Pure: libvirt's state and reason (`virsh domstate --reason`: "paused (snapshot)").
pub fn state_and_reason(out: &str) -> (String, String) {
    let line = out.trim();
    match line.split_once(" (") {
        Some((s, r)) => (s.trim().to_owned(), r.trim_end_matches(')').trim().to_owned()),
        None => (line.to_owned(), String::new()),
    }
}

/// Each disk's target and source now.
async fn sources(virsh: &Virsh, uuid: &str) -> Result<Vec<(String, PathBuf)>, Undo> {
    Ok(domain::sources(&virsh.run(&["dumpxml", uuid], virsh::COMMAND).await?)?)
}

/// Waits, within [`JOB_END`], until libvirt runs no job on the domain (a snapshot or
/// checkpoint the killed quiesce's virsh asked for goes on inside libvirtd).
async fn wait_for_no_job(virsh: &Virsh, uuid: &str) -> Result<(), Undo> {
    let start = Instant::now();
    loop {
        let info = virsh.run(&["domjobinfo", uuid], virsh::COMMAND).await?;
        let busy = info
            .lines()
            .find_map(|l| l.strip_prefix("Job type:"))
            .is_some_and(|t| !matches!(t.trim(), "None" | "Completed" | "Failed" | "Cancelled"));
        if !busy {
            return Ok(());
        }
        if start.elapsed() > JOB_END {
            return Err(Undo::Failed(format!(
                "libvirt still runs a job on the domain after {JOB_END:?}: {}",
                info.trim()
            )));
        }
        tokio::time::sleep(JOB_POLL).await;
    }
}

/// Undoes what `rec` names that the domain shows; None if it shows none of it (stale).
async fn undo(virsh: &Virsh, uuid: &str, rec: &Record) -> Result<Option<Vec<Step>>, Undo> {
    wait_for_no_job(virsh, uuid).await?;
    let (state, reason) = state_and_reason(&virsh.run(&["domstate", uuid, "--reason"], virsh::COMMAND).await?);
    let now = sources(virsh, uuid).await?;
    let source =
        |target: &str, now: &[(String, PathBuf)]| now.iter().find(|(t, _)| t == target).map(|(_, p)| p.clone());
    let on_overlay = rec.overlays.iter().any(|o| source(&o.target, &now).as_ref() == Some(&o.overlay));
    // The reason libvirt gives a pause of its own checkpoint: a pause by a person says
    // "user", one by a revert "from snapshot".
    let paused_by_checkpoint = rec.pausing && rec.before == "running" && state == "paused" && reason == "snapshot";
    let may_be_frozen = rec.freezing && state == "running";
    if !on_overlay && !paused_by_checkpoint && !may_be_frozen {
        return Ok(None);
    }
    if on_overlay && !matches!(state.as_str(), "running" | "paused") {
        return Err(Undo::NotRunning(state));
    }
    let mut steps = Vec::new();
    if may_be_frozen {
        // Thawing a thawed guest thaws nothing ("Thawed 0 filesystem(s)").
        let out = virsh.run(&["domfsthaw", uuid], virsh::COMMAND).await?;
        if out.split_whitespace().nth(1).and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| n > 0) {
            steps.push(Step::Thawed);
        }
    }
    if paused_by_checkpoint {
        virsh.run(&["resume", uuid], virsh::COMMAND).await?;
        steps.push(Step::Resumed);
    }
    for o in &rec.overlays {
        let on = source(&o.target, &sources(virsh, uuid).await?);
        if on.as_ref() == Some(&o.overlay) {
            if has_job(virsh, uuid, &o.target).await? {
                let wait = member::COMMIT + virsh::OWN_TIMEOUT_MARGIN;
                virsh.run(&["blockjob", uuid, &o.target, "--abort"], wait).await?;
                steps.push(Step::JobAborted { target: o.target.clone() });
            }
            member::commit(virsh, uuid, &o.target).await?;
            let after = source(&o.target, &sources(virsh, uuid).await?);
            if after.as_ref() != Some(&o.image) {
                return Err(Undo::Failed(format!(
                    "disk {}: blockcommit returned, but the disk is on {} and not on {}",
                    o.target,
                    after.map_or_else(|| "nothing".to_owned(), |p| p.display().to_string()),
                    o.image.display()
                )));
            }
            delete(&o.overlay)?;
            steps.push(Step::Merged { target: o.target.clone(), overlay: o.overlay.clone() });
        } else if on.as_ref() == Some(&o.image) {
            // Committed back before the kill: only the (named, checked) file may be left.
            if o.overlay.exists() {
                delete(&o.overlay)?;
                steps.push(Step::OverlayFileRemoved { file: o.overlay.clone() });
            }
        } else {
            steps.push(Step::LeftAlone { target: o.target.clone(), on });
        }
    }
    let snapshots = virsh.run(&["snapshot-list", uuid, "--name"], virsh::COMMAND).await?;
    if snapshots.lines().any(|l| l.trim() == rec.snapshot) {
        virsh.run(&["snapshot-delete", uuid, &rec.snapshot, "--metadata"], virsh::COMMAND).await?;
        steps.push(Step::MetadataDeleted { name: rec.snapshot.clone() });
    }
    Ok(Some(steps))
}

fn delete(file: &Path) -> Result<(), Undo> {
    match std::fs::remove_file(file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Undo::Failed(format!("delete the overlay {}: {e}", file.display())))
        }
        _ => Ok(()),
    }
}

/// Whether libvirt runs a block job on the disk (`virsh blockjob --info` prints nothing,
/// or "No current block job", when none).
async fn has_job(virsh: &Virsh, uuid: &str, target: &str) -> Result<bool, Undo> {
    let out = virsh.run(&["blockjob", uuid, target, "--info"], virsh::COMMAND).await?;
    Ok(!out.trim().is_empty() && !out.contains("No current block job"))
}

/// What `quiesce doctor` says of a journal, asking libvirt (read only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Disks (their targets) are still on the journal's overlays: the next run undoes them.
    Live { on_overlays: Vec<String> },
    /// The next run removes it, touching nothing.
    Stale(Stale),
    /// libvirt could not be asked (the daemon is not running...).
    Unknown(String),
}

/// Read only: whether the domain a journal names still shows its overlays.
pub async fn status(rec: &Record) -> Status {
    let virsh = match Virsh::new(Some(rec.domain.uri.clone())) {
        Ok(v) => v,
        Err(e) => return Status::Unknown(e.to_string()),
    };
    let xml = match virsh.run(&["dumpxml", &rec.domain.uuid], virsh::COMMAND).await {
        Ok(x) => x,
        Err(e) if no_such_domain(&e) => return Status::Stale(Stale::DomainGone),
        Err(e) => return Status::Unknown(e.to_string()),
    };
    let now = match domain::sources(&xml) {
        Ok(s) => s,
        Err(e) => return Status::Unknown(e.to_string()),
    };
    let on: Vec<String> = rec
        .overlays
        .iter()
        .filter(|o| now.iter().any(|(t, p)| *t == o.target && *p == o.overlay))
        .map(|o| o.target.clone())
        .collect();
    if on.is_empty() && !rec.freezing && !rec.pausing {
        Status::Stale(Stale::NothingLeft)
    } else {
        Status::Live { on_overlays: on }
    }
}
