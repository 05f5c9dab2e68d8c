//! A `[[vm]]`'s `image`: the name of one of quiesce's recipes (`image = "linux"`), or an
//! image the user brings (`image = { path = "...", format = "qcow2", os = "linux" }`),
//! prepared by them with qemu-ga in it.
//!
//! An image you bring boots from its own bootloader (SeaBIOS booting its first disk, as a
//! Windows guest boots), or, for an image without one (a bare filesystem), from the
//! `kernel`, `initrd` and `append` given beside it. It is opened read-only, as the backing
//! file of a private overlay, and never written.
//!
//! quiesce's own guest programs are not in such an image (the RAM counter, the journal
//! writer and the transactional app are the recipe's; the freeze-hook faults need the
//! recipe's hooks), so workloads, faults and checks that need them are refused at their
//! line. What needs only the agent and the disks still runs.
//!
//! The paths are untrusted: each is resolved against the scenario file's folder, must be a
//! regular file, and the image's format is read with `qemu-img info` (under its deadline)
//! and must be the one declared.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::spec::*;
use crate::qemu::DiskFormat;

/// What boots a `[[vm]]`: one of quiesce's recipes, or an image the user brings.
#[derive(Debug, Clone)]
pub enum ImageSpec {
    /// A guest image recipe under guest-images/ (`image = "linux"`).
    Recipe(String),
    /// An image of the user's own (`image = { path = ..., format = ..., os = ... }`).
    Own(Box<OwnImage>),
}

/// An image the user brings, with qemu-ga in it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnImage {
    /// The image file, absolute or relative to the scenario file's folder.
    pub path: Spanned<String>,
    pub format: Spanned<DiskFormatSpec>,
    /// What runs in it: "linux" or "windows" (what the runner may ask of its guest).
    pub os: Spanned<OwnOs>,
    /// For an image without a bootloader (a bare filesystem): the kernel to boot it with,
    /// relative like `path`...
    #[serde(default)]
    pub kernel: Option<Spanned<String>>,
    /// ...its initrd...
    #[serde(default)]
    pub initrd: Option<Spanned<String>>,
    /// ...and its command line (e.g. "root=/dev/vda console=ttyS0").
    #[serde(default)]
    pub append: Option<Spanned<String>>,
    /// The firmware that boots it: "bios" (SeaBIOS, the default); "uefi" is refused at its
    /// line, with why, until a backup carries the firmware's variable store.
    #[serde(default)]
    pub firmware: Option<Spanned<OwnFirmware>>,
    /// The paths above, resolved and checked when the scenario is loaded.
    #[serde(skip)]
    pub resolved: Resolved,
}

/// An own image's files, resolved against the scenario's folder and checked.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub path: PathBuf,
    /// The kernel and initrd, when the image boots from them (not its own bootloader).
    pub kernel: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OwnOs {
    Linux,
    Windows,
}

/// The firmware an own image boots by.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OwnFirmware {
    Bios,
    Uefi,
}

impl ImageSpec {
    /// The image the user brings, if it is one.
    pub fn own(&self) -> Option<&OwnImage> {
        match self {
            ImageSpec::Own(o) => Some(o.as_ref()),
            ImageSpec::Recipe(_) => None,
        }
    }

    /// Whether the VM runs Windows: the Windows recipe, or an own image said to.
    pub fn is_windows(&self) -> bool {
        match self {
            ImageSpec::Recipe(r) => r == super::windows::WINDOWS_IMAGE,
            ImageSpec::Own(o) => *o.os.get_ref() == OwnOs::Windows,
        }
    }
}

impl OwnImage {
    /// The format the image was declared (and found) in.
    pub fn disk_format(&self) -> DiskFormat {
        (*self.format.get_ref()).into()
    }
}

impl<'de> Deserialize<'de> for ImageSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ImageSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a recipe name (\"linux\", \"windows\") or a table { path = \"...\", format = \"qcow2\", os = \"linux\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ImageSpec, E> {
                Ok(ImageSpec::Recipe(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ImageSpec, A::Error> {
                OwnImage::deserialize(de::value::MapAccessDeserializer::new(map)).map(|o| ImageSpec::Own(Box::new(o)))
            }
        }
        d.deserialize_any(V)
    }
}

