//! The editions in a Windows ISO's install image, read from the XML that `wimlib-imagex
//! info --extract-xml` takes out of `sources/install.wim` (Debian's wimtools), and what
//! they decide: the default edition, the architecture, and which virtio-win drivers fit.
//!
//! The XML is untrusted input: it is parsed by roxmltree (no entities, no network), and a
//! field that is missing or not a number is simply unknown.

use std::path::Path;
use std::time::Duration;

use super::{iso, WindowsImageError};
use crate::sys::Tool;

/// `wimlib-imagex info`: it reads the WIM's header and XML only.
const WIMINFO: Duration = Duration::from_secs(120);
/// The XML of a WIM with a dozen editions is a few tens of KiB.
const MAX_XML: u64 = 8 << 20;

/// WIM's `<ARCH>` values (PROCESSOR_ARCHITECTURE_*).
const ARCH_X86: u32 = 0;
const ARCH_ARM: u32 = 5;
const ARCH_IA64: u32 = 6;
const ARCH_AMD64: u32 = 9;
const ARCH_ARM64: u32 = 12;

/// One edition (image) of an install.wim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edition {
    pub index: u32,
    /// `/IMAGE/NAME`, which the answer file names the edition by.
    pub name: String,
    pub display_name: Option<String>,
    /// `ServerStandard`, `ServerDatacenterEval`, `Professional`...
    pub edition_id: Option<String>,
    /// `Server`, `Server Core`, `Client`.
    pub installation_type: Option<String>,
    pub arch: Option<u32>,
    pub build: Option<u32>,
}

impl Edition {
    pub fn is_server(&self) -> bool {
        let server = |s: &Option<String>| s.as_deref().is_some_and(|s| s.to_ascii_lowercase().starts_with("server"));
        server(&self.installation_type) || server(&self.edition_id)
    }

    /// A Server Standard edition (evaluation or not, Core or Desktop Experience).
    pub fn is_server_standard(&self) -> bool {
        let id = self.edition_id.as_deref().unwrap_or("").to_ascii_lowercase();
        id.starts_with("serverstandard") || (id.is_empty() && self.name.to_ascii_uppercase().contains("SERVERSTANDARD"))
    }

    fn arch_name(&self) -> String {
        match self.arch {
            Some(ARCH_X86) => "x86 (32-bit)".into(),
            Some(ARCH_ARM) => "ARM".into(),
            Some(ARCH_IA64) => "Itanium".into(),
            Some(ARCH_AMD64) => "x86-64".into(),
            Some(ARCH_ARM64) => "ARM64".into(),
            Some(n) => format!("architecture {n}"),
            None => "an unknown architecture".into(),
        }
    }

    /// One line of the list shown when an edition must be picked.
    pub fn choice_line(&self) -> String {
        let shown = self.display_name.as_deref().map(|d| format!(" ({d})")).unwrap_or_default();
        format!("  {}: {}{shown}", self.index, self.name)
    }

    /// The virtio-win folder for this Windows, from its build number.
    pub fn virtio_os(&self) -> Result<VirtioOs, WindowsImageError> {
        let build = self.build.unwrap_or(0);
        let os = if self.is_server() {
            match build {
                14393 => Some(VirtioOs::Server2016),
                17763 => Some(VirtioOs::Server2019),
                20348 => Some(VirtioOs::Server2022),
                26100 => Some(VirtioOs::Server2025),
                _ => None,
            }
        } else {
            match build {
                10240..=19045 => Some(VirtioOs::Windows10),
                22000.. => Some(VirtioOs::Windows11),
                _ => None,
            }
        };
        os.ok_or_else(|| WindowsImageError::UnknownWindowsBuild {
            edition: self.name.clone(),
            build,
            kind: if self.is_server() { "server".into() } else { "client".into() },
        })
    }
}

/// The Windows versions virtio-win has a driver folder for, named as its folders are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioOs {
    Server2016,
    Server2019,
    Server2022,
    Server2025,
    Windows10,
    Windows11,
}

impl VirtioOs {
    /// The folder name under each driver of virtio-win (`viostor/2k22/amd64`).
    pub fn dir(self) -> &'static str {
        match self {
            VirtioOs::Server2016 => "2k16",
            VirtioOs::Server2019 => "2k19",
            VirtioOs::Server2022 => "2k22",
            VirtioOs::Server2025 => "2k25",
            VirtioOs::Windows10 => "w10",
            VirtioOs::Windows11 => "w11",
        }
    }
}

impl std::fmt::Display for VirtioOs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            VirtioOs::Server2016 => "Windows Server 2016",
            VirtioOs::Server2019 => "Windows Server 2019",
            VirtioOs::Server2022 => "Windows Server 2022",
            VirtioOs::Server2025 => "Windows Server 2025",
            VirtioOs::Windows10 => "Windows 10",
            VirtioOs::Windows11 => "Windows 11",
        };
        write!(f, "{name} ({})", self.dir())
    }
}

