//! A compatibility profile: quiesce behaves as if the QEMU in use were an older release, so
//! that the code paths of QEMU 8.2 (Ubuntu 24.04's) are run on a newer QEMU, here.
//!
//! `QUIESCE_QEMU_COMPAT=8.2` (or `quiesce --qemu-compat 8.2`) hides every [`Feature`] that
//! came after 8.2 from the capability probe and from the replies quiesce reads, so every
//! decision is taken as on a real 8.2: Saved State writes the plain stream format, a paused
//! VM's disks stay inactive after a save until it is continued, and a block node's activity
//! is not reported. A profile can only take features away: one newer than the QEMU in use
//! changes nothing.
//!
//! The profile is one setting for the whole process, like the QEMU binary it describes: it
//! is read once (the command line's flag, else the environment) and never changes after.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::Serialize;

/// The environment variable that sets the profile.
pub const ENV: &str = "QUIESCE_QEMU_COMPAT";

/// A QEMU release, `major.minor`: what a feature needs, or what a profile pretends to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct QemuRelease {
    pub major: u16,
    pub minor: u16,
}

impl QemuRelease {
    pub const fn new(major: u16, minor: u16) -> Self {
        QemuRelease { major, minor }
    }
}

impl fmt::Display for QemuRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Why a profile could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompatError {
    /// The value is not a QEMU release written `MAJOR.MINOR` (such as `8.2`).
    #[error("{given:?} is not a QEMU release: write it MAJOR.MINOR, such as 8.2")]
    NotARelease { given: String },
    /// The environment variable is set to something that is not a release.
    #[error("${ENV}: {0}")]
    Environment(Box<CompatError>),
}

impl FromStr for QemuRelease {
    type Err = CompatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CompatError::NotARelease { given: s.to_owned() };
        let (major, minor) = s.trim().split_once('.').ok_or_else(bad)?;
        let number = |t: &str| -> Result<u16, CompatError> {
            if t.is_empty() || t.len() > 3 || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            t.parse().map_err(|_| bad())
        };
        Ok(QemuRelease { major: number(major)?, minor: number(minor)? })
    }
}

/// A QEMU feature quiesce uses that older releases lack, with the release that brought it
/// (QEMU's QAPI `since` tags). Features every release since 5.2 has are listed in the
/// README, not here: no profile worth running can hide them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Feature {
    /// `migrate` to a `file:` URI (`MigrationAddressType` `file`, 8.2): Saved State.
    FileMigration,
    /// The `mapped-ram` migration capability (9.0): a state file with RAM at fixed offsets.
    MappedRam,
    /// multifd channels writing one file (9.0, only together with mapped-ram).
    MultifdToFile,
    /// `blockdev-set-active` (10.0): a paused VM's disks made active again after a save.
    BlockdevSetActive,
    /// The `active` member of `query-named-block-nodes` (10.0): whether a node is active.
    NodeActivity,
}

impl Feature {
    pub const ALL: [Feature; 5] = [
        Feature::FileMigration,
        Feature::MappedRam,
        Feature::MultifdToFile,
        Feature::BlockdevSetActive,
        Feature::NodeActivity,
    ];

    /// The first QEMU release that has it.
    pub fn since(self) -> QemuRelease {
        match self {
            Feature::FileMigration => QemuRelease::new(8, 2),
            Feature::MappedRam | Feature::MultifdToFile => QemuRelease::new(9, 0),
            Feature::BlockdevSetActive | Feature::NodeActivity => QemuRelease::new(10, 0),
        }
    }

    /// What it is, as QEMU names it.
    pub fn name(self) -> &'static str {
        match self {
            Feature::FileMigration => "file: migration",
            Feature::MappedRam => "mapped-ram",
            Feature::MultifdToFile => "multifd to a file",
            Feature::BlockdevSetActive => "blockdev-set-active",
            Feature::NodeActivity => "block node activity (query-named-block-nodes active)",
        }
    }

    /// What quiesce does without it, in a user's words.
    pub fn without(self) -> &'static str {
        match self {
            Feature::FileMigration => "Saved State cannot be taken: a VM that needs it is refused",
            Feature::MappedRam => "Saved State writes the plain stream format (slower to save and load)",
            Feature::MultifdToFile => "Saved State writes with one channel",
            Feature::BlockdevSetActive => {
                "a paused VM's disks stay inactive after a save until it is continued; the backup says so"
            }
            Feature::NodeActivity => "whether a disk is active is read from QEMU's file locks instead",
        }
    }
}

/// Set by the command line before anything asks; wins over the environment.
static CHOSEN: OnceLock<Option<QemuRelease>> = OnceLock::new();

/// Sets the profile for this process (the `--qemu-compat` flag). Only the first call
/// counts, and only if nothing has read the profile yet; returns whether it was taken.
pub fn choose(release: Option<QemuRelease>) -> bool {
    CHOSEN.set(release).is_ok()
}

/// The profile in force: the one chosen, else `$QUIESCE_QEMU_COMPAT`, else none (the QEMU
/// in use as it is). An empty variable means none.
pub fn profile() -> Result<Option<QemuRelease>, CompatError> {
    if let Some(chosen) = CHOSEN.get() {
        return Ok(*chosen);
    }
    let from_env = match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => {
            Some(v.parse::<QemuRelease>().map_err(|e| CompatError::Environment(Box::new(e)))?)
        }
        _ => None,
    };
    // Fixed from now on: a process sees one QEMU.
    Ok(*CHOSEN.get_or_init(|| from_env))
}

/// Whether the profile lets quiesce use `feature` (the QEMU itself may still lack it). An
/// unreadable profile hides nothing here: the capability probe reports it as an error.
pub fn allows(feature: Feature) -> bool {
    allows_in(profile().ok().flatten(), feature)
}

/// Pure: whether a profile of `release` (none: no profile) lets `feature` through.
pub fn allows_in(release: Option<QemuRelease>, feature: Feature) -> bool {
    release.is_none_or(|r| r >= feature.since())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_and_order() {
        let r: QemuRelease = "8.2".parse().unwrap();
        assert_eq!(r, QemuRelease::new(8, 2));
        assert_eq!(r.to_string(), "8.2");
        assert!(QemuRelease::new(8, 2) < QemuRelease::new(9, 0));
        assert!(QemuRelease::new(10, 0) > QemuRelease::new(9, 2));
        for bad in ["", "8", "8.", ".2", "8.2.1", "eight.two", "-8.2", "8.2x", "1000.0"] {
            assert!(bad.parse::<QemuRelease>().is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn an_8_2_profile_hides_what_came_after_8_2() {
        let p = Some(QemuRelease::new(8, 2));
        assert!(allows_in(p, Feature::FileMigration));
        for f in [Feature::MappedRam, Feature::MultifdToFile, Feature::BlockdevSetActive, Feature::NodeActivity] {
            assert!(!allows_in(p, f), "{f:?}");
        }
        let nine = Some(QemuRelease::new(9, 2));
        assert!(allows_in(nine, Feature::MappedRam) && !allows_in(nine, Feature::BlockdevSetActive));
        assert!(Feature::ALL.iter().all(|f| allows_in(None, *f)));
        assert!(!allows_in(Some(QemuRelease::new(7, 2)), Feature::FileMigration));
    }
}
