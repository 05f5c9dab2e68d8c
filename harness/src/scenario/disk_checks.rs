//! Host-side checks of restored disks against the backup point: file manifests (read from
//! the backup's own image, then from the restored disk after its guest ran) and block
//! content (before the guest runs). A failure names the path or the offset that differs.

use std::path::{Path, PathBuf};

use super::format::ManifestSpec;
use super::report::{ManifestReport, Report};
use super::runner::{fail, RunError};
use crate::backup::{Backup, VmBackup};
use crate::image::manifest::{self, EntryKind, Limits, Manifest};
use crate::qemu::DiskFormat;
use crate::verify::blockcmp;

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
/// the whole image).
pub(super) async fn read(path: &Path, format: DiskFormat) -> Result<Manifest, RunError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || manifest::read_image(&path, format, &Limits::default()))
        .await
        .map_err(fail("the manifest reader's thread"))?
        .map_err(fail("reading a file manifest"))
}

/// The backup point of each disk the scenario names, read from the backup's image of it.
pub(super) async fn backup_points(
    backup: &Backup,
    vb: &VmBackup,
    wanted: &[&ManifestSpec],
) -> Result<Vec<Point>, RunError> {
    let mut out = Vec::new();
    for spec in wanted {
        let disk = spec.disk.get_ref();
        let d = vb
            .disks
            .iter()
            .find(|d| &d.node_name == disk)
            .ok_or_else(|| RunError(format!("VM {}: disk {disk} is not in the backup", vb.name)))?;
        let manifest = read(&backup.vm_dir(&vb.name).join(&d.file), d.format).await?;
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
    let mut all = Vec::new();
    for p in points {
        let path = &restored
            .iter()
            .find(|(n, _)| n == &p.disk)
            .ok_or_else(|| RunError(format!("VM {vm}: no restored disk {}", p.disk)))?
            .1;
        let now = read(path, DiskFormat::Qcow2).await?;
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

/// Block comparison of each restored disk with the backup's image of it. The comparison
/// blocks (it reads whole images), so it runs on a thread of its own.
pub(super) async fn compare_blocks(
    backup: &Backup,
    vb: &VmBackup,
    restored: &[(String, PathBuf)],
) -> Result<Vec<(String, blockcmp::BlockComparison)>, RunError> {
    let mut pairs = Vec::new();
    for d in &vb.disks {
        let Some((_, overlay)) = restored.iter().find(|(n, _)| n == &d.node_name) else { continue };
        pairs.push((d.node_name.clone(), overlay.clone(), backup.vm_dir(&vb.name).join(&d.file), d.format));
    }
    tokio::task::spawn_blocking(move || {
        pairs
            .into_iter()
            .map(|(disk, overlay, image, format)| {
                let c = blockcmp::compare(&overlay, DiskFormat::Qcow2, &image, format)
                    .map_err(fail(&format!("comparing the blocks of disk {disk}")))?;
                Ok((disk, c))
            })
            .collect()
    })
    .await
    .map_err(fail("the block comparison's thread"))?
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
