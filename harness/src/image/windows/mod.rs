//! The Windows test guest's image, built from the user's own Windows ISO and virtio-win ISO
//! (`quiesce image build windows`). This module holds everything up to the point where QEMU
//! would boot Windows Setup: reading the ISOs ([`iso`]), choosing the edition and the
//! virtio-win drivers that fit it ([`editions`], [`virtio`]), the provisioning CD with the
//! answer file and first-logon scripts ([`media`]), QEMU's command line for the install
//! ([`plan`]), and where built images are kept ([`cache`]). The install itself runs in
//! [`crate::windows::install`].
//!
//! Every input is checked before anything boots, and a bad one is a typed
//! [`WindowsImageError`] that leaves no cache entry.
//!
//! NEVER RUN AGAINST A REAL WINDOWS ISO: no Windows guest can run where this was written.
//! It is tested with stub ISOs laid out as the real ones are (see `tests/host/windows_image.rs`).

pub mod cache;
pub mod disk;
pub mod editions;
pub mod iso;
pub mod media;
pub mod plan;
pub mod virtio;

use std::path::PathBuf;

use crate::sys::ToolError;

pub use editions::{Edition, VirtioOs};

/// The recipe's name under `guest-images/`.
pub const RECIPE: &str = "windows";

/// What the scenario runner and `quiesce doctor` print when no Windows image is built.
pub const BUILD_COMMAND: &str = "quiesce image build windows --iso WIN.iso --virtio-win VIRTIO.iso";

/// Why a Windows image cannot be built from what was given. Every variant but the last two
/// is found before anything boots, and none leaves a cache entry.
#[derive(Debug, thiserror::Error)]
pub enum WindowsImageError {
    /// A file given on the command line is not there (or cannot be read).
    #[error("{what} {path}: {source}")]
    Missing { what: &'static str, path: PathBuf, source: std::io::Error },
    /// The file could not be opened as an ISO image at all (7-Zip's words follow).
    #[error("{path} is not an ISO image that can be read: {why}")]
    NotAnIso { path: PathBuf, why: String },
    /// The ISO has no `sources/install.wim` (or `install.esd`): it is not Windows
    /// installation media.
    #[error("{path} is not a Windows installation ISO: it has no sources/install.wim or sources/install.esd")]
    NotWindows { path: PathBuf },
    /// The install image lists no edition that runs on x86-64 (amd64); quiesce's guests are
    /// x86-64 QEMU machines.
    #[error("{path} holds Windows for {found}, not for x86-64 (amd64): use an x64 ISO")]
    WrongArchitecture { path: PathBuf, found: String },
    /// The edition asked for (`--edition`) is not in the ISO; the ISO's editions are listed.
    #[error("{path} has no edition {asked:?}; it has:\n{choices}")]
    NoSuchEdition { path: PathBuf, asked: String, choices: String },
    /// No `--edition` was given and the ISO has no Server Standard edition to default to;
    /// pick one of those listed with `--edition NAME`.
    #[error("{path} has no Server Standard edition to default to; pick one with --edition NAME:\n{choices}")]
    NoDefaultEdition { path: PathBuf, choices: String },
    /// The install image's description of an edition is not what Windows media hold (a
    /// damaged or unusual install.wim).
    #[error("{path}: the install image's edition list cannot be read: {why}")]
    BadEditionList { path: PathBuf, why: String },
    /// This Windows build is not one quiesce knows virtio-win drivers for.
    #[error("{edition}: Windows build {build} ({kind}) is not one quiesce knows virtio-win drivers for (Server 2016, 2019, 2022, 2025; Windows 10, 11)")]
    UnknownWindowsBuild { edition: String, build: u32, kind: String },
    /// The virtio-win ISO is not one: none of its driver folders is there.
    #[error("{path} is not a virtio-win ISO: it has none of the viostor, vioscsi, NetKVM and vioserial folders")]
    NotVirtioWin { path: PathBuf },
    /// The virtio-win ISO has no drivers for this Windows (too old an ISO for a new Windows,
    /// or one that dropped an old one); the missing folders are named.
    #[error("{path} has no virtio-win drivers for {os}: missing {missing}; use a virtio-win ISO that supports it")]
    NoDriversFor { path: PathBuf, os: VirtioOs, missing: String },
    /// The virtio-win ISO lacks the installers the first logon runs.
    #[error("{path} lacks {missing}, which the guest's first logon installs")]
    VirtioIncomplete { path: PathBuf, missing: String },
    /// The answer file made from the recipe's template is not well-formed XML, or a
    /// placeholder was left in it (a defect of the recipe, not of the input).
    #[error("the answer file made from guest-images/windows/autounattend.xml is not valid: {0}")]
    AnswerFile(String),
    /// A host tool the build needs could not run (not installed: the Debian package is
    /// named), failed, or ran past its deadline.
    #[error("{tool} (Debian package {package}): {error}")]
    Tool { tool: &'static str, package: &'static str, error: ToolError },
    /// The image cache (see `QUIESCE_CACHE_DIR`) or a work folder could not be written.
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

impl WindowsImageError {
    pub(crate) fn io<'a>(what: &'static str, path: &'a std::path::Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| WindowsImageError::Io { what, path: path.to_owned(), source }
    }

    pub(crate) fn tool(tool: &'static str, package: &'static str) -> impl FnOnce(ToolError) -> Self {
        move |error| WindowsImageError::Tool { tool, package, error }
    }
}
