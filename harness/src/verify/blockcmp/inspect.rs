//! What the comparison knows of each image before it reads data: its size, its cluster
//! size and its map. quiesce's own readers answer for the common cases at once, with no
//! process started ([`qcow2`](super::qcow2): qcow2 and raw; [`alloc`](super::alloc): VHD
//! and VHDX); `qemu-img info --backing-chain` and `qemu-img map` answer for the rest
//! (backing chains, encryption, an image our readers do not vouch for), both images'
//! runs at once.

use std::fs::File;
use std::path::Path;

use super::map::{self, Extent, Map, Source};
use super::tools;
use super::work::Layer;
use super::{alloc, qcow2, BlockCompareError, Image, Options, ReadPath};
use crate::qemu::programs::QemuProgram;
use crate::qemu::DiskFormat;
use crate::sys::{Output, Running, Tool};

/// The image from quiesce's own reader of its format, if that reader vouches for it. Any
/// doubt (an error, a layout it leaves to QEMU) is None: qemu-img then answers, and its
/// words are what a user sees if the image is broken.
pub(super) fn own<'p>(path: &'p Path, format: DiskFormat, export: &'static str) -> Option<Image<'p>> {
    let (map, cluster_size, layers) = own_chain(path, format, 0)?;
    Some(Image { path, format, name: name_of(path), export, map, cluster_size, layers })
}

/// Backing chains deeper than this are left to qemu-img.
const MAX_OWN_DEPTH: usize = 16;

/// An image's map, cluster size and files (0: the image, then its backing chain), read by
/// our own readers; a qcow2's unallocated clusters come from its backing file, read the
/// same way (a chain of qcow2, raw, VHD and VHDX files, the backing format named in each
/// qcow2 header, as QEMU opens them). The backing file's name is taken relative to the
/// image's folder unless absolute; a name QEMU would parse as a protocol or JSON (a ':'
/// in it) is left to qemu-img.
type Chain = (Map, Option<u64>, Vec<Option<Layer>>);
fn own_chain(path: &Path, format: DiskFormat, depth: usize) -> Option<Chain> {
    let file = File::open(path).ok()?;
    let (map, cluster_size, lower) = match format {
        DiskFormat::Qcow2 => {
            let q = qcow2::qcow2(&file).ok()??;
            let lower = match &q.backing {
                None => None,
                Some(b) => {
                    let name =
                        std::str::from_utf8(&b.name).ok().filter(|n| !n.contains(':') && depth < MAX_OWN_DEPTH)?;
                    let format = match &b.format[..] {
                        b"qcow2" => DiskFormat::Qcow2,
                        b"raw" => DiskFormat::Raw,
                        b"vhdx" => DiskFormat::Vhdx,
                        b"vpc" => DiskFormat::Vpc,
                        _ => return None,
                    };
                    let base = path.parent().unwrap_or(Path::new("")).join(name);
                    Some((own_chain(&base, format, depth + 1)?, q.from_backing))
                }
            };
            (q.map, Some(q.cluster_size), lower)
        }
        DiskFormat::Raw => (qcow2::raw(&file).ok()??, None, None),
        DiskFormat::Vhdx => alloc::vhdx_own(&file).ok()?.map(|(m, b)| (m, Some(b), None))?,
        DiskFormat::Vpc => alloc::vhd_own(&file).ok()?.map(|(m, b)| (m, Some(b), None))?,
    };
    let mut layers = vec![Some(Layer::new(file))];
    let Some(((base_map, _, base_layers), from_backing)) = lower else {
        return Some((map, cluster_size, layers));
    };
    layers.extend(base_layers);
    Some((over(&map, &base_map, &from_backing), cluster_size, layers))
}

/// `top` with its `from_backing` ranges taken from `base` (whose layers are one deeper);
/// past the end of a smaller base, zeros, as QEMU reads them.
fn over(top: &Map, base: &Map, from_backing: &[(u64, u64)]) -> Map {
    let mut out = Map { size: top.size, extents: Vec::new() };
    let mut pos = 0;
    for &(start, len) in from_backing.iter().chain([(top.size, 0)].iter()) {
        for e in top.runs(pos, start - pos) {
            map::push(&mut out.extents, e);
        }
        let end = start + len;
        let shared = end.min(base.size);
        if start < shared {
            for mut e in base.runs(start, shared - start) {
                if let Source::File { layer, offset } = e.source {
                    e.source = Source::File { layer: layer + 1, offset };
                }
                map::push(&mut out.extents, e);
            }
        }
        if shared.max(start) < end {
            let from = shared.max(start);
            map::push(&mut out.extents, Extent { start: from, len: end - from, source: Source::Zero });
        }
        pos = end;
    }
    out
}

/// The file name, for messages.
fn name_of(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// `qemu-img info` and `qemu-img map` of one image, running.
pub(super) struct Inspect<'p> {
    path: &'p Path,
    format: DiskFormat,
    export: &'static str,
    info: Running<'static>,
    /// qemu-img map, unless the image's own tables are to be read first.
    map: Option<Running<'static>>,
    opts: Options,
}

