//! `quiesce diff A B`: the files of two disk images, or of every disk of two backups,
//! compared path by path, read on the host with no guest and no root. Prints like virt-diff:
//!
//! ```text
//! + /new/file (12 bytes)
//! - /removed/file (3 bytes)
//! ~ /etc/conf size 10 -> 12, content
//! 1 added, 1 removed, 1 changed
//! ```
//!
//! With `--blocks`, each pair of disks is also compared block by block (allocated data), and
//! the first differing byte offset is printed: what differs below the files (free space,
//! metadata, a filesystem no reader walks).
//!
//! Exit 0 if identical, 1 if they differ, 2 if a side could not be read (as diff(1) does).

use std::error::Error;
use std::path::{Path, PathBuf};

use super::CliResult;
use quiesce::backup::manifest::Entry;
use quiesce::backup::Backup;
use quiesce::image::manifest::{self, Change, EntryKind, Limits, Manifest, Summary};
use quiesce::qemu::DiskFormat;
use quiesce::verify::blockcmp;

const EXIT_DIFFER: i32 = 1;
const EXIT_TROUBLE: i32 = 2;

pub async fn run(a: PathBuf, b: PathBuf, ignore: Vec<String>, blocks: bool) -> CliResult {
    match tokio::task::block_in_place(|| compare(&a, &b, &ignore, blocks)) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("quiesce: error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            Ok(EXIT_TROUBLE)
        }
    }
}

/// One disk image to read: a file given on the command line, or a disk of a backup.
struct Disk {
    /// How it is matched with the other side: (VM, node name) in a backup, else empty.
    key: (String, String),
    name: String,
    path: PathBuf,
    format: DiskFormat,
}

/// The disks of a path: a backup folder's every disk, or one image (format probed).
fn disks(p: &Path) -> Result<(Vec<Disk>, bool), Box<dyn Error>> {
    if !p.is_dir() {
        let format = manifest::probe_format(p)?;
        let name = p.display().to_string();
        return Ok((vec![Disk { key: Default::default(), name, path: p.to_owned(), format }], false));
    }
    let backup = Backup::open(p)?;
    let mut out = Vec::new();
    for vm in &backup.manifest.vms {
        for d in &vm.disks {
            // The manifest is read from disk: its file names must stay inside the backup
            // (Backup::open refused any that do not; this checks again as the file is used).
            let path = backup.file_path(&vm.name, &Entry::Disk(d.node_name.clone()), &d.file)?;
            out.push(Disk {
                key: (vm.name.clone(), d.node_name.clone()),
                name: format!("{}/{}", vm.name, d.node_name),
                path,
                format: d.format,
            });
        }
    }
    if out.is_empty() {
        return Err(format!("{}: the backup holds no disks", p.display()).into());
    }
    // Two backups of one VM each are matched by node name alone (the VM may be renamed).
    if backup.manifest.vms.len() == 1 {
        out.iter_mut().for_each(|d| d.key.0.clear());
    }
    Ok((out, true))
}

/// Disks matched across the two sides, and lines naming the disks on one side only.
type Paired = (Vec<(Disk, Disk)>, Vec<String>);

/// Pairs A's disks with B's; a disk on one side only is a difference.
fn pair(a: Vec<Disk>, b: Vec<Disk>) -> Result<Paired, Box<dyn Error>> {
    if a.len() == 1 && b.len() == 1 {
        let (x, y) = (a.into_iter().next(), b.into_iter().next());
        return Ok((vec![(x.expect("one"), y.expect("one"))], vec![]));
    }
    let (a_is_image, b_is_image) = (a.len() == 1 && a[0].key.1.is_empty(), b.len() == 1 && b[0].key.1.is_empty());
    if a_is_image || b_is_image {
        let (side, n) = if a_is_image { ("B", b.len()) } else { ("A", a.len()) };
        let list = if a_is_image { &b } else { &a };
        let names: Vec<String> = list.iter().map(|d| format!("{} ({})", d.name, d.path.display())).collect();
        return Err(format!(
            "{side} is a backup with {n} disks and the other side one image: compare two backups, \
             or name one disk file of the backup: {}",
            names.join(", ")
        )
        .into());
    }
    let mut only = Vec::new();
    let mut pairs = Vec::new();
    let mut b: Vec<Option<Disk>> = b.into_iter().map(Some).collect();
    for x in a {
        match b.iter_mut().find(|y| y.as_ref().is_some_and(|y| y.key == x.key)).and_then(Option::take) {
            Some(y) => pairs.push((x, y)),
            None => only.push(format!("! disk {} only in A", x.name)),
        }
    }
    only.extend(b.into_iter().flatten().map(|y| format!("! disk {} only in B", y.name)));
    Ok((pairs, only))
}

