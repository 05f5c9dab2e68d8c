//! Reading ISO images with 7-Zip (Debian's p7zip-full): listing their files and taking one
//! out.
//!
//! Why 7-Zip and not xorriso: Microsoft's Windows ISOs keep their files in UDF; their ISO
//! 9660 tree holds only a README saying so, and xorriso reads ISO 9660 (with Rock Ridge and
//! Joliet) only. 7-Zip reads both, so one reader serves the Windows ISO and virtio-win's
//! (ISO 9660 with Joliet). xorriso still builds the provisioning CD ([`super::media`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::WindowsImageError;
use crate::sys::Tool;

/// `7z l` of an ISO: it reads the directory records only, in well under a second.
const LIST: Duration = Duration::from_secs(120);
/// `7z e` of one file: install.wim is 4-6 GB on real media, a minute or two at disk speed.
const EXTRACT: Duration = Duration::from_secs(20 * 60);
/// Listing output of an ISO with tens of thousands of files stays well below this.
const LIST_CAP: usize = 64 << 20;

/// One file or folder of an ISO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoEntry {
    /// `/`-separated, without a leading `/`, as the ISO spells it.
    pub path: String,
    pub dir: bool,
}

fn seven_zip(timeout: Duration) -> Tool<'static> {
    Tool::new("7z", timeout)
}

/// Every file and folder of `iso`. A file that is not an ISO (or is damaged) is
/// [`WindowsImageError::NotAnIso`]; a missing one is [`WindowsImageError::Missing`].
pub fn list(iso: &Path, what: &'static str) -> Result<Vec<IsoEntry>, WindowsImageError> {
    std::fs::File::open(iso).map_err(|source| WindowsImageError::Missing { what, path: iso.to_owned(), source })?;
    let out = seven_zip(LIST)
        .args(["l", "-slt", "-ba"])
        .arg("-tiso")
        .arg(iso)
        .stdout_cap(LIST_CAP)
        .output()
        .map_err(WindowsImageError::tool("7z", "p7zip-full"))?;
    let mut entries = parse_listing(&out.stdout_text());
    if !out.status.success() || entries.is_empty() {
        // -tiso reads the ISO 9660 tree; a UDF-only image lists nothing there: try UDF.
        let udf = seven_zip(LIST)
            .args(["l", "-slt", "-ba", "-tudf"])
            .arg(iso)
            .stdout_cap(LIST_CAP)
            .output()
            .map_err(WindowsImageError::tool("7z", "p7zip-full"))?;
        if udf.status.success() {
            entries = parse_listing(&udf.stdout_text());
        } else if !out.status.success() {
            let why = format!("{} {}", out.stderr.trim(), out.stdout_text().trim());
            return Err(WindowsImageError::NotAnIso { path: iso.to_owned(), why: why.trim().to_owned() });
        }
    }
    // A UDF image keeps only a README in its ISO 9660 tree: the UDF tree is the real one.
    if entries.iter().all(|e| e.path.eq_ignore_ascii_case("README.TXT")) {
        let udf = seven_zip(LIST).args(["l", "-slt", "-ba", "-tudf"]).arg(iso).stdout_cap(LIST_CAP).output();
        if let Ok(udf) = udf.map(|o| o.stdout_text()) {
            let more = parse_listing(&udf);
            if !more.is_empty() {
                entries = more;
            }
        }
    }
    Ok(entries)
}

/// 7-Zip's `-slt` listing: one block of `Key = value` lines per entry.
pub fn parse_listing(text: &str) -> Vec<IsoEntry> {
    let mut out = Vec::new();
    let mut path: Option<String> = None;
    let mut dir = false;
    let mut flush = |path: &mut Option<String>, dir: &mut bool| {
        if let Some(p) = path.take() {
            out.push(IsoEntry { path: p.replace('\\', "/").trim_start_matches('/').to_owned(), dir: *dir });
        }
        *dir = false;
    };
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("Path = ") {
            flush(&mut path, &mut dir);
            path = Some(p.to_owned());
        } else if line == "Folder = +" || line.starts_with("Attributes = D") {
            dir = true;
        }
    }
    flush(&mut path, &mut dir);
    out
}

/// The entry named `path` (ignoring case, as Windows media are read), if the ISO has it.
pub fn find<'a>(entries: &'a [IsoEntry], path: &str) -> Option<&'a IsoEntry> {
    entries.iter().find(|e| !e.dir && e.path.eq_ignore_ascii_case(path))
}

/// Takes the file `inner` (as [`list`] spells it) out of `iso` into `dest_dir`, and
/// returns its path there.
pub fn extract(iso: &Path, inner: &str, dest_dir: &Path) -> Result<PathBuf, WindowsImageError> {
    let name = inner.rsplit('/').next().unwrap_or(inner);
    for kind in ["-tiso", "-tudf"] {
        let out = seven_zip(EXTRACT)
            .args(["e", "-y", "-bd", kind])
            .arg(format!("-o{}", dest_dir.display()))
            .arg(iso)
            .arg(inner)
            .output()
            .map_err(WindowsImageError::tool("7z", "p7zip-full"))?;
        let got = dest_dir.join(name);
        if out.status.success() && got.is_file() {
            return Ok(got);
        }
    }
    Err(WindowsImageError::NotAnIso { path: iso.to_owned(), why: format!("{inner} could not be read from it") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_blocks_become_entries() {
        // As p7zip 16.02 prints `7z l -slt -ba` of an ISO made by xorriso (recorded).
        let text = "Path = sources\nFolder = +\nSize = \n\nPath = sources/install.wim\nFolder = -\nSize = 2051\n\n\
                    Path = viostor\\2k22\\amd64\\viostor.inf\nFolder = -\n";
        let e = parse_listing(text);
        assert_eq!(e.len(), 3);
        assert!(e[0].dir && !e[1].dir);
        assert_eq!(e[2].path, "viostor/2k22/amd64/viostor.inf");
        assert!(find(&e, "SOURCES/INSTALL.WIM").is_some());
        assert!(find(&e, "sources").is_none(), "a folder is not a file");
        assert!(parse_listing("").is_empty());
    }
}