type Mistake = (Range<usize>, String);

/// Restore checks that need only the agent and the disks, which an own image still runs
/// (Linux); a Windows image of one's own runs only those read on the host.
const OWN_CHECKS: &[Check] = &[
    Check::DisksMatchBackup,
    Check::BlocksMatchBackup,
    Check::FsckClean,
    Check::ManifestMatchesBackup,
    Check::FsQuiesced,
    Check::AutoRecoverable,
    Check::SameBoot,
    Check::FilesMatchSeed,
    Check::RootFromBackup,
];
const OWN_WINDOWS_CHECKS: &[Check] = &[
    Check::DisksMatchBackup,
    Check::BlocksMatchBackup,
    Check::FsckClean,
    Check::ManifestMatchesBackup,
    Check::FsQuiesced,
];

/// Refuses, at its line, what a VM on an own image cannot run: quiesce's guest programs.
pub(super) fn check(f: &ScenarioFile) -> Result<(), Mistake> {
    for spanned in &f.vms {
        let vm = spanned.get_ref();
        let Some(own) = vm.image.get_ref().own() else { continue };
        let name = vm.name.get_ref();
        let needs = |what: &str| {
            format!(
                "VM {name} boots an image you bring, which does not have quiesce's guest programs: \
                 {what} cannot run there (remove it, or use image = \"linux\")"
            )
        };
        let w = &vm.workload;
        if *w.counter.get_ref() {
            return Err((w.counter.span(), needs("the counter workload")));
        }
        if let Some(j) = &w.journal {
            return Err((j.span(), needs("the journal workload")));
        }
        if let Some(a) = &w.app {
            return Err((a.span(), needs("the app workload (quiesce-app)")));
        }
        let windows = *own.os.get_ref() == OwnOs::Windows;
        if windows && vm.agent == AgentState::Stopped {
            return Err((spanned.span(), needs("agent = \"stopped\"")));
        }
        if windows && vm.disks.iter().any(|d| d.get_ref().filesystem != Filesystem::None) {
            let d = vm.disks.iter().find(|d| d.get_ref().filesystem != Filesystem::None).expect("found above");
            return Err((d.span(), needs("a data disk the guest mounts (the recipe's scripts do)")));
        }
        for fault in f.faults.iter().filter(|x| x.get_ref().vm.get_ref() == name) {
            if needs_guest_programs(fault.get_ref().kind) {
                return Err((fault.span(), needs(&format!("the fault {}", fault.get_ref().kind.name()))));
            }
        }
        if let Some(r) = &f.restore {
            let allowed = if windows { OWN_WINDOWS_CHECKS } else { OWN_CHECKS };
            if let Some(c) = r.checks.get_ref().iter().find(|c| !allowed.contains(c)) {
                return Err((r.checks.span(), needs(&format!("the check {}", c.name()))));
            }
        }
        if let Some(fw) = own.firmware.as_ref().filter(|f| *f.get_ref() == OwnFirmware::Uefi) {
            let msg = "firmware = \"uefi\" is not offered yet: a UEFI VM's variable store (OVMF_VARS, its boot \
                       entries) is guest state that neither backup method carries yet, so a restore could not \
                       boot as the VM did; give a BIOS-bootable image (firmware = \"bios\", the default)";
            return Err((fw.span(), msg.into()));
        }
        if own.kernel.is_some() != own.initrd.is_some() || (own.append.is_some() && own.kernel.is_none()) {
            let msg = "an image without a bootloader takes kernel and initrd (and append) together; \
                       an image with one takes none of them";
            return Err((spanned.span(), msg.into()));
        }
    }
    Ok(())
}

/// Faults made by quiesce's own guest programs or hooks.
fn needs_guest_programs(kind: FaultKind) -> bool {
    matches!(
        kind,
        FaultKind::AgentHangsInFreeze
            | FaultKind::AgentFreezeFails
            | FaultKind::AgentStopsAfterFreeze
            | FaultKind::SkipFreezeHooks
            | FaultKind::HoldPastVssLimit
            | FaultKind::VssProviderUnregistered
            | FaultKind::SnapshotVolumeFull
            | FaultKind::MergeDoesNotConverge
    )
}

