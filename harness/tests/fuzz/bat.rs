//! VHD, VHDX and qcow2 files are untrusted input: a backup folder or a disk handed to
//! `quiesce verify` may hold anything. Mutated images made by qemu-img (structures hit field
//! by field, checksums sometimes made right again so the mutation gets past them, and bytes
//! at random) are read by quiesce's own BAT and L1/L2 parsers. Whatever the file says: no panic,
//! memory bounded by the file's size, an error that is short and names the format, and a
//! map that covers exactly the disk with every file extent inside the file.

use std::path::Path;
use std::process::Command;

use super::engine::{self, mutate_bytes, Rng};
use quiesce::verify::blockcmp::map::{Map, Source};
use quiesce::verify::blockcmp::{alloc, qcow2};

const SIZE: u64 = 8 << 20;

/// A VHDX (1 MiB blocks), dynamic VHD or qcow2 (4 KiB clusters, so several L2 tables) of 8
/// MiB with a few blocks written, in qcow2 one of them compressed.
fn seed(dir: &Path, format: &str) -> Vec<u8> {
    let path = dir.join(format!("seed.{format}"));
    let opts = match format {
        "vhdx" => "block_size=1M",
        "qcow2" => "cluster_size=4096",
        _ => "force_size=on",
    };
    let ok = |c: &mut Command| assert!(c.output().unwrap().status.success(), "{c:?}");
    ok(Command::new("qemu-img").args(["create", "-q", "-f", format, "-o", opts]).arg(&path).arg(SIZE.to_string()));
    for cmd in ["write -P 0x11 0 4096", "write -P 0x22 3M 1M", "write -P 0x33 7M 5000"] {
        ok(Command::new("qemu-io").args(["-f", format, "-c", cmd]).arg(&path));
    }
    if format == "qcow2" {
        ok(Command::new("qemu-io").args(["-f", format, "-c", "write -c -P 0x44 5M 4096"]).arg(&path));
    }
    std::fs::read(&path).unwrap()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Vhdx,
    Vhd,
    Qcow2,
}

/// Where a VHDX's, a VHD's or a qcow2's structures are, to aim mutations at.
fn targets(kind: Kind, len: usize) -> Vec<(usize, usize)> {
    let mut t = match kind {
        // Identifier, both headers, both region tables.
        Kind::Vhdx => vec![(0, 8), (64 << 10, 4096), (128 << 10, 4096), (192 << 10, 1024), (256 << 10, 1024)],
        // Footer copy, dynamic header, BAT.
        Kind::Vhd => vec![(0, 512), (512, 1024), (1536, 64)],
        // The header; then every cluster's first bytes (L1, refcounts, L2 tables, data).
        Kind::Qcow2 => {
            // The header as often as all the clusters together.
            let clusters = len / 4096;
            let mut t = vec![(0, 112); clusters.max(1)];
            t.extend((1..clusters).map(|c| (c * 4096, 64)));
            t
        }
    };
    // The regions past the first MiB (VHDX: log, BAT, metadata), a KiB of each.
    t.extend((1..len / (1 << 20) + 1).map(|m| (m << 20, 1024)));
    t.retain(|&(at, n)| at + n <= len);
    t
}

/// Puts a VHDX header's or region table's CRC-32C back after a mutation.
fn fix_checksums(data: &mut [u8]) {
    for (at, len) in [(64usize << 10, 4096usize), (128 << 10, 4096), (192 << 10, 64 << 10)] {
        if let Some(b) = data.get_mut(at..at + len) {
            b[4..8].fill(0);
            let c = alloc::crc32c(b);
            b[4..8].copy_from_slice(&c.to_le_bytes());
        }
    }
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>, kind: Kind) {
    let t = targets(kind, data.len());
    for _ in 0..1 + rng.below(4) {
        if rng.one_in(6) || t.is_empty() {
            mutate_bytes(rng, data, 8 << 20);
            continue;
        }
        let &(at, n) = rng.pick(&t);
        let i = at + rng.below(n);
        let values: [u64; 8] = [0, 1, u64::MAX, 1 << 20, 6, 0xFFFF_FFFF, 1 << 63, rng.next()];
        let v = *rng.pick(&values);
        let width = *rng.pick(&[1usize, 2, 4, 8]);
        let bytes = if rng.one_in(2) { v.to_le_bytes() } else { v.to_be_bytes() };
        if let Some(dst) = data.get_mut(i..i + width) {
            dst.copy_from_slice(&bytes[..width]);
        }
    }
    if kind == Kind::Vhdx && rng.one_in(2) {
        fix_checksums(data);
    }
}

