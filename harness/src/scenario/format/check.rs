//! The checks a scenario file passes after it parsed: cross-references, ranges and
//! combinations serde cannot see. Each mistake comes back with the span it was written at,
//! so that it is reported as `file:line:column`.

use std::ops::Range;

use super::own::ImageSpec;
use super::spec::*;

pub(super) fn check(f: &ScenarioFile) -> Result<(), (Range<usize>, String)> {
    let known: Vec<&str> = crate::image::recipe::RECIPES.iter().map(|(n, _)| *n).collect();
    let backup = match (&f.backup, &f.rollback) {
        (Some(b), _) => b,
        // Rollback cycles take their methods from [rollback]: there, [backup] is optional.
        (None, Some(_)) => &BackupSpec::DEFAULT,
        (None, None) => {
            let msg = "missing table [backup]: a scenario says how it backs up (only rollback scenarios, whose \
                       methods are in [rollback], go without one)";
            return Err((0..0, msg.into()));
        }
    };
    if let Some(d) = &backup.snapshot_dir {
        if !d.get_ref().starts_with('/') {
            return Err((d.span(), format!("snapshot_dir {:?}: expected an absolute path", d.get_ref())));
        }
    }
    super::windows::check(f)?;
    super::own::check(f)?;
    if let Some(d) = &backup.freeze_deadline_ms {
        // A Windows guest's VSS freeze may take far longer than its 10 s hold (see windows.rs).
        let max = super::windows::max_freeze_deadline_ms(f);
        if !(100..=max).contains(d.get_ref()) {
            return Err((
                d.span(),
                format!("freeze_deadline_ms = {}: expected 100 to {max} (VSS's hold limit is 10 s)", d.get_ref()),
            ));
        }
    }
    for fault in &f.faults {
        let fs = fault.get_ref();
        let vm = fs.vm.get_ref();
        let Some(spec) = f.vms.iter().map(|v| v.get_ref()).find(|v| v.name.get_ref() == vm) else {
            return Err((fs.vm.span(), format!("fault on VM {vm:?}, which the scenario does not declare")));
        };
        match (fs.kind.on_restored_file(), &fs.disk, &fs.path) {
            (true, Some(disk), Some(path)) => {
                let d = spec.disks.iter().map(|d| d.get_ref()).find(|d| d.name.get_ref() == disk.get_ref());
                if d.is_none_or(|d| d.filesystem == Filesystem::None) {
                    return Err((
                        disk.span(),
                        format!("disk {:?} is not a data disk with a filesystem of VM {vm}", disk.get_ref()),
                    ));
                }
                if !path.get_ref().starts_with('/') {
                    return Err((
                        path.span(),
                        format!("path {:?}: expected an absolute path in the disk's filesystem", path.get_ref()),
                    ));
                }
            }
            (true, _, _) => return Err((fault.span(), "this fault needs disk = \"...\" and path = \"/...\"".into())),
            (false, Some(x), _) => return Err((x.span(), "only faults on a restored file take a disk".into())),
            (false, _, Some(x)) => return Err((x.span(), "only faults on a restored file take a path".into())),
            (false, None, None) => {}
        }
    }
    if let Some(r) = &f.restore {
        for m in &r.manifests {
            let m = m.get_ref();
            let disk = m.disk.get_ref();
            let has = |v: &VmSpec| disk == "root" || v.disks.iter().any(|d| d.get_ref().name.get_ref() == disk);
            if let Some(vm) = &m.vm {
                match f.vms.iter().find(|v| v.get_ref().name.get_ref() == vm.get_ref()) {
                    None => return Err((vm.span(), format!("no VM is named {:?}", vm.get_ref()))),
                    Some(v) if !has(v.get_ref()) => {
                        return Err((m.disk.span(), format!("VM {:?} has no disk {disk:?}", vm.get_ref())))
                    }
                    Some(_) => {}
                }
            }
            if !f.vms.iter().any(|v| has(v.get_ref())) {
                return Err((m.disk.span(), format!("no VM has a disk {disk:?}")));
            }
        }
        if !r.manifests.is_empty() && !r.checks.get_ref().contains(&Check::ManifestMatchesBackup) {
            return Err((
                r.manifests[0].span(),
                "[[restore.manifest]] needs the check \"manifest-matches-backup\"".into(),
            ));
        }
        // Without something to compare or to corrupt, these would pass having checked nothing.
        if r.manifests.is_empty() && r.checks.get_ref().contains(&Check::ManifestMatchesBackup) {
            let msg = "the check \"manifest-matches-backup\" needs a [[restore.manifest]] naming a disk to compare";
            return Err((r.checks.span(), msg.into()));
        }
        let corrupts = f.faults.iter().any(|x| x.get_ref().kind.on_restored_file());
        let defeats = f.faults.iter().find(|x| !x.get_ref().kind.defeats().is_empty());
        if r.expect == RestoreExpect::Mismatch && !corrupts && defeats.is_none() {
            let msg = "expect = \"mismatch\" needs a fault on a restored file (flip-byte-in-restore, \
                       truncate-in-restore) or one that defeats a check (skip-freeze, skip-freeze-hooks)";
            return Err((r.checks.span(), msg.into()));
        }
        if corrupts && r.expect != RestoreExpect::Mismatch {
            let msg = "a fault on a restored file makes the restore differ: set expect = \"mismatch\"";
            return Err((r.checks.span(), msg.into()));
        }
        if let Some(fault) = defeats {
            let kind = fault.get_ref().kind;
            if r.expect != RestoreExpect::Mismatch {
                let msg = format!("{} makes checks fail: set expect = \"mismatch\"", kind.name());
                return Err((r.checks.span(), msg));
            }
            // Without one of the checks it defeats, the scenario would pass having proved nothing.
            if !kind.defeats().iter().any(|c| r.checks.get_ref().contains(c)) {
                let names: Vec<&str> = kind.defeats().iter().map(|c| c.name()).collect();
                let msg = format!("{} is there to make checks fail: list at least one of {names:?}", kind.name());
                return Err((r.checks.span(), msg));
            }
            if backup.method() != MethodChoice::ChildSnapshot {
                let msg = format!("{} is a fault of Child VM Snapshot: set method = \"child-snapshot\"", kind.name());
                return Err((fault.span(), msg));
            }
        }
    }
    if let Some(rb) = &f.rollback {
        let spec = rb.get_ref();
        if f.vms.len() != 1 || !f.faults.is_empty() || backup.expect != Expect::Success {
            return Err((rb.span(), "rollback cycles take one VM, no faults and a backup expected to succeed".into()));
        }
        if let Some(m) = &backup.method {
            let msg = "rollback cycles take their methods from [rollback] methods; remove this one";
            return Err((m.span(), msg.into()));
        }
        if !(1..=20).contains(spec.cycles.get_ref()) {
            return Err((spec.cycles.span(), format!("cycles = {}: expected 1 to 20", spec.cycles.get_ref())));
        }
        if spec.methods.get_ref().is_empty() || spec.methods.get_ref().contains(&MethodChoice::Auto) {
            return Err((spec.methods.span(), "methods: expected \"child-snapshot\" and/or \"saved-state\"".into()));
        }
        let vm = f.vms[0].get_ref();
        if vm.state != VmState::Running || vm.agent != AgentState::Running {
            let msg =
                "rollback cycles change the guest's data through its agent: the VM must be running, with its agent";
            return Err((f.vms[0].span(), msg.into()));
        }
        let d = vm.disks.iter().map(|d| d.get_ref()).find(|d| d.name.get_ref() == spec.disk.get_ref());
        // A Windows guest's data disk is NTFS (windows.rs).
        let fs_ok =
            |d: &DiskSpec| d.filesystem == Filesystem::Ext4 || (vm.is_windows() && d.filesystem == Filesystem::Ntfs);
        let Some(d) = d.filter(|d| fs_ok(d) && d.mount) else {
            let msg =
                format!("disk {:?} is not a mounted ext4 data disk of VM {}", spec.disk.get_ref(), vm.name.get_ref());
            return Err((spec.disk.span(), msg));
        };
        // Each cycle changes one seeded file and removes another.
        let kept = d.files.keys().filter(|p| !crate::image::manifest::ignored(&format!("/{p}"), &spec.ignore)).count();
        if kept < 2 {
            let msg = format!(
                "disk {:?} needs two or more seeded files that are not ignored: each cycle changes one and removes another",
                spec.disk.get_ref()
            );
            return Err((spec.disk.span(), msg));
        }
    }
    if f.vms.is_empty() {
        return Err((0..0, "a scenario needs at least one [[vm]]".into()));
    }
    let mut vm_names = Vec::new();
    for vm in &f.vms {
        let vm = vm.get_ref();
        let name = vm.name.get_ref();
        if !valid_name(name) {
            return Err((vm.name.span(), format!("VM name {name:?}: use letters, digits and '-' only")));
        }
        if vm_names.contains(name) {
            return Err((vm.name.span(), format!("VM name {name:?} is used twice")));
        }
        vm_names.push(name.clone());
        if let ImageSpec::Recipe(recipe) = vm.image.get_ref() {
            if !known.contains(&recipe.as_str()) {
                return Err((vm.image.span(), format!("no guest image recipe {recipe:?}; expected one of {known:?}")));
            }
        }
        let mem = *vm.memory_mib.get_ref();
        if !(128..=16384).contains(&mem) {
            return Err((vm.memory_mib.span(), format!("memory_mib = {mem}: expected 128 to 16384")));
        }
        let mut disk_names = vec!["root".to_owned()];
        for spanned in &vm.disks {
            let d = spanned.get_ref();
            let dn = d.name.get_ref();
            if !valid_name(dn) {
                return Err((d.name.span(), format!("disk name {dn:?}: use letters, digits and '-' only")));
            }
            if disk_names.contains(dn) {
                return Err((
                    d.name.span(),
                    format!("disk name {dn:?} is used twice in VM {name} (\"root\" is the boot disk)"),
                ));
            }
            disk_names.push(dn.clone());
            let size = parse_size(d.size.get_ref()).map_err(|e| (d.size.span(), e.to_string()))?;
            if !(MIN_DISK..=MAX_DISK).contains(&size) {
                return Err((
                    d.size.span(),
                    format!("size {:?} is impossible here: expected 4M to 64G", d.size.get_ref()),
                ));
            }
            if d.partition != Partitioning::None && d.filesystem != Filesystem::None {
                return Err((
                    spanned.span(),
                    format!("disk {dn}: a partition table goes on a disk without a filesystem"),
                ));
            }
            if !d.files.is_empty() && d.filesystem == Filesystem::Vfat {
                return Err((spanned.span(), format!("disk {dn}: seeding files is supported on ext4 and ntfs only")));
            }
            if d.filesystem == Filesystem::Ntfs && d.files.keys().any(|p| p.contains('/')) {
                // ntfs-3g makes folders only through FUSE, which needs root.
                return Err((spanned.span(), format!("disk {dn}: NTFS seeds take files at the top level only")));
            }
            if !d.files.is_empty() && d.filesystem == Filesystem::None {
                let msg = format!("disk {dn} seeds files but has no filesystem; set filesystem = \"ext4\"");
                return Err((spanned.span(), msg));
            }
            for path in d.files.keys() {
                if path.starts_with('/') || path.split('/').any(|c| c == ".." || c.is_empty()) {
                    return Err((spanned.span(), format!("seed path {path:?}: expected a relative path without '..'")));
                }
            }
        }
        for (what, target) in [("journal", &vm.workload.journal), ("app", &vm.workload.app)] {
            let Some(j) = target else { continue };
            if what == "app" && j.get_ref() == "root" {
                continue;
            }
            let disk = vm.disks.iter().map(|d| d.get_ref()).find(|d| d.name.get_ref() == j.get_ref());
            match disk {
                None => return Err((j.span(), format!("{what} disk {:?} is not a disk of VM {name}", j.get_ref()))),
                // The journal appends lines, which any filesystem the guest writes can hold;
                // the app's sqlite store is kept to ext4, a Windows VM's SQL Server to NTFS.
                Some(d) if what == "app" && d.filesystem != app_fs(vm) => {
                    let fs = if vm.is_windows() { "ntfs" } else { "ext4" };
                    return Err((j.span(), format!("app disk {:?} has no {fs} filesystem", j.get_ref())));
                }
                Some(d) if d.filesystem == Filesystem::None || d.filesystem == Filesystem::Vfat || !d.mount => {
                    return Err((
                        j.span(),
                        format!("{what} disk {:?} has no mounted ext4 or ntfs filesystem", j.get_ref()),
                    ))
                }
                Some(_) => {}
            }
        }
        if vm.agent == AgentState::Stopped {
            let guest_side =
                *vm.workload.counter.get_ref() || vm.workload.journal.is_some() || vm.workload.app.is_some();
            let guest_checks = f.restore.as_ref().is_some_and(|r| {
                r.checks.get_ref().iter().any(|c| *c != Check::DisksMatchBackup && *c != Check::FsckClean)
            });
            if guest_side || guest_checks {
                return Err((vm.name.span(), format!("VM {name} has agent = \"stopped\", so it can have no workload and only disks-match-backup and fsck-clean checks")));
            }
        }
    }
    Ok(())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The filesystem an app's data disk must hold: ext4 for the Linux guest's sqlite store,
/// NTFS for the Windows guest's SQL Server.
fn app_fs(vm: &VmSpec) -> Filesystem {
    if vm.is_windows() {
        Filesystem::Ntfs
    } else {
        Filesystem::Ext4
    }
}