/// Resolves each own image's paths against `dir` (the scenario's folder) and checks them:
/// regular files, and the image in the format declared, with no backing file of its own.
pub(super) fn resolve(f: &mut ScenarioFile, dir: &Path) -> Result<(), Mistake> {
    for vm in &mut f.vms {
        let vm = vm.get_mut();
        let ImageSpec::Own(own) = vm.image.get_mut() else { continue };
        let path = regular_file(dir, &own.path, "image")?;
        let info = crate::image::qemu_img::info(&path)
            .map_err(|e| (own.path.span(), format!("image {:?}: qemu-img cannot read it: {e}", own.path.get_ref())))?;
        let declared = own.disk_format().driver();
        let found = info.get("format").and_then(|v| v.as_str()).unwrap_or("unknown");
        if found != declared {
            let msg = format!("image {:?} is {found}, not {declared} as declared", own.path.get_ref());
            return Err((own.format.span(), msg));
        }
        if let Some(b) = info.get("backing-filename") {
            let msg = format!(
                "image {:?} has a backing file {b}: give a standalone image (qemu-img convert makes one)",
                own.path.get_ref()
            );
            return Err((own.path.span(), msg));
        }
        let kernel = match (&own.kernel, &own.initrd) {
            (Some(k), Some(i)) => Some((regular_file(dir, k, "kernel")?, regular_file(dir, i, "initrd")?)),
            _ => None,
        };
        own.resolved = Resolved { path, kernel };
    }
    Ok(())
}

