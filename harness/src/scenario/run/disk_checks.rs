//! Host-side checks of restored disks against the backup point: file manifests (read from
//! the backup's own image, then from the restored disk after its guest ran) and block
//! content (before the guest runs). A failure names the path or the offset that differs.
//! And one of the backup alone: the state its filesystems were left in (`fs-quiesced`).

use std::path::{Path, PathBuf};

use super::super::format::ManifestSpec;
use super::super::report::{ManifestReport, Report};
use super::error::{At, Cause, DiskPlace, RunError};
use crate::backup::{Backup, VmBackup};
use crate::image::fsread::state::Quiesced;
use crate::image::inspect::{FsState, RawImage};
use crate::image::manifest::{self, place, EntryKind, Limits, Manifest};
use crate::qemu::DiskFormat;
use crate::verify::blockcmp::{self, BlockComparison};

/// One disk's backup point: its manifest, and the paths the scenario calls volatile.
pub(super) struct Point {
    pub disk: String,
    pub ignore: Vec<String>,
    pub redact: Vec<String>,
    pub manifest: Manifest,
}

/// What a redacted size or hash reads as in a fixture.
const REDACTED: &str = "[redacted]";

/// The manifest of a disk image, read through QEMU's drivers (off the runtime: it reads
/// the whole image). `at` says which step of the run reads it.
pub(super) async fn read(path: &Path, format: DiskFormat, at: At) -> Result<Manifest, RunError> {
    let path = path.to_owned();
    match tokio::task::spawn_blocking(move || manifest::read_image(&path, format, &Limits::default())).await {
        Ok(read) => read.map_err(|e| e.at(at)),
        Err(thread) => Err(thread.at(at)),
    }
}

/// The backup point of each disk the scenario names, read from the backup's image of it.
pub(super) async fn backup_points(
    backup: &Backup,
    vb: &VmBackup,
    wanted: &[&ManifestSpec],
) -> Result<Vec<Point>, RunError> {
    let at = || At::vm(&vb.name, "reading the backup point's manifests");
    let mut out = Vec::new();
    for spec in wanted {
        let disk = spec.disk.get_ref();
        let d = vb.disks.iter().find(|d| &d.node_name == disk).ok_or_else(|| RunError::NoDisk {
            at: at(),
            place: DiskPlace::Backup,
            disk: disk.clone(),
        })?;
        let manifest = read(&backup.vm_dir(&vb.name).join(&d.file), d.format, at()).await?;
        out.push(Point { disk: disk.clone(), ignore: spec.ignore.clone(), redact: spec.redact.clone(), manifest });
    }
    Ok(out)
}

/// A manifest as fixture lines: each filesystem, then each path it holds that is not
/// ignored, with type, size, mode and the start of its content hash (size, hash and symlink
/// target redacted for the `redact` paths).
pub(super) fn lines(m: &Manifest, ignore: &[String], redact: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for fs in &m.filesystems {
        out.push(format!("{} {} label={:?} uuid={}", manifest::place(fs.partition), fs.kind, fs.label, fs.uuid));
        for e in fs.entries.iter().filter(|e| !manifest::ignored(&e.path, ignore)) {
            let line = match e.kind {
                EntryKind::File if manifest::ignored(&e.path, redact) => {
                    format!("{} file {REDACTED} {:04o} {REDACTED}", e.path, e.mode)
                }
                EntryKind::Symlink if manifest::ignored(&e.path, redact) => format!("{} -> {REDACTED}", e.path),
                EntryKind::File => match &e.blake3 {
                    Some(h) => format!("{} file {} {:04o} {}", e.path, e.size, e.mode, &h[..h.len().min(16)]),
                    None => format!("{} file {} {:04o} ({})", e.path, e.size, e.mode, e.note.as_deref().unwrap_or("")),
                },
                EntryKind::Dir => format!("{} dir {:04o}", e.path, e.mode),
                EntryKind::Symlink => format!("{} -> {}", e.path, e.target.as_deref().unwrap_or("?")),
                EntryKind::Other => format!("{} {}", e.path, e.note.as_deref().unwrap_or("other")),
            };
            out.push(line);
        }
    }
    for u in &m.unread {
        out.push(format!("{} {} ({} bytes, not read)", manifest::place(u.partition), u.content, u.size));
    }
    out
}

/// Compares each restored disk's manifest with its backup point and records the result:
/// the entries in the report (and so the fixture), the differences when there are any.
/// Returns the differences, per disk.
pub(super) async fn compare_manifests(
    vm: &str,
    points: &[Point],
    restored: &[(String, PathBuf)],
    report: &mut Report,
) -> Result<Vec<(String, Vec<String>)>, RunError> {
    let at = || At::vm(vm, "reading a restored disk's manifest");
    let mut all = Vec::new();
    for p in points {
        let path = &restored.iter().find(|(n, _)| n == &p.disk).ok_or_else(|| RunError::NoDisk {
            at: at(),
            place: DiskPlace::Restored,
            disk: p.disk.clone(),
        })?;
        let now = read(&path.1, DiskFormat::Qcow2, at()).await?;
        let differences: Vec<String> =
            manifest::diff(&p.manifest, &now, &p.ignore).iter().map(ToString::to_string).collect();
        report.manifests.push(ManifestReport {
            vm: vm.to_owned(),
            disk: p.disk.clone(),
            entries: lines(&p.manifest, &p.ignore, &p.redact),
            differences: differences.clone(),
        });
        all.push((p.disk.clone(), differences));
    }
    Ok(all)
}