/// The editions of a WIM's XML (UTF-16LE with a byte-order mark, as WIMs store it; UTF-8
/// is taken too).
pub fn parse_xml(bytes: &[u8]) -> Result<Vec<Edition>, String> {
    let text = if bytes.starts_with(&[0xff, 0xfe]) || (bytes.len() > 1 && bytes[1] == 0) {
        let units: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        String::from_utf16(&units).map_err(|e| format!("not UTF-16: {e}"))?
    } else {
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("not UTF-8: {e}"))?
    };
    let text = text.trim_start_matches('\u{feff}');
    let doc = roxmltree::Document::parse(text).map_err(|e| format!("not well-formed XML: {e}"))?;
    let root = doc.root_element();
    if !root.has_tag_name("WIM") {
        return Err(format!("the root element is <{}>, not <WIM>", root.tag_name().name()));
    }
    fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
        n.children().find(|c| c.has_tag_name(name))
    }
    fn text_of(n: Option<roxmltree::Node>) -> Option<String> {
        n.and_then(|n| n.text()).map(|t| t.trim().to_owned())
    }
    let mut out = Vec::new();
    for img in root.children().filter(|c| c.has_tag_name("IMAGE")) {
        let index = img.attribute("INDEX").and_then(|i| i.parse().ok()).ok_or("an IMAGE has no INDEX")?;
        let name = text_of(child(img, "NAME")).filter(|n| !n.is_empty()).ok_or("an IMAGE has no NAME")?;
        let win = child(img, "WINDOWS");
        let in_win = |name: &str| win.and_then(|w| child(w, name));
        out.push(Edition {
            index,
            name,
            display_name: text_of(child(img, "DISPLAYNAME")),
            edition_id: text_of(in_win("EDITIONID")),
            installation_type: text_of(in_win("INSTALLATIONTYPE")),
            arch: text_of(in_win("ARCH")).and_then(|a| a.parse().ok()),
            build: win
                .and_then(|w| child(w, "VERSION"))
                .and_then(|v| text_of(child(v, "BUILD")))
                .and_then(|b| b.parse().ok()),
        });
    }
    if out.is_empty() {
        return Err("it lists no images".into());
    }
    Ok(out)
}

/// The edition to install: the one named `asked` (by name, display name or index), else
/// the first Server Standard one. The ISO's x86-64 editions are the only candidates.
pub fn choose(iso: &Path, editions: &[Edition], asked: Option<&str>) -> Result<Edition, WindowsImageError> {
    let x64: Vec<&Edition> = editions.iter().filter(|e| e.arch == Some(ARCH_AMD64)).collect();
    if x64.is_empty() {
        let found = editions.first().map(Edition::arch_name).unwrap_or_else(|| "no architecture".into());
        return Err(WindowsImageError::WrongArchitecture { path: iso.to_owned(), found });
    }
    let choices = x64.iter().map(|e| e.choice_line()).collect::<Vec<_>>().join("\n");
    let picked = match asked {
        Some(a) => x64.iter().find(|e| {
            e.name.eq_ignore_ascii_case(a)
                || e.display_name.as_deref().is_some_and(|d| d.eq_ignore_ascii_case(a))
                || e.index.to_string() == a
        }),
        None => x64.iter().find(|e| e.is_server_standard()),
    };
    match (picked, asked) {
        (Some(e), _) => Ok((*e).clone()),
        (None, Some(a)) => Err(WindowsImageError::NoSuchEdition { path: iso.to_owned(), asked: a.to_owned(), choices }),
        (None, None) => Err(WindowsImageError::NoDefaultEdition { path: iso.to_owned(), choices }),
    }
}

