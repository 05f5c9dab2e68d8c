//! What a virtio-win ISO must hold for the chosen Windows: a driver folder for each device
//! the guest has (`viostor|vioscsi|NetKVM|vioserial/<os>/amd64`, each with its .inf), and
//! the two installers the first logon runs. Pure over the ISO's listing.

use std::path::Path;

use super::iso::{self, IsoEntry};
use super::{VirtioOs, WindowsImageError};

/// The driver folders: the disk (viostor, needed by Setup itself), SCSI, network and the
/// virtio-serial port qemu-ga talks through.
pub const DRIVERS: [&str; 4] = ["viostor", "vioscsi", "NetKVM", "vioserial"];
/// The guest tools' installer and qemu-ga's (with its VSS provider).
pub const INSTALLERS: [&str; 2] = ["virtio-win-gt-x64.msi", "guest-agent/qemu-ga-x86_64.msi"];

/// Checks the listing of the virtio-win ISO at `path` for `os`.
pub fn check(path: &Path, entries: &[IsoEntry], os: VirtioOs) -> Result<(), WindowsImageError> {
    let lower = |s: &str| s.to_ascii_lowercase();
    let has_driver_root = |d: &str| entries.iter().any(|e| lower(&e.path).starts_with(&format!("{}/", lower(d))));
    if !DRIVERS.iter().any(|d| has_driver_root(d)) {
        return Err(WindowsImageError::NotVirtioWin { path: path.to_owned() });
    }
    let missing: Vec<String> = DRIVERS
        .iter()
        .map(|d| format!("{d}/{}/amd64", os.dir()))
        .filter(|dir| {
            let prefix = format!("{}/", lower(dir));
            !entries.iter().any(|e| !e.dir && lower(&e.path).starts_with(&prefix) && lower(&e.path).ends_with(".inf"))
        })
        .collect();
    if !missing.is_empty() {
        return Err(WindowsImageError::NoDriversFor { path: path.to_owned(), os, missing: missing.join(", ") });
    }
    let missing: Vec<&str> = INSTALLERS.iter().copied().filter(|f| iso::find(entries, f).is_none()).collect();
    if !missing.is_empty() {
        return Err(WindowsImageError::VirtioIncomplete { path: path.to_owned(), missing: missing.join(", ") });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str) -> IsoEntry {
        IsoEntry { path: p.into(), dir: false }
    }

    fn tree(os: &str) -> Vec<IsoEntry> {
        let mut v: Vec<IsoEntry> =
            DRIVERS.iter().map(|d| file(&format!("{d}/{os}/amd64/{}.inf", d.to_lowercase()))).collect();
        v.extend(INSTALLERS.iter().map(|f| file(f)));
        v
    }

    #[test]
    fn drivers_and_installers_are_required() {
        let p = Path::new("virtio-win.iso");
        check(p, &tree("2k22"), VirtioOs::Server2022).unwrap();
        let err = check(p, &tree("2k19"), VirtioOs::Server2022).unwrap_err().to_string();
        assert!(err.contains("no virtio-win drivers for Windows Server 2022 (2k22)"), "{err}");
        assert!(
            err.contains("viostor/2k22/amd64, vioscsi/2k22/amd64, NetKVM/2k22/amd64, vioserial/2k22/amd64"),
            "{err}"
        );
        let mut no_ga = tree("2k22");
        no_ga.pop();
        assert!(check(p, &no_ga, VirtioOs::Server2022).unwrap_err().to_string().contains("qemu-ga-x86_64.msi"));
        let err = check(p, &[file("README.TXT")], VirtioOs::Server2022).unwrap_err();
        assert!(matches!(err, WindowsImageError::NotVirtioWin { .. }), "{err}");
    }
}