/// The properties of a map the parser returned for a file of `len` bytes.
fn check_map(m: &Map, size: u64, len: u64) -> Result<(), String> {
    if m.size != size {
        return Err(format!("a map of {} bytes for a disk of {size}", m.size));
    }
    let mut pos = 0;
    for e in &m.extents {
        if e.start != pos || e.len == 0 {
            return Err(format!("extent {e:?} does not follow {pos}"));
        }
        if let Source::File { offset, .. } = e.source {
            if offset.checked_add(e.len).is_none_or(|end| end > len) {
                return Err(format!("extent {e:?} lies past the end of the {len}-byte file"));
            }
        }
        pos += e.len;
    }
    if pos != size {
        return Err(format!("the extents cover {pos} bytes of {size}"));
    }
    Ok(())
}

/// What a parser made of an input: a map (and the disk size it must cover), QEMU's turn,
/// or an error.
fn parse(kind: Kind, input: &[u8], size: u64) -> Result<Option<(Map, u64)>, String> {
    match kind {
        Kind::Vhdx => alloc::vhdx(input, size).map(|m| m.map(|m| (m, size))),
        Kind::Vhd => alloc::vhd(input, size).map(|m| m.map(|m| (m, size))),
        // A qcow2's size is its header's: whatever the map says, it must cover it.
        Kind::Qcow2 => qcow2::qcow2(input).map(|q| q.map(|q| (q.map.clone(), q.map.size))),
    }
}

#[test]
fn bat() {
    let _turn = engine::turn();
    let dir = tempfile::tempdir().unwrap();
    let seeds = [
        (Kind::Vhdx, seed(dir.path(), "vhdx")),
        (Kind::Vhd, seed(dir.path(), "vpc")),
        (Kind::Qcow2, seed(dir.path(), "qcow2")),
    ];
    // The seeds themselves parse, and say what qemu-io wrote.
    for (kind, s) in &seeds {
        let (m, size) = parse(*kind, s, SIZE).unwrap().expect("a plain image is read from its own tables");
        assert_eq!(size, SIZE);
        assert!(m.extents.iter().any(|e| matches!(e.source, Source::File { .. })), "{m:?}");
        assert!(m.extents.iter().any(|e| e.source == Source::Zero), "{m:?}");
        if *kind == Kind::Qcow2 {
            assert!(m.extents.iter().any(|e| e.source == Source::Export), "the compressed cluster: {m:?}");
        }
    }
    let stats = engine::run("bat", |rng, input| {
        let (kind, s) = rng.pick(&seeds);
        input.clone_from(s);
        mutate(rng, input, *kind);
        let size = if rng.one_in(8) { rng.next() >> rng.below(64) } else { SIZE };
        let (result, peak) = engine::measure(|| parse(*kind, input, size));
        // qcow2 holds one L2 table (a cluster, up to 2 MiB) besides what the file bounds.
        let bound = 32 * input.len() + (3 << 20);
        if peak > bound {
            return Err(format!("reading the table held {peak} bytes at once (bound {bound})"));
        }
        match result {
            Ok(Some((m, size))) => check_map(&m, size, input.len() as u64).map(|()| "map".to_owned()),
            Ok(None) => Ok("qemu's driver".to_owned()),
            Err(e) if e.is_empty() || e.len() > 300 || !(e.starts_with("VHD") || e.starts_with("qcow2")) => {
                Err(format!("an unclear error: {}", engine::cut(&e, 300)))
            }
            Err(e) => Ok(format!("error: {}", engine::cut(&e, 24))),
        }
    });
    if !engine::replaying() {
        assert!(stats.get("map").copied().unwrap_or(0) > 0, "no mutated image parsed: {stats:?}");
        assert!(stats.keys().any(|k| k.starts_with("error")), "no mutated image was refused: {stats:?}");
    }
}
