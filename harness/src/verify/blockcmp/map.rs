//! Allocation maps: `qemu-img map --output=json` read defensively, and the plan of what to
//! compare, made from the maps of both images. Pure logic; no I/O.

use serde::Deserialize;

/// Where the guest-visible bytes of an extent come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Reads as zeros (a hole, a zero cluster, unallocated through the whole chain).
    Zero,
    /// Stored as they are in a file of the image's backing chain (0 is the image itself), at
    /// this host offset.
    File { layer: usize, offset: u64 },
    /// Only QEMU's driver can produce them (a backing file, a compressed cluster, a format
    /// whose host offsets we do not trust): read through the NBD export.
    Export,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
    pub source: Source,
}

impl Extent {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// One image's map: extents sorted, contiguous, covering `[0, size)`, merged where they
/// continue each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Map {
    pub size: u64,
    pub extents: Vec<Extent>,
}

/// More extents than this is not a map of a disk we compare (a 2 TiB disk of alternating
/// 64 KiB clusters has 32 Mi of them).
pub const MAX_EXTENTS: usize = 64 << 20;

/// One entry as `qemu-img map --output=json` prints it. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct RawExtent {
    start: u64,
    length: u64,
    #[serde(default)]
    depth: u64,
    zero: bool,
    data: bool,
    #[serde(default)]
    compressed: bool,
    offset: Option<u64>,
}

/// How far host offsets from the map can be trusted, per layer of the backing chain (the
/// map's `depth`; 0 is the image itself): the length of the layer's file if that layer's
/// format stores guest data verbatim at the offsets it reports (raw, and qcow2 with no
/// external data file and no encryption), None otherwise. Offsets past a file's end are
/// not trusted.
pub type Trust<'t> = &'t [Option<u64>];

/// Reads a map, checking every extent: they must start at 0, follow each other without gap
/// or overlap, not overflow, and end at `size`. Host offsets are used only for uncompressed
/// data inside the file of a trusted layer.
pub fn parse(json: &[u8], size: u64, trust: Trust) -> Result<Map, String> {
    let raw: Vec<RawExtent> = serde_json::from_slice(json).map_err(|e| format!("not a map: {e}"))?;
    if raw.len() > MAX_EXTENTS {
        return Err(format!("{} extents, more than the {MAX_EXTENTS} we accept", raw.len()));
    }
    let mut extents: Vec<Extent> = Vec::with_capacity(raw.len());
    let mut pos = 0u64;
    for (i, r) in raw.iter().enumerate() {
        if r.start != pos {
            return Err(format!("extent {i} starts at {}, expected {pos} (unsorted, overlapping or a gap)", r.start));
        }
        if r.length == 0 {
            return Err(format!("extent {i} at {} is empty", r.start));
        }
        let end = r.start.checked_add(r.length).ok_or_else(|| format!("extent {i} overflows"))?;
        if end > size {
            return Err(format!("extent {i} ends at {end}, past the virtual size {size}"));
        }
        let source = if r.zero {
            Source::Zero
        } else {
            let layer = usize::try_from(r.depth).ok();
            let file_len = layer.and_then(|d| trust.get(d).copied().flatten());
            match (r.offset, layer, file_len) {
                (Some(offset), Some(layer), Some(len))
                    if r.data && !r.compressed && offset.checked_add(r.length).is_some_and(|e| e <= len) =>
                {
                    Source::File { layer, offset }
                }
                _ => Source::Export,
            }
        };
        push(&mut extents, Extent { start: r.start, len: r.length, source });
        pos = end;
    }
    if pos != size {
        return Err(format!("the extents cover {pos} bytes, not the virtual size {size}"));
    }
    Ok(Map { size, extents })
}

/// Appends `e`, merging it into the last extent if it continues it.
pub(super) fn push(extents: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = extents.last_mut() {
        let continues = match (last.source, e.source) {
            (Source::Zero, Source::Zero) | (Source::Export, Source::Export) => true,
            (Source::File { layer: la, offset: a }, Source::File { layer: lb, offset: b }) => {
                la == lb && a.checked_add(last.len) == Some(b)
            }
            _ => false,
        };
        if continues && last.end() == e.start {
            last.len += e.len;
            return;
        }
    }
    extents.push(e);
}