/// `fs-quiesced`: each filesystem of each backed-up disk as its metadata says it was left,
/// read through QEMU's drivers; passed when every ext4 was frozen clean (no journal replay
/// needed), at least one was judged, and no NTFS volume is marked for chkdsk (NTFS is not
/// otherwise judged). An image that cannot be read fails it, with why.
pub(super) async fn fs_quiesced(backup: &Backup, vb: &VmBackup) -> Result<(bool, String), RunError> {
    let mut ok = true;
    let mut seen = 0;
    let mut lines = Vec::new();
    for d in &vb.disks {
        let (image, format) = (backup.vm_dir(&vb.name).join(&d.file), d.format);
        let states = tokio::task::spawn_blocking(move || RawImage::open(&image, format)?.states()).await;
        let states = match states {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                ok = false;
                lines.push(format!("{}: unreadable: {e}", d.node_name));
                continue;
            }
            Err(e) => {
                ok = false;
                lines.push(format!("{}: unreadable: {e}", d.node_name));
                continue;
            }
        };
        for v in states {
            let at = match v.partition {
                None => d.node_name.clone(),
                Some(_) => format!("{} {}", d.node_name, place(v.partition)),
            };
            let line = match &v.fs {
                FsState::Ext4(s) => {
                    seen += 1;
                    match s.quiesced() {
                        Quiesced::Clean => format!("{at}: ext4 frozen clean (needs_recovery clear, journal empty)"),
                        Quiesced::NeedsReplay { why } => {
                            ok = false;
                            format!("{at}: ext4 NEEDS A JOURNAL REPLAY: {why}")
                        }
                        Quiesced::Unknown { why } => {
                            ok = false;
                            format!("{at}: ext4 cannot be judged: {why}")
                        }
                    }
                }
                // The dirty flag means "chkdsk is due"; a live volume need not have it set
                // (ntfs-3g never sets it), and $LogFile is not read: not proven either way.
                FsState::Ntfs(s) if s.dirty => {
                    ok = false;
                    format!("{at}: ntfs marked DIRTY (chkdsk is due)")
                }
                FsState::Ntfs(_) => format!("{at}: ntfs not checked (dirty flag clear; $LogFile not read)"),
                FsState::Unread(what) => format!("{at}: {what}, not checked"),
            };
            lines.push(line);
        }
    }
    if seen == 0 {
        ok = false;
        lines.push("no ext4 filesystem to judge".into());
    }
    Ok((ok, lines.join("; ")))
}

/// One disk to compare block by block: its name, the restored image and the backup's.
pub(super) struct Pair {
    pub disk: String,
    pub restored: (PathBuf, DiskFormat),
    pub backup: (PathBuf, DiskFormat),
}

impl Pair {
    /// Each of the backup's disks of `vb` paired with its restored image, found by
    /// `restored` (by node name); a disk the restore did not give back is an error.
    pub fn of(
        backup: &Backup,
        vb: &VmBackup,
        at: impl Fn() -> At,
        restored: impl Fn(&str) -> Option<(PathBuf, DiskFormat)>,
    ) -> Result<Vec<Pair>, RunError> {
        vb.disks
            .iter()
            .map(|d| {
                let r = restored(&d.node_name).ok_or_else(|| RunError::NoDisk {
                    at: at(),
                    place: DiskPlace::Restored,
                    disk: d.node_name.clone(),
                })?;
                Ok(Pair {
                    disk: d.node_name.clone(),
                    restored: r,
                    backup: (backup.vm_dir(&vb.name).join(&d.file), d.format),
                })
            })
            .collect()
    }
}

/// Block comparison of each restored disk with the backup's image of it, per disk. The
/// comparison blocks (it reads whole images), so it runs on a thread of its own.
pub(super) async fn compare_blocks(pairs: Vec<Pair>, at: At) -> Result<Vec<(String, BlockComparison)>, RunError> {
    let compared = tokio::task::spawn_blocking(move || {
        pairs
            .into_iter()
            .map(|p| {
                let c = blockcmp::compare(&p.restored.0, p.restored.1, &p.backup.0, p.backup.1)?;
                Ok((p.disk, c))
            })
            .collect::<Result<Vec<_>, blockcmp::BlockCompareError>>()
    })
    .await;
    match compared {
        Ok(c) => c.map_err(|e| e.at(at)),
        Err(thread) => Err(thread.at(at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::{Entry, FsKind, FsManifest, UnreadVolume};

    #[test]
    fn fixture_lines_leave_out_volatile_paths_and_shorten_hashes() {
        let m = Manifest {
            filesystems: vec![FsManifest {
                partition: Some(1),
                kind: FsKind::Ext4,
                label: "data".into(),
                uuid: "u".into(),
                entries: vec![
                    Entry::dir("/", 0o755),
                    Entry::file("/a.txt", 6, 0o644, "0123456789abcdef0123".into()),
                    Entry::file("/journal", 100, 0o644, "ff".repeat(32)),
                    Entry::symlink("/l", 5, 0o777, "a.txt".into()),
                ],
            }],
            unread: vec![UnreadVolume { partition: Some(2), size: 4096, content: "swap".into() }],
        };
        assert_eq!(
            lines(&m, &["/journal".into()], &[]),
            vec![
                "partition 1 ext4 label=\"data\" uuid=u",
                "/ dir 0755",
                "/a.txt file 6 0644 0123456789abcdef",
                "/l -> a.txt",
                "partition 2 swap (4096 bytes, not read)",
            ]
        );
        let redacted = lines(&m, &[], &["/journal".into(), "/l".into()]);
        assert_eq!(redacted[3..5], ["/journal file [redacted] 0644 [redacted]", "/l -> [redacted]"]);
    }
}
