//! Restoring each VM from the backup, and checking the restore, in the order the proofs
//! need: the backup's own disks on the host (fsck) and their backup point (manifests), then
//! the restore itself, the faults that corrupt it, the block checks while no guest has run,
//! the resume or boot, the checks inside the guest (`guest.rs`), and last, with the guest
//! shut down cleanly, the restored files against the backup point.

mod guest;
mod quiesced;

use super::super::format::{AgentState, Check, FaultKind, ImageSpec, ManifestSpec, RestoreExpect, RestoreSpec};
use super::super::report::RestoreReport;
use super::ctx::{label, RunCtx, Vm};
use super::disk_checks::{self, Pair, Point};
use super::error::{on, At, DiskPlace, RunError};
use crate::backup::{runstate, Backup, Method, VmBackup};
use crate::image::{fsck, qemu_img};
use crate::qemu::DiskFormat;
use crate::verify::{corrupt, restore, RestoreError, RestoreOptions, Restored};

/// One VM's restore while it is checked: what it is restored from, and what is asked of it.
struct Restoring<'a> {
    vm: &'a Vm,
    backup: &'a Backup,
    vb: VmBackup,
    spec: &'a RestoreSpec,
}

/// A file a fault corrupted in the restored disk: the verification must name it.
struct Corruption {
    disk: String,
    path: String,
    /// Where the byte was flipped in the disk, for a flip under the filesystem; a
    /// truncation in the guest has no single offset.
    flipped_at: Option<u64>,
}

/// Restores VM `vm` from `backup` and runs the scenario's checks on it.
pub(super) async fn restore_and_check(
    ctx: &mut RunCtx<'_>,
    vm: &Vm,
    backup: &Backup,
    spec: &RestoreSpec,
) -> Result<(), RunError> {
    let vb = backup
        .vm(vm.name())
        .ok_or_else(|| RunError::VmNotBackedUp { at: At::run("restoring"), vm: vm.name().to_owned() })?
        .clone();
    let r = Restoring { vm, backup, vb, spec };
    r.fsck_backup(ctx)?;
    let facts = quiesced::host_checks(ctx, &r).await?;
    r.restore_and_look(ctx, &facts).await?;
    // With the restored VM gone: a Saved State backup's disks booted on their own.
    if quiesced::wants_disks_alone(&r) {
        quiesced::boot_disks_alone(ctx, &r).await?;
    }
    quiesced::defeated_checks_ran(ctx, vm);
    Ok(())
}