impl<'p> Inspect<'p> {
    pub(super) fn start(
        path: &'p Path,
        format: DiskFormat,
        opts: &Options,
        export: &'static str,
    ) -> Result<Self, BlockCompareError> {
        let f = format.driver().as_ref();
        let info = spawn(
            path,
            opts,
            "qemu-img info",
            &[
                "info".as_ref(),
                "-U".as_ref(),
                "--backing-chain".as_ref(),
                "--output=json".as_ref(),
                "-f".as_ref(),
                f,
                path.as_os_str(),
            ],
        )?;
        // VHD and VHDX: their own tables say more than qemu-img map would; it runs only
        // if they cannot be read (see `alloc`).
        let own_table = opts.read_path == ReadPath::Auto && alloc_reader(format).is_some();
        let map = if own_table { None } else { Some(spawn_map(path, format, opts)?) };
        Ok(Inspect { path, format, export, info, map, opts: opts.clone() })
    }

    pub(super) fn finish(self, read_path: ReadPath) -> Result<Image<'p>, BlockCompareError> {
        let path = self.path;
        let failed = |step, error| BlockCompareError::Failed { image: path.to_owned(), step, error };
        let info = self.info.wait().and_then(Output::into_success).map_err(|e| failed("qemu-img info", e))?.stdout;
        let bad = |step, problem: String| BlockCompareError::BadOutput { image: path.to_owned(), step, problem };
        let chain: Vec<serde_json::Value> =
            serde_json::from_slice(&info).map_err(|e| bad("qemu-img info", format!("not a list of images: {e}")))?;
        if chain.is_empty() || chain.len() > MAX_CHAIN {
            return Err(bad("qemu-img info", format!("a backing chain of {} images", chain.len())));
        }
        let size = chain[0]["virtual-size"].as_u64().ok_or_else(|| bad("qemu-img info", "no virtual-size".into()))?;
        let cluster_size = chain[0]["cluster-size"].as_u64();
        let name = name_of(path);
        let image = |map, layers| Image {
            path,
            format: self.format,
            name: name.clone(),
            export: self.export,
            map,
            cluster_size,
            layers,
        };

        if self.map.is_none() {
            if let Some((read_table, step)) = alloc_reader(self.format).filter(|_| chain.len() == 1) {
                let file =
                    File::open(path).map_err(|error| BlockCompareError::Open { image: path.to_owned(), error })?;
                if let Some(map) = read_table(&file, size).map_err(|p| bad(step, p))? {
                    return Ok(image(map, vec![Some(Layer::new(file))]));
                }
            }
        }
        let map = match self.map {
            Some(running) => running,
            None => spawn_map(path, self.format, &self.opts)?,
        };
        let map = map.wait().and_then(Output::into_success).map_err(|e| failed("qemu-img map", e))?.stdout;
        let layers: Vec<Option<Layer>> = chain
            .iter()
            .enumerate()
            .map(|(depth, layer)| {
                // The image itself is opened by the path we were given; backing files by the
                // name qemu-img opened them by (relative to the same working folder).
                let file = if depth == 0 { Some(path) } else { layer["filename"].as_str().map(Path::new) };
                let expected = if depth == 0 { Some(self.format.driver()) } else { None };
                match file {
                    Some(file) if read_path == ReadPath::Auto && stores_verbatim(layer, expected) => {
                        File::open(file).ok().map(Layer::new)
                    }
                    _ => None,
                }
            })
            .collect();
        let trust: Vec<Option<u64>> = layers.iter().map(|l| l.as_ref().and_then(Layer::len)).collect();
        let map = map::parse(&map, size, &trust).map_err(|p| bad("qemu-img map", p))?;
        Ok(image(map, layers))
    }
}

/// Reads the allocation of an image of `format` from its own tables, if quiesce can
/// ([`alloc`]), and the name of that step for errors.
type TableReader = fn(&File, u64) -> Result<Option<Map>, String>;
fn alloc_reader(format: DiskFormat) -> Option<(TableReader, &'static str)> {
    match format {
        DiskFormat::Vhdx => Some((|f, size| alloc::vhdx(f, size), "VHDX block allocation table")),
        DiskFormat::Vpc => Some((|f, size| alloc::vhd(f, size), "VHD block allocation table")),
        DiskFormat::Qcow2 | DiskFormat::Raw => None,
    }
}

fn spawn(
    path: &Path,
    opts: &Options,
    step: &'static str,
    args: &[&std::ffi::OsStr],
) -> Result<Running<'static>, BlockCompareError> {
    Tool::new(QemuProgram::Img.path(), opts.tool_timeout)
        .args(args)
        .stdout_cap(tools::MAX_OUTPUT)
        .spawn()
        .map_err(|error| BlockCompareError::Failed { image: path.to_owned(), step, error })
}

fn spawn_map(path: &Path, format: DiskFormat, opts: &Options) -> Result<Running<'static>, BlockCompareError> {
    let f = format.driver().as_ref();
    spawn(
        path,
        opts,
        "qemu-img map",
        &["map".as_ref(), "-U".as_ref(), "--output=json".as_ref(), "-f".as_ref(), f, path.as_os_str()],
    )
}

/// Backing chains longer than this are refused.
const MAX_CHAIN: usize = 4096;

/// True if a layer (one entry of `qemu-img info --backing-chain`) keeps guest data verbatim
/// at the host offsets its map gives: raw, and qcow2 whose data is neither in an external
/// file nor encrypted. `expected` is the format the layer must have, if known.
fn stores_verbatim(layer: &serde_json::Value, expected: Option<&str>) -> bool {
    let format = layer["format"].as_str().unwrap_or("");
    if expected.is_some_and(|e| e != format) || layer["encrypted"].as_bool().unwrap_or(false) {
        return false;
    }
    let data = &layer["format-specific"]["data"];
    match format {
        "raw" => true,
        "qcow2" => data.get("data-file").is_none() && data.get("encrypt").is_none(),
        _ => false,
    }
}