impl Map {
    /// The runs that make up `[start, start + len)`, each with its source adjusted to the
    /// run's own start. The range must lie inside the map.
    pub fn runs(&self, start: u64, len: u64) -> impl Iterator<Item = Extent> + '_ {
        let end = start.saturating_add(len).min(self.size);
        let first = self.extents.partition_point(|e| e.end() <= start);
        self.extents[first..].iter().take_while(move |e| e.start < end).map(move |e| {
            let s = e.start.max(start);
            let source = match e.source {
                Source::File { layer, offset } => Source::File { layer, offset: offset + (s - e.start) },
                other => other,
            };
            Extent { start: s, len: e.end().min(end) - s, source }
        })
    }

    /// True if any byte must come from the NBD export.
    pub fn needs_export(&self) -> bool {
        self.extents.iter().any(|e| e.source == Source::Export)
    }
}

/// What to read: the union of both images' data over the size they share, cut into pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Sorted, disjoint `(start, len)` pieces, none longer than the chunk size and none
    /// crossing a multiple of it.
    pub pieces: Vec<(u64, u64)>,
    /// Bytes in the pieces.
    pub data: u64,
    /// Bytes of the shared size that are zero in both and are not read.
    pub zero_in_both: u64,
}

/// Plans the comparison of `a` and `b` over `[0, min(size))`. A byte is read if it is data
/// in either image: data that is all zeros equals a hole, so that case must be looked at.
pub fn plan(a: &Map, b: &Map, chunk: u64) -> Plan {
    let chunk = chunk.max(1);
    let common = a.size.min(b.size);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let (mut i, mut j, mut pos) = (0usize, 0usize, 0u64);
    let mut zero_in_both = 0u64;
    while pos < common {
        // Both maps cover [0, size) contiguously, so the extent at `pos` is the current one.
        while a.extents[i].end() <= pos {
            i += 1;
        }
        while b.extents[j].end() <= pos {
            j += 1;
        }
        let (ea, eb) = (&a.extents[i], &b.extents[j]);
        let end = ea.end().min(eb.end()).min(common);
        if ea.source == Source::Zero && eb.source == Source::Zero {
            zero_in_both += end - pos;
        } else {
            match ranges.last_mut() {
                Some((s, l)) if *s + *l == pos => *l += end - pos,
                _ => ranges.push((pos, end - pos)),
            }
        }
        pos = end;
    }
    let mut pieces = Vec::new();
    let mut data = 0u64;
    for (start, len) in ranges {
        data += len;
        let end = start + len;
        let mut s = start;
        while s < end {
            // Cut at multiples of the chunk, so pieces line up with each other and with
            // the images' clusters.
            let next = (s / chunk).saturating_add(1).saturating_mul(chunk).min(end);
            pieces.push((s, next - s));
            s = next;
        }
    }
    Plan { pieces, data, zero_in_both }
}