/// `p` resolved against `dir`, if it names a regular file (after symlinks).
fn regular_file(dir: &Path, p: &Spanned<String>, what: &str) -> Result<PathBuf, Mistake> {
    let path = dir.join(p.get_ref());
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err((p.span(), format!("{what} {:?} is not a regular file", p.get_ref()))),
        Err(e) => Err((p.span(), format!("{what} {:?} ({}): {e}", p.get_ref(), path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::image::qemu_img;
    use crate::qemu::DiskFormat;

    /// A scenario at `dir/s.toml` with one VM on `image`, and `rest` after its table.
    fn parse(dir: &Path, image: &str, rest: &str) -> Result<super::super::Scenario, String> {
        let text = format!("description = \"o\"\n[[vm]]\nname = \"mine\"\nimage = {image}\n{rest}");
        super::super::parse(&dir.join("s.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn an_own_image_is_a_table_checked_at_its_line() {
        let tmp = tempfile::tempdir().unwrap();
        qemu_img::create(&tmp.path().join("disk.qcow2"), DiskFormat::Qcow2, 4 << 20).unwrap();
        qemu_img::create(&tmp.path().join("disk.raw"), DiskFormat::Raw, 4 << 20).unwrap();
        std::fs::create_dir(tmp.path().join("folder")).unwrap();
        let d = tmp.path();
        let s = parse(d, r#"{ path = "disk.qcow2", format = "qcow2", os = "linux" }"#, "[backup]\n").unwrap();
        let vm = s.vms().next().unwrap();
        let own = vm.image.get_ref().own().expect("an own image");
        assert_eq!(own.resolved.path, d.join("disk.qcow2"), "relative to the scenario's folder");
        assert!(own.resolved.kernel.is_none() && !vm.is_windows());
        let win = parse(d, r#"{ path = "disk.raw", format = "raw", os = "windows" }"#, "[backup]\n").unwrap();
        assert!(win.vms().next().unwrap().is_windows());
        // The string form is a recipe, as before.
        let recipe = parse(d, "\"linux\"", "[backup]\n").unwrap();
        assert!(recipe.vms().next().unwrap().image.get_ref().own().is_none());

        let err = |image: &str| parse(d, image, "[backup]\n").unwrap_err();
        let e = err(r#"{ path = "gone.qcow2", format = "qcow2", os = "linux" }"#);
        assert!(e.contains("s.toml:4:18: image \"gone.qcow2\"") && e.contains("No such file"), "{e}");
        let e = err(r#"{ path = "folder", format = "qcow2", os = "linux" }"#);
        assert!(e.contains("s.toml:4:18: image \"folder\" is not a regular file"), "{e}");
        let e = err(r#"{ path = "disk.raw", format = "qcow2", os = "linux" }"#);
        assert!(e.contains("s.toml:4:39: image \"disk.raw\" is raw, not qcow2 as declared"), "{e}");
        let e = err(r#"{ path = "disk.qcow2", format = "qcow2", os = "beos" }"#);
        assert!(e.contains("s.toml:4:55:") && e.contains("unknown variant `beos`"), "{e}");
        let e = err(r#"{ path = "disk.qcow2", format = "qcow3", os = "linux" }"#);
        assert!(e.contains("s.toml:4:41:") && e.contains("unknown variant `qcow3`"), "{e}");
        let e = err(r#"{ path = "disk.qcow2", format = "qcow2", os = "linux", kernel = "gone" }"#);
        assert!(e.contains("kernel and initrd (and append) together"), "{e}");
        let e = err(r#"{ path = "disk.qcow2", format = "qcow2", os = "linux", firmware = "uefi" }"#);
        assert!(e.contains("s.toml:4:75: firmware = \"uefi\" is not offered yet"), "{e}");
        let e = err(r#"{ path = "disk.qcow2", format = "qcow2", os = "linux", firmware = "coreboot" }"#);
        assert!(e.contains("s.toml:4:75:") && e.contains("unknown variant `coreboot`"), "{e}");
        parse(d, r#"{ path = "disk.qcow2", format = "qcow2", os = "linux", firmware = "bios" }"#, "[backup]\n")
            .unwrap();
        let e = err(r#"{ path = "disk.qcow2", os = "linux" }"#);
        assert!(e.contains("s.toml:4:9:") && e.contains("missing field `format`"), "{e}");
    }

    #[test]
    fn quiesce_guest_programs_are_refused_on_an_own_image_at_their_line() {
        let tmp = tempfile::tempdir().unwrap();
        qemu_img::create(&tmp.path().join("disk.qcow2"), DiskFormat::Qcow2, 4 << 20).unwrap();
        let own = r#"{ path = "disk.qcow2", format = "qcow2", os = "linux" }"#;
        let refused = |rest: &str| parse(tmp.path(), own, rest).unwrap_err();
        let e = refused("[vm.workload]\ncounter = true\n[backup]\n");
        assert!(e.contains("s.toml:6:11: VM mine boots an image you bring") && e.contains("counter workload"), "{e}");
        let disk = "[[vm.disk]]\nname = \"data\"\nformat = \"qcow2\"\nsize = \"16M\"\nfilesystem = \"ext4\"\n";
        let e = refused(&format!("{disk}[vm.workload]\napp = \"data\"\n[backup]\n"));
        assert!(e.contains("s.toml:11:7:") && e.contains("quiesce-app"), "{e}");
        let e = refused(&format!("{disk}[vm.workload]\njournal = \"data\"\n[backup]\n"));
        assert!(e.contains("s.toml:11:11:") && e.contains("journal workload"), "{e}");
        let e = refused("[backup]\n[[fault]]\nvm = \"mine\"\nkind = \"agent-hangs-in-freeze\"\n");
        assert!(e.contains("s.toml:6:1:") && e.contains("agent-hangs-in-freeze"), "{e}");
        let e = refused("[backup]\n[restore]\nchecks = [\"disks-match-backup\", \"app-consistent\"]\n");
        assert!(e.contains("s.toml:7:10:") && e.contains("the check app-consistent"), "{e}");
        // What needs only the agent and the disks runs.
        let ok = format!(
            "{disk}[backup]\n[restore]\nchecks = [\"same-boot\", \"blocks-match-backup\", \"manifest-matches-backup\"]\n\
             [[restore.manifest]]\ndisk = \"data\"\n"
        );
        parse(tmp.path(), own, &ok).unwrap();
    }
}