/// Reads the editions of the Windows ISO at `win_iso`, taking its install image out into
/// `work` (4-6 GB on real media).
pub fn read(win_iso: &Path, work: &Path) -> Result<Vec<Edition>, WindowsImageError> {
    let entries = iso::list(win_iso, "Windows ISO")?;
    let wim = ["sources/install.wim", "sources/install.esd"]
        .iter()
        .find_map(|p| iso::find(&entries, p))
        .ok_or_else(|| WindowsImageError::NotWindows { path: win_iso.to_owned() })?;
    let local = iso::extract(win_iso, &wim.path, work)?;
    let xml = work.join("install.xml");
    Tool::new("wimlib-imagex", WIMINFO)
        .arg("info")
        .arg(&local)
        .arg("--extract-xml")
        .arg(&xml)
        .output()
        .and_then(|o| o.into_success())
        .map_err(WindowsImageError::tool("wimlib-imagex", "wimtools"))?;
    // The WIM is not needed any more; it is the largest file the build makes.
    let _ = std::fs::remove_file(&local);
    let len = std::fs::metadata(&xml).map_err(WindowsImageError::io("reading", &xml))?.len();
    if len > MAX_XML {
        let why = format!("its XML is {len} bytes, more than the {MAX_XML} accepted");
        return Err(WindowsImageError::BadEditionList { path: win_iso.to_owned(), why });
    }
    let bytes = std::fs::read(&xml).map_err(WindowsImageError::io("reading", &xml))?;
    parse_xml(&bytes).map_err(|why| WindowsImageError::BadEditionList { path: win_iso.to_owned(), why })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The XML `wimlib-imagex capture --image-property` writes, as a Server 2022 evaluation
    /// ISO's install.wim lists its editions (the names follow Microsoft's media; made here,
    /// not read from a real ISO).
    fn server_2022() -> Vec<u8> {
        let xml = "\u{feff}<WIM><IMAGE INDEX=\"1\"><NAME>Windows Server 2022 SERVERSTANDARDCORE</NAME>\
            <WINDOWS><ARCH>9</ARCH><VERSION><MAJOR>10</MAJOR><MINOR>0</MINOR><BUILD>20348</BUILD></VERSION>\
            <EDITIONID>ServerStandardEval</EDITIONID><INSTALLATIONTYPE>Server Core</INSTALLATIONTYPE></WINDOWS>\
            <DISPLAYNAME>Windows Server 2022 Standard Evaluation</DISPLAYNAME></IMAGE>\
            <IMAGE INDEX=\"2\"><NAME>Windows Server 2022 SERVERDATACENTER</NAME><WINDOWS><ARCH>9</ARCH>\
            <VERSION><BUILD>20348</BUILD></VERSION><EDITIONID>ServerDatacenterEval</EDITIONID>\
            <INSTALLATIONTYPE>Server</INSTALLATIONTYPE></WINDOWS></IMAGE></WIM>";
        xml.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
    }

    #[test]
    fn editions_default_to_the_first_server_standard() {
        let e = parse_xml(&server_2022()).unwrap();
        assert_eq!(e.len(), 2);
        let chosen = choose(Path::new("win.iso"), &e, None).unwrap();
        assert_eq!((chosen.index, chosen.build), (1, Some(20348)));
        assert_eq!(chosen.virtio_os().unwrap(), VirtioOs::Server2022);
        let dc = choose(Path::new("win.iso"), &e, Some("windows server 2022 serverdatacenter")).unwrap();
        assert_eq!(dc.index, 2);
        assert_eq!(choose(Path::new("win.iso"), &e, Some("2")).unwrap().index, 2);
        let err = choose(Path::new("win.iso"), &e, Some("Home")).unwrap_err().to_string();
        assert!(
            err.contains("no edition \"Home\"") && err.contains("  2: Windows Server 2022 SERVERDATACENTER"),
            "{err}"
        );
        let only_dc = &e[1..];
        let err = choose(Path::new("win.iso"), only_dc, None).unwrap_err();
        assert!(matches!(err, WindowsImageError::NoDefaultEdition { .. }), "{err}");
    }

    #[test]
    fn wrong_architecture_and_unknown_builds_are_refused() {
        let xml = "<WIM><IMAGE INDEX=\"1\"><NAME>Windows 10 Pro</NAME><WINDOWS><ARCH>12</ARCH>\
                   <VERSION><BUILD>19045</BUILD></VERSION><EDITIONID>Professional</EDITIONID></WINDOWS></IMAGE></WIM>";
        let e = parse_xml(xml.as_bytes()).unwrap();
        let err = choose(Path::new("arm.iso"), &e, None).unwrap_err().to_string();
        assert!(err.contains("holds Windows for ARM64"), "{err}");
        let mut client = e[0].clone();
        client.arch = Some(ARCH_AMD64);
        assert_eq!(client.virtio_os().unwrap(), VirtioOs::Windows10);
        client.build = Some(7601);
        assert!(matches!(client.virtio_os(), Err(WindowsImageError::UnknownWindowsBuild { build: 7601, .. })));
    }

    #[test]
    fn malformed_lists_are_errors_not_panics() {
        assert!(parse_xml(b"<WIM></WIM>").unwrap_err().contains("no images"));
        assert!(parse_xml(b"<NOTWIM/>").unwrap_err().contains("not <WIM>"));
        assert!(parse_xml(b"<WIM><IMAGE><NAME>x</NAME></IMAGE></WIM>").unwrap_err().contains("INDEX"));
        assert!(parse_xml(b"<WIM><IMAGE INDEX=\"1\">").unwrap_err().contains("well-formed"));
        assert!(parse_xml(&[0xff, 0xfe, 0x00, 0xd8]).is_err());
    }
}