fn compare(a: &Path, b: &Path, ignore: &[String], blocks: bool) -> Result<i32, Box<dyn Error>> {
    let (da, a_backup) = disks(a)?;
    let (db, b_backup) = disks(b)?;
    let (pairs, only) = pair(da, db)?;
    let headers = pairs.len() > 1 || a_backup || b_backup;
    let limits = Limits::default();
    let mut total = Summary::default();
    let mut paths = 0usize;
    let mut block_diffs = 0usize;
    for (x, y) in &pairs {
        if headers {
            println!("== {}", if x.name == y.name { x.name.clone() } else { format!("{} <> {}", x.name, y.name) });
        }
        // The two sides are read at once: each is mostly qemu-img converting and hashing.
        let read = |d: &Disk, side: &str| {
            manifest::read_image(&d.path, d.format, &limits).map_err(|e| format!("{side}, disk {}: {e}", d.name))
        };
        let (ma, mb) = std::thread::scope(|s| {
            let ta = s.spawn(|| read(x, "A"));
            let mb = read(y, "B");
            (ta.join().unwrap_or_else(|_| Err(format!("A, disk {}: the reader failed", x.name))), mb)
        });
        let (ma, mb) = (ma?, mb?);
        let mut changes = manifest::diff(&ma, &mb, ignore);
        let bytewise = ma.filesystems.is_empty() && mb.filesystems.is_empty();
        if bytewise || blocks {
            let c = blockcmp::compare(&x.path, x.format, &y.path, y.format)?;
            if bytewise {
                // Nothing to compare file by file: the bytes are the comparison.
                eprintln!("quiesce: note: {}: no ext4 or NTFS filesystem; compared block by block", x.name);
                if !c.identical {
                    changes.push(Change::Filesystem {
                        partition: None,
                        what: format!("no filesystem quiesce reads, and the disks' blocks {c}"),
                    });
                }
            } else {
                println!("= blocks: {c}");
                block_diffs += usize::from(!c.identical);
            }
        }
        if !bytewise {
            notes(&x.name, &ma, &mb);
        }
        for c in &changes {
            println!("{c}");
        }
        let s = Summary::of(&changes);
        total.added += s.added;
        total.removed += s.removed;
        total.changed += s.changed;
        total.filesystems += s.filesystems;
        paths += ma.entry_count().max(mb.entry_count());
    }
    for o in &only {
        println!("{o}");
    }
    let disks = if pairs.len() == 1 { "1 disk".to_owned() } else { format!("{} disks", pairs.len()) };
    if total.is_empty() && only.is_empty() && block_diffs == 0 {
        println!("identical ({disks}, {paths} paths compared)");
        return Ok(0);
    }
    let mut only = match only.len() {
        0 => String::new(),
        n => format!(", {n} disk(s) on one side only"),
    };
    if block_diffs > 0 {
        only.push_str(&format!(", {block_diffs} disk(s) differ block by block"));
    }
    println!("{total}{only} ({disks}, {paths} paths compared)");
    Ok(EXIT_DIFFER)
}

/// Says what was not compared: volumes no reader walks, files whose content was not read.
fn notes(disk: &str, a: &Manifest, b: &Manifest) {
    for (side, m) in [("A", a), ("B", b)] {
        for u in &m.unread {
            if u.content != "unknown" {
                eprintln!(
                    "quiesce: note: {disk} ({side}): {} holds {}, which is not read; its files were not compared",
                    manifest::place(u.partition),
                    u.content
                );
            }
        }
        let unread = m
            .filesystems
            .iter()
            .flat_map(|f| &f.entries)
            .filter(|e| e.kind == EntryKind::File && e.blake3.is_none())
            .count();
        if unread > 0 {
            eprintln!("quiesce: note: {disk} ({side}): {unread} files (compressed or encrypted) were not hashed");
        }
    }
}