impl Restoring<'_> {
    fn name(&self) -> &str {
        self.vm.name()
    }

    /// The restore itself and the checks on it: blocks before the guest runs, the guest's
    /// own, then the files once it is shut down. The restored VM ends with this call.
    async fn restore_and_look(&self, ctx: &mut RunCtx<'_>, facts: &quiesced::HostFacts) -> Result<(), RunError> {
        let points = self.backup_points(ctx).await?;
        let mut restored = self.restore(ctx).await?;
        let mut corrupted = self.flip_bytes(ctx, &restored).await?;
        self.block_checks(ctx, &restored, &corrupted).await?;
        self.run(ctx, &mut restored).await?;
        if self.vm.spec.agent == AgentState::Stopped {
            return Ok(());
        }
        let truncated = guest::checks(ctx, self, facts, &restored).await?;
        corrupted.extend(truncated.into_iter().map(|(disk, path)| Corruption { disk, path, flipped_at: None }));
        if points.is_empty() {
            return Ok(());
        }
        self.compare_manifests(ctx, &mut restored, &points, &corrupted).await
    }

    fn checks(&self) -> &[Check] {
        self.spec.checks.get_ref()
    }

    fn wants(&self, check: Check) -> bool {
        self.checks().contains(&check)
    }

    /// `e2fsck -fn` of the backup's ext4 disks, read on the host. A saved state's disks are
    /// crash-consistent by design; fsck is the proof for frozen ones.
    fn fsck_backup(&self, ctx: &mut RunCtx<'_>) -> Result<(), RunError> {
        if !self.wants(Check::FsckClean) || self.vb.method != Method::ChildSnapshot {
            return Ok(());
        }
        // A recipe's root disk is a bare ext4 filesystem, and so are data disks seeded as
        // ext4. The root of an image the user brings has a layout quiesce does not know
        // (usually a partition table), so e2fsck of the whole disk would prove nothing.
        let own_root = matches!(self.vm.spec.image.get_ref(), ImageSpec::Own(_));
        let mut ext4 = if own_root { vec![] } else { vec!["root".to_owned()] };
        ext4.extend(self.vm.ext4_disks());
        let vb = &self.vb;
        let mut bad = Vec::new();
        for d in vb.disks.iter().filter(|d| ext4.contains(&d.node_name)) {
            let r = fsck::ext4(&self.backup.vm_dir(&vb.name).join(&d.file), d.format)
                .map_err(on(self.name(), "e2fsck of a backed-up disk"))?;
            if !r.clean {
                bad.push(format!("{} (exit {}): {}", d.node_name, r.exit_code, r.tail));
            }
        }
        let mut detail = if bad.is_empty() { format!("{} ext4 disks clean", ext4.len()) } else { bad.join("; ") };
        if own_root {
            detail.push_str(" (root not checked: an image you bring has its own layout)");
        }
        ctx.report.check(&vb.name, "fsck-clean", bad.is_empty(), detail);
        Ok(())
    }

    /// The backup point of each disk whose files the scenario compares, read from the
    /// backup's images (none if it compares none).
    async fn backup_points(&self, ctx: &RunCtx<'_>) -> Result<Vec<Point>, RunError> {
        if !self.wants(Check::ManifestMatchesBackup) {
            return Ok(vec![]);
        }
        let name = self.name();
        let wanted: Vec<&ManifestSpec> = self
            .spec
            .manifests
            .iter()
            .map(|m| m.get_ref())
            .filter(|m| m.applies_to(name))
            .filter(|m| m.disk.get_ref() == "root" || self.vm.spec.disks.iter().any(|d| d.get_ref().name == m.disk))
            .collect();
        ctx.tl
            .step(Some(name), "read the backup point's manifests", async {
                disk_checks::backup_points(self.backup, &self.vb, &wanted).await
            })
            .await
    }

    /// Restores the VM to a new machine, left stopped so that it can be looked at first.
    async fn restore(&self, ctx: &RunCtx<'_>) -> Result<Restored, RunError> {
        let name = self.name();
        let mut ro = RestoreOptions::named(&format!("{name}-restored"));
        ro.artifacts_dir = ctx.opts.artifacts_dir.clone();
        ro.resume = false;
        match self.vb.method {
            Method::SavedState => restore::saved_state(self.backup, name, &ro, ctx.tl).await,
            Method::ChildSnapshot => restore::boot(self.backup, name, &ro, ctx.tl).await,
        }
        .map_err(on(name, "restore"))
    }

    /// The faults on the restored image itself, before its guest runs: a byte of a file's
    /// data flipped under the filesystem.
    async fn flip_bytes(&self, ctx: &RunCtx<'_>, restored: &Restored) -> Result<Vec<Corruption>, RunError> {
        let name = self.name();
        let mut flipped = Vec::new();
        for f in ctx.s.faults(name, FaultKind::FlipByteInRestore) {
            let (disk, path) = f.file();
            let at = || At::vm(name, "locating the file to corrupt");
            let d = self.vb.disks.iter().find(|d| d.node_name == disk).ok_or_else(|| RunError::NoDisk {
                at: at(),
                place: DiskPlace::Backup,
                disk: disk.clone(),
            })?;
            let image = self.backup.vm_dir(name).join(&d.file);
            let (offset, byte) =
                corrupt::locate_ext4(&image, d.format, &path).map_err(on(name, "locating the file to corrupt"))?;
            ctx.tl
                .step(Some(restored.machine.name()), "flip a byte in the restored image", async {
                    corrupt::write_byte(&restored.machine, &disk, offset, byte ^ 0x01).await
                })
                .await
                .map_err(on(name, "corrupting the restored image"))?;
            flipped.push(Corruption { disk, path, flipped_at: Some(offset) });
        }
        Ok(flipped)
    }

    /// The restored disks against the backup's, before the guest runs: through `qemu-img
    /// compare` (the restore's wiring), and block by block (a difference names its offset;
    /// with a flipped byte, the first difference must be exactly there).
    async fn block_checks(
        &self,
        ctx: &mut RunCtx<'_>,
        restored: &Restored,
        flipped: &[Corruption],
    ) -> Result<(), RunError> {
        let name = self.name();
        let at = || At::vm(name, "comparing a restored disk");
        let overlay =
            |disk: &str| restored.disks.iter().find(|(n, _)| n == disk).map(|(_, p)| (p.clone(), DiskFormat::Qcow2));
        let pairs = Pair::of(self.backup, &self.vb, at, overlay)?;
        if self.wants(Check::DisksMatchBackup) {
            let mut all = true;
            for p in &pairs {
                let (a, af) = &p.restored;
                let (b, bf) = &p.backup;
                all &= qemu_img::identical(a, *af, b, *bf).map_err(on(name, "comparing a restored disk"))?;
            }
            let detail = format!("{} disks compared before the guest ran", pairs.len());
            ctx.report.check(name, "disks-match-backup", all, detail);
        }
        if !self.wants(Check::BlocksMatchBackup) {
            return Ok(());
        }
        let results = ctx
            .tl
            .step(
                Some(name),
                "compare blocks with the backup",
                disk_checks::compare_blocks(pairs, At::vm(name, "comparing blocks with the backup")),
            )
            .await?;
        let differ: Vec<String> =
            results.iter().filter(|(_, c)| !c.identical).map(|(d, c)| format!("{d}: {c}")).collect();
        if self.spec.expect == RestoreExpect::Mismatch {
            // Each flipped byte is the first difference of its disk, at its exact offset.
            let offsets: Vec<u64> = flipped.iter().filter_map(|f| f.flipped_at).collect();
            let found = flipped.iter().all(|f| {
                results
                    .iter()
                    .any(|(d, c)| *d == f.disk && f.flipped_at.is_some() && c.first_difference == f.flipped_at)
            });
            let detail = format!("flipped at {offsets:?}; found: {differ:?}");
            ctx.report.check(name, "blocks-name-the-flipped-byte", found && !flipped.is_empty(), detail);
        } else {
            let detail = if differ.is_empty() {
                format!("{} disks identical to the backup, allocated data compared", results.len())
            } else {
                differ.join("; ")
            };
            ctx.report.check(name, "blocks-match-backup", differ.is_empty(), detail);
        }
        Ok(())
    }

    /// Runs the restored VM: resumes a saved state that was running (one that was paused
    /// stays paused, and is continued only to look inside it), or boots a disk-only restore
    /// until its agent answers. Checks the state it came back in.
    async fn run(&self, ctx: &mut RunCtx<'_>, restored: &mut Restored) -> Result<(), RunError> {
        let name = self.name();
        let m = &mut restored.machine;
        let rname = m.name().to_owned();
        let state_after_restore = match self.vb.method {
            Method::SavedState if self.vm.spec.state == super::super::format::VmState::Running => {
                ctx.tl.step(Some(&rname), "resume", restore::resume(m)).await.map_err(on(&rname, "resume"))?;
                runstate::query(m).await.map_err(on(&rname, "query-status"))?.label().to_owned()
            }
            Method::SavedState => {
                let label = runstate::query(m).await.map_err(on(&rname, "query-status"))?.label().to_owned();
                restore::resume(m).await.map_err(on(&rname, "resume for checks"))?;
                label
            }
            Method::ChildSnapshot if self.vm.spec.is_windows() => {
                ctx.tl.step(Some(&rname), "boot", super::windows::boot_restored(m)).await?;
                "booted".to_owned()
            }
            Method::ChildSnapshot => {
                ctx.tl
                    .step(Some(&rname), "boot", async {
                        restore::resume(m).await?;
                        m.wait_agent(crate::sys::deadline::boot_to_agent())
                            .await
                            .map_err(|error| RestoreError::Machine { vm: name.to_owned(), step: "boot".into(), error })
                    })
                    .await
                    .map_err(on(&rname, "booting the restored VM"))?;
                "booted".to_owned()
            }
        };
        let want = match self.vb.method {
            Method::SavedState => label(self.vm.spec.state),
            Method::ChildSnapshot => "booted",
        };
        let detail = format!("{state_after_restore} after restore");
        ctx.report.check(name, "state-after-restore", state_after_restore == want, detail);
        ctx.report.restores.push(RestoreReport {
            vm: name.to_owned(),
            state_after_restore,
            restore_ms: restored.restore_ms,
        });
        Ok(())
    }

    /// The restored files against the backup point, read once the guest is down and its
    /// filesystems are clean. With corrupted files, each must be named among the
    /// differences; without, there must be none.
    async fn compare_manifests(
        &self,
        ctx: &mut RunCtx<'_>,
        restored: &mut Restored,
        points: &[Point],
        corrupted: &[Corruption],
    ) -> Result<(), RunError> {
        let name = self.name();
        let m = &mut restored.machine;
        let rname = m.name().to_owned();
        ctx.tl
            .step(Some(&rname), "shut down", m.shutdown(crate::sys::deadline::GUEST_SHUTDOWN))
            .await
            .map_err(on(&rname, "shutting the restored VM down"))?;
        let report = &mut *ctx.report;
        let diffs = ctx
            .tl
            .step(Some(name), "compare manifests with the backup point", async {
                disk_checks::compare_manifests(name, points, &restored.disks, report).await
            })
            .await?;
        if self.spec.expect == RestoreExpect::Mismatch {
            for c in corrupted {
                let named = diffs.iter().any(|(d, lines)| {
                    *d == c.disk && lines.iter().any(|l| l.split_whitespace().nth(1) == Some(c.path.as_str()))
                });
                let check = format!("manifest-names {}:{}", c.disk, c.path);
                ctx.report.check(name, &check, named, "the corrupted file is named");
            }
        } else {
            for (disk, lines) in &diffs {
                let detail = if lines.is_empty() { "same files as the backup point".into() } else { lines.join("; ") };
                ctx.report.check(name, &format!("manifest-matches-backup {disk}"), lines.is_empty(), detail);
            }
        }
        Ok(())
    }
}