/// The first index at which two equal-length buffers differ.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    // Find the differing 4 KiB block with memcmp first; then the byte.
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let mut at = 0;
    while at < n {
        let end = (at + BLOCK).min(n);
        if a[at..end] != b[at..end] {
            return a[at..end].iter().zip(&b[at..end]).position(|(x, y)| x != y).map(|p| at + p);
        }
        at = end;
    }
    (a.len() != b.len()).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRUST: Trust = &[Some(1 << 30)];

    fn file(offset: u64) -> Source {
        Source::File { layer: 0, offset }
    }

    fn ext(start: u64, len: u64, source: Source) -> Extent {
        Extent { start, len, source }
    }

    fn map(size: u64, extents: &[(u64, u64, Source)]) -> Map {
        Map { size, extents: extents.iter().map(|&(s, l, src)| ext(s, l, src)).collect() }
    }

    #[test]
    fn parses_a_qcow2_overlay_map_and_trusts_only_depth_0_uncompressed_data() {
        let json = br#"[
          { "start": 0, "length": 65536, "depth": 1, "present": false, "zero": true, "data": false, "compressed": false},
          { "start": 65536, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680},
          { "start": 131072, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 393216},
          { "start": 196608, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "compressed": false, "offset": 917504},
          { "start": 262144, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": true},
          { "start": 327680, "length": 65536, "depth": 0, "present": true, "zero": true, "data": true, "offset": 5000}
        ]"#;
        let m = parse(json, 393216, TRUST).unwrap();
        assert_eq!(
            m.extents,
            vec![
                ext(0, 65536, Source::Zero),
                ext(65536, 131072, file(327680)),    // two contiguous clusters, merged
                ext(196608, 131072, Source::Export), // backing file, then compressed
                ext(327680, 65536, Source::Zero),
            ]
        );
        let untrusted = parse(json, 393216, &[None]).unwrap();
        assert!(untrusted.extents.iter().all(|e| !matches!(e.source, Source::File { .. })));
        // With the backing file trusted too, its extent is read from it.
        let both = parse(json, 393216, &[Some(1 << 30), Some(1 << 30)]).unwrap();
        assert_eq!(both.extents[2], ext(196608, 65536, Source::File { layer: 1, offset: 917504 }));
        // An offset past the end of the file is not believed.
        let short = parse(json, 393216, &[Some(330000)]).unwrap();
        assert_eq!(short.extents[1], ext(65536, 262144, Source::Export));
    }

    #[test]
    fn rejects_maps_that_do_not_add_up() {
        let e = |s: &str| parse(s.as_bytes(), 100, TRUST).unwrap_err();
        assert!(e("{}").contains("not a map"));
        assert!(e(r#"[{"start":0,"length":50,"zero":true,"data":false}]"#).contains("cover 50 bytes"));
        assert!(e(r#"[{"start":10,"length":90,"zero":true,"data":false}]"#).contains("starts at 10"));
        assert!(e(
            r#"[{"start":0,"length":60,"zero":true,"data":false},{"start":50,"length":50,"zero":true,"data":false}]"#
        )
        .contains("starts at 50, expected 60"));
        assert!(e(r#"[{"start":0,"length":0,"zero":true,"data":false}]"#).contains("empty"));
        assert!(e(r#"[{"start":0,"length":200,"zero":true,"data":false}]"#).contains("past the virtual size"));
        assert!(e(r#"[{"start":0,"length":18446744073709551615,"zero":true,"data":false},{"start":18446744073709551615,"length":2,"zero":true,"data":false}]"#)
            .contains("past the virtual size"));
        assert!(e(r#"[{"start":-1,"length":1,"zero":true,"data":false}]"#).contains("not a map"));
        assert!(e(r#"[{"start":0,"length":100,"zero":"yes","data":false}]"#).contains("not a map"));
        // Overflow of offset + length is an untrusted offset, not a panic.
        let m =
            parse(br#"[{"start":0,"length":100,"zero":false,"data":true,"offset":18446744073709551615}]"#, 100, TRUST)
                .unwrap();
        assert_eq!(m.extents, vec![ext(0, 100, Source::Export)]);
        // An empty image has an empty map.
        assert_eq!(parse(b"[]", 0, TRUST).unwrap().extents, vec![]);
    }

    #[test]
    fn plan_reads_the_union_of_data_and_skips_zero_in_both() {
        let a = map(100, &[(0, 10, file(0)), (10, 40, Source::Zero), (50, 50, Source::Export)]);
        let b = map(100, &[(0, 20, Source::Zero), (20, 10, file(500)), (30, 60, Source::Zero), (90, 10, Source::Zero)]);
        let p = plan(&a, &b, 16);
        // a's data 0..10, b's data 20..30, a's data 50..100; cut at multiples of 16.
        assert_eq!(p.pieces, vec![(0, 10), (20, 10), (50, 14), (64, 16), (80, 16), (96, 4)]);
        assert_eq!((p.data, p.zero_in_both), (70, 30));
    }

    #[test]
    fn plan_covers_only_the_shared_size() {
        let a = map(100, &[(0, 100, file(0))]);
        let b = map(40, &[(0, 30, Source::Zero), (30, 10, Source::Zero)]);
        let p = plan(&a, &b, 1 << 20);
        assert_eq!(p.pieces, vec![(0, 40)]);
        let z = map(40, &[(0, 40, Source::Zero)]);
        assert_eq!(plan(&z, &b, 8), Plan { pieces: vec![], data: 0, zero_in_both: 40 });
        let empty = map(0, &[]);
        assert_eq!(plan(&empty, &a, 8), Plan { pieces: vec![], data: 0, zero_in_both: 0 });
    }

    #[test]
    fn runs_split_a_range_at_extent_edges_and_shift_offsets() {
        let m = map(100, &[(0, 10, Source::Zero), (10, 50, file(1000)), (60, 40, Source::Export)]);
        let got: Vec<Extent> = m.runs(5, 60).collect();
        assert_eq!(got, vec![ext(5, 5, Source::Zero), ext(10, 50, file(1000)), ext(60, 5, Source::Export)]);
        let got: Vec<Extent> = m.runs(20, 10).collect();
        assert_eq!(got, vec![ext(20, 10, file(1010))]);
        assert_eq!(m.runs(95, 50).collect::<Vec<_>>(), vec![ext(95, 5, Source::Export)]);
        assert!(m.needs_export());
    }

    #[test]
    fn first_difference_is_the_exact_byte() {
        let a = vec![7u8; 10_000];
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b), None);
        b[8193] = 0;
        b[9000] = 0;
        assert_eq!(first_difference(&a, &b), Some(8193));
        b[0] = 1;
        assert_eq!(first_difference(&a, &b), Some(0));
        assert_eq!(first_difference(&a[..5], &a[..6]), Some(5));
    }
}
