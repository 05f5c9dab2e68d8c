//! The scenario file format (`scenarios/*.toml`): plain structs, deserialized with serde,
//! then checked. Every mistake, whether TOML syntax, an unknown key, a wrong type or an
//! impossible value, is reported as `file:line:column: what is wrong, what was expected`,
//! before anything is booted.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use crate::backup::job::MethodChoice;
pub use crate::image::seed::{Filesystem, Partitioning};
use crate::qemu::DiskFormat;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub description: String,
    #[serde(rename = "vm")]
    pub vms: Vec<Spanned<VmSpec>>,
    pub backup: BackupSpec,
    #[serde(default)]
    pub restore: Option<RestoreSpec>,
    /// Faults to inject, by real mechanisms, at named points.
    #[serde(default, rename = "fault")]
    pub faults: Vec<Spanned<FaultSpec>>,
    /// Backup, mutate, restore and verify, over and over (instead of one backup).
    #[serde(default)]
    pub rollback: Option<Spanned<RollbackSpec>>,
}

/// Rollback cycles: each backs the VM up (the methods taken in turn), changes the guest's
/// data, restores the backup to a new VM and then in place onto the VM's own disks, and
/// verifies both against the backup point. The VM runs on from the in-place restore.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackSpec {
    pub cycles: Spanned<u32>,
    /// The methods, one per cycle in turn ("child-snapshot", "saved-state").
    pub methods: Spanned<Vec<MethodChoice>>,
    /// The data disk the cycles change and verify (ext4).
    pub disk: Spanned<String>,
    /// Paths left out of the comparison with the backup point (volatile files).
    #[serde(default)]
    pub ignore: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub vm: Spanned<String>,
    pub kind: FaultKind,
    /// For faults on a file of a restored disk: the disk...
    #[serde(default)]
    pub disk: Option<Spanned<String>>,
    /// ...and the file's path in its filesystem (absolute).
    #[serde(default)]
    pub path: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The snapshot transaction asks QEMU for an overlay at a path that cannot be created.
    TransactionFails,
    /// The saved state goes to a target folder that does not exist, so `migrate` fails.
    SaveFails,
    /// A freeze hook in the guest outlasts the freeze deadline (the agent hangs in freeze).
    AgentHangsInFreeze,
    /// The run is interrupted right after the guest is frozen (as SIGINT would).
    InterruptAfterFreeze,
    /// The harness process gets a real SIGINT right after the guest is frozen (CLI only).
    SigintAfterFreeze,
    /// QEMU is killed between PrepareForSnapshot and PostSnapshot.
    QemuKilledAfterPrepare,
    /// The backup is written to a small tmpfs that fills up during the copy (needs root
    /// to mount it).
    BackupTargetFull,
    /// A freeze hook in the guest fails (a VSS writer's veto): guest-fsfreeze-freeze
    /// returns the agent's error.
    AgentFreezeFails,
    /// The guest agent stops answering right after it froze the guest (SIGSTOP from inside
    /// the guest), for longer than the thaw may wait: the thaw times out.
    AgentStopsAfterFreeze,
    /// One byte of a file's data is flipped in the restored disk, under the filesystem
    /// (`disk` and `path` name the file). The verification must name it.
    FlipByteInRestore,
    /// A file is truncated to half its size in the restored guest (`disk`, `path`).
    TruncateInRestore,
}

impl FaultKind {
    /// Faults on a restored file, which need `disk` and `path`.
    pub fn on_restored_file(self) -> bool {
        matches!(self, FaultKind::FlipByteInRestore | FaultKind::TruncateInRestore)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: Spanned<String>,
    /// A guest image recipe under guest-images/.
    #[serde(default = "default_image")]
    pub image: Spanned<String>,
    #[serde(default = "default_memory")]
    pub memory_mib: Spanned<u32>,
    /// What the VM is doing when the backup begins.
    #[serde(default)]
    pub state: VmState,
    #[serde(default)]
    pub workload: WorkloadSpec,
    /// The guest agent: "running", or "stopped" (SIGSTOP before the backup: installed but
    /// not answering, as a hung integration service).
    #[serde(default)]
    pub agent: AgentState,
    #[serde(default, rename = "disk")]
    pub disks: Vec<Spanned<DiskSpec>>,
}

fn default_image() -> Spanned<String> {
    Spanned::new(0..0, "linux".to_owned())
}

fn default_memory() -> Spanned<u32> {
    Spanned::new(0..0, 256)
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    #[default]
    Running,
    Paused,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    #[default]
    Running,
    Stopped,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// A counter in guest RAM; a restored saved state continues it.
    #[serde(default)]
    pub counter: bool,
    /// The name of a data disk to append a sequence-number journal to, throughout.
    #[serde(default)]
    pub journal: Option<Spanned<String>>,
    /// The name of a disk to run the guest's transactional app (`quiesce-app`) on: an ext4
    /// data disk, or "root" for the root filesystem.
    #[serde(default)]
    pub app: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub name: Spanned<String>,
    pub format: DiskFormatSpec,
    /// With a unit: "64M", "1G", "512K", or plain bytes.
    pub size: Spanned<String>,
    #[serde(default)]
    pub filesystem: Filesystem,
    /// Files to seed (path inside the filesystem = content).
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// A partition table on an otherwise blank disk ("mbr-dynamic": a Windows dynamic disk).
    #[serde(default)]
    pub partition: Partitioning,
    /// How the disk reaches the VM: "local" (an image file), or "iscsi" (declared an iSCSI
    /// LUN: the host's writer cannot see it, so it is excluded from the backup).
    #[serde(default)]
    pub attach: Attach,
    /// Whether the guest mounts its filesystem (at `/mnt/<name>`); an unmounted volume is
    /// not the guest's to freeze, so it does not weigh on the snapshot conditions.
    #[serde(default = "yes")]
    pub mount: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Attach {
    #[default]
    Local,
    Iscsi,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormatSpec {
    Qcow2,
    Raw,
    Vhd,
    Vhdx,
}

impl From<DiskFormatSpec> for DiskFormat {
    fn from(f: DiskFormatSpec) -> Self {
        match f {
            DiskFormatSpec::Qcow2 => DiskFormat::Qcow2,
            DiskFormatSpec::Raw => DiskFormat::Raw,
            DiskFormatSpec::Vhd => DiskFormat::Vpc,
            DiskFormatSpec::Vhdx => DiskFormat::Vhdx,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSpec {
    #[serde(default)]
    pub method: MethodChoice,
    /// Where Child VM Snapshot overlays go (an absolute path); by default beside the disks.
    #[serde(default)]
    pub snapshot_dir: Option<Spanned<String>>,
    /// What the scenario expects of the backup: it succeeds, or it is refused.
    #[serde(default)]
    pub expect: Expect,
    /// How long the guest's freeze may take, in milliseconds (VSS holds writes at most 10 s).
    #[serde(default)]
    pub freeze_deadline_ms: Option<Spanned<u64>>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    #[default]
    Success,
    /// The backup must be refused (a forced method whose conditions fail) and change nothing.
    Refused,
    /// The backup must fail (an injected fault): no backup, every VM as it was.
    Failed,
    /// The run must be interrupted: no backup, every VM as it was.
    Interrupted,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSpec {
    pub checks: Spanned<Vec<Check>>,
    /// Disks whose file manifests are compared with the backup point and kept in the
    /// fixture (with `manifest-matches-backup`).
    #[serde(default, rename = "manifest")]
    pub manifests: Vec<Spanned<ManifestSpec>>,
    /// What the verification must find: "match" (the default), or "mismatch" (a corrupted
    /// restore must fail, naming each corrupted file).
    #[serde(default)]
    pub expect: RestoreExpect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSpec {
    /// The VM whose disk this is; every VM that has the disk when absent.
    #[serde(default)]
    pub vm: Option<Spanned<String>>,
    pub disk: Spanned<String>,
    /// Paths left out of the comparison and the fixture: a prefix by whole components
    /// ("/lost+found"), or a glob ("*.log").
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Paths compared like any other, whose size and content vary from run to run: the
    /// fixture keeps them with those redacted. Same patterns as `ignore`.
    #[serde(default)]
    pub redact: Vec<String>,
}

impl ManifestSpec {
    /// Whether this spec applies to the VM named `vm`.
    pub fn applies_to(&self, vm: &str) -> bool {
        self.vm.as_ref().is_none_or(|v| v.get_ref() == vm)
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RestoreExpect {
    #[default]
    Match,
    Mismatch,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// The restored guest continues the boot that was saved (same boot_id).
    SameBoot,
    /// The RAM counter continues from where it was.
    CounterContinues,
    /// Each restored disk holds exactly the backup's content before the guest resumes.
    DisksMatchBackup,
    /// The seeded files read back the same inside the restored guest.
    FilesMatchSeed,
    /// The journal in the restored guest is intact and grows on.
    JournalIntact,
    /// Every ext4 disk in the backup passes `e2fsck -fn` (read on the host).
    FsckClean,
    /// The guest app's own consistency check passes on the restored disk.
    AppConsistent,
    /// The file manifest of each `[[restore.manifest]]` disk, read on the host after the
    /// restored guest ran, equals the backup point's (volatile paths left out).
    ManifestMatchesBackup,
    /// Each restored disk has the backup's content, block by block (allocated data only),
    /// read before the guest runs; a difference names its first offset.
    BlocksMatchBackup,
    /// `e2fsck -fn` of every ext4 data disk, run inside the restored guest before it
    /// mounts them (disk-only restores; a saved state's disks are mounted already).
    GuestFsck,
    /// The restored guest booted from the backed-up root disk, not from the test image: a
    /// token written to it before the backup is there.
    RootFromBackup,
}

/// A scenario that parsed and passed every check.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub path: PathBuf,
    pub file: ScenarioFile,
}

impl Scenario {
    pub fn vms(&self) -> impl Iterator<Item = &VmSpec> {
        self.file.vms.iter().map(|v| v.get_ref())
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{}:{line}:{column}: {message}", file.display())]
pub struct ScenarioError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
        file: path.to_owned(),
        line: 0,
        column: 0,
        message: format!("cannot read the scenario: {e}"),
    })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
    let at = |span: Option<Range<usize>>, message: String| {
        let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ScenarioError { file: path.to_owned(), line, column, message }
    };
    let file: ScenarioFile = toml::from_str(text).map_err(|e| at(e.span(), e.message().to_owned()))?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    check(&file).map_err(|(span, msg)| at(Some(span), msg))?;
    Ok(Scenario { name, path: path.to_owned(), file })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, column)
}

/// The bytes a size string means, or what is wrong with it.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("size {s:?} is not a number with an optional unit (K, M, G, T)"))?;
    let mult: u64 = match unit.trim() {
        "" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        u => return Err(format!("size {s:?} has an unknown unit {u:?}; expected K, M, G or T")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

/// Sizes a scenario disk may have: big enough for a filesystem, small enough for a test.
pub const MIN_DISK: u64 = 4 << 20;
pub const MAX_DISK: u64 = 64 << 30;

fn check(f: &ScenarioFile) -> Result<(), (Range<usize>, String)> {
    let known: Vec<&str> = crate::image::recipe::RECIPES.iter().map(|(n, _)| *n).collect();
    if let Some(d) = &f.backup.snapshot_dir {
        if !d.get_ref().starts_with('/') {
            return Err((d.span(), format!("snapshot_dir {:?}: expected an absolute path", d.get_ref())));
        }
    }
    if let Some(d) = &f.backup.freeze_deadline_ms {
        if !(100..=10_000).contains(d.get_ref()) {
            return Err((
                d.span(),
                format!("freeze_deadline_ms = {}: expected 100 to 10000 (VSS's hold limit is 10 s)", d.get_ref()),
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
        if r.expect == RestoreExpect::Mismatch && !corrupts {
            let msg =
                "expect = \"mismatch\" needs a fault on a restored file (flip-byte-in-restore, truncate-in-restore)";
            return Err((r.checks.span(), msg.into()));
        }
        if corrupts && r.expect != RestoreExpect::Mismatch {
            let msg = "a fault on a restored file makes the restore differ: set expect = \"mismatch\"";
            return Err((r.checks.span(), msg.into()));
        }
    }
    if let Some(rb) = &f.rollback {
        let spec = rb.get_ref();
        if f.vms.len() != 1 || !f.faults.is_empty() || f.backup.expect != Expect::Success {
            return Err((rb.span(), "rollback cycles take one VM, no faults and a backup expected to succeed".into()));
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
        let Some(d) = d.filter(|d| d.filesystem == Filesystem::Ext4 && d.mount) else {
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
        if !known.contains(&vm.image.get_ref().as_str()) {
            return Err((
                vm.image.span(),
                format!("no guest image recipe {:?}; expected one of {known:?}", vm.image.get_ref()),
            ));
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
            let size = parse_size(d.size.get_ref()).map_err(|m| (d.size.span(), m))?;
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
                // the app's sqlite store is kept to ext4.
                Some(d) if what == "app" && d.filesystem != Filesystem::Ext4 => {
                    return Err((j.span(), format!("app disk {:?} has no ext4 filesystem", j.get_ref())))
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
            let guest_side = vm.workload.counter || vm.workload.journal.is_some() || vm.workload.app.is_some();
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
description = "a running VM with a data disk"

[[vm]]
name = "vm1"
memory_mib = 256
workload = { counter = true, journal = "data" }

[[vm.disk]]
name = "data"
format = "qcow2"
size = "64M"
filesystem = "ext4"
files = { "hello.txt" = "hello\n" }

[backup]
method = "saved-state"

[restore]
checks = ["same-boot", "files-match-seed"]
"#;

    fn err(text: &str) -> ScenarioError {
        parse(Path::new("scenarios/x.toml"), text).unwrap_err()
    }

    #[test]
    fn a_good_scenario_parses() {
        let s = parse(Path::new("scenarios/good.toml"), GOOD).unwrap();
        assert_eq!(s.name, "good");
        let vm = s.vms().next().unwrap();
        assert_eq!(vm.disks[0].get_ref().files["hello.txt"], "hello\n");
        assert_eq!(s.file.backup.method, MethodChoice::SavedState);
    }

    #[test]
    fn unknown_key_names_file_line_and_expected_keys() {
        let e = err(&GOOD.replace("memory_mib = 256", "memory_mb = 256"));
        assert_eq!((e.file.to_str(), e.line), (Some("scenarios/x.toml"), 6), "{e}");
        assert!(e.message.contains("unknown field `memory_mb`") && e.message.contains("memory_mib"), "{e}");
        assert!(e.to_string().starts_with("scenarios/x.toml:6:"), "{e}");
    }

    #[test]
    fn wrong_type_points_at_the_value() {
        let e = err(&GOOD.replace("memory_mib = 256", "memory_mib = \"lots\""));
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("u32") || e.message.contains("integer"), "{e}");
    }

    #[test]
    fn unknown_enum_value_lists_the_choices() {
        let e = err(&GOOD.replace("format = \"qcow2\"", "format = \"vmdk\""));
        assert_eq!(e.line, 11, "{e}");
        assert!(e.message.contains("qcow2") && e.message.contains("vhdx"), "{e}");
    }

    #[test]
    fn missing_image_is_reported_at_its_line() {
        let e = err(&GOOD.replace("memory_mib = 256", "memory_mib = 256\nimage = \"windows-2000\""));
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("no guest image recipe \"windows-2000\""), "{e}");
    }

    #[test]
    fn impossible_sizes_are_reported_at_their_line() {
        for bad in ["\"0\"", "\"64Q\"", "\"huge\"", "\"999T\"", "\"99999999999999999999G\""] {
            let e = err(&GOOD.replace("size = \"64M\"", &format!("size = {bad}")));
            assert_eq!(e.line, 12, "{bad}: {e}");
        }
    }

    #[test]
    fn missing_required_key_is_named() {
        let e = err(&GOOD.replace("format = \"qcow2\"\n", ""));
        assert!(e.message.contains("missing field `format`"), "{e}");
    }

    #[test]
    fn cross_references_are_checked() {
        let e = err(&GOOD.replace("journal = \"data\"", "journal = \"logs\""));
        assert!(e.message.contains("journal disk \"logs\""), "{e}");
        assert_eq!(e.line, 7);
        let e = err(&GOOD.replace("filesystem = \"ext4\"\n", ""));
        assert!(e.message.contains("has no filesystem"), "{e}");
        let e = err(&GOOD.replace("name = \"data\"", "name = \"root\""));
        assert!(e.message.contains("used twice"), "{e}");
    }

    #[test]
    fn faults_on_restored_files_need_a_disk_and_an_absolute_path() {
        let fault = "\n[[fault]]\nvm = \"vm1\"\nkind = \"flip-byte-in-restore\"\n";
        let flip = |extra: &str| format!("{GOOD}expect = \"mismatch\"\n{fault}{extra}");
        let ok = parse(Path::new("scenarios/x.toml"), &flip("disk = \"data\"\npath = \"/hello.txt\"\n")).unwrap();
        assert_eq!(ok.file.faults[0].get_ref().kind, FaultKind::FlipByteInRestore);
        let e = err(&format!("{GOOD}{fault}disk = \"data\"\npath = \"/hello.txt\"\n"));
        assert!(e.message.contains("set expect = \"mismatch\""), "{e}");
        let e = err(&flip("disk = \"data\"\n"));
        assert!(e.message.contains("needs disk"), "{e}");
        let e = err(&flip("disk = \"data\"\npath = \"hello.txt\"\n"));
        assert!(e.message.contains("absolute path") && e.line == 27, "{e}");
        let e = err(&flip("disk = \"nope\"\npath = \"/x\"\n"));
        assert!(e.message.contains("\"nope\" is not a data disk"), "{e}");
        let e = err(&format!("{GOOD}\n[[fault]]\nvm = \"vm1\"\nkind = \"save-fails\"\npath = \"/x\"\n"));
        assert!(e.message.contains("only faults on a restored file"), "{e}");
    }

    #[test]
    fn manifests_and_rollback_are_checked_where_they_are_written() {
        let with = |extra: &str| GOOD.replace("checks = [\"same-boot\", \"files-match-seed\"]", extra);
        let e = err(&with("checks = [\"same-boot\"]\n[[restore.manifest]]\ndisk = \"data\""));
        assert!(e.message.contains("needs the check \"manifest-matches-backup\""), "{e}");
        let e = err(&with("checks = [\"manifest-matches-backup\"]"));
        assert!(e.message.contains("needs a [[restore.manifest]]") && e.line == 20, "{e}");
        let e = err(&with("checks = [\"same-boot\"]\nexpect = \"mismatch\""));
        assert!(e.message.contains("needs a fault on a restored file"), "{e}");
        let e = err(&with("checks = [\"manifest-matches-backup\"]\n[[restore.manifest]]\ndisk = \"logs\""));
        assert!(e.message.contains("no VM has a disk \"logs\"") && e.line == 22, "{e}");
        let e =
            err(&with("checks = [\"manifest-matches-backup\"]\n[[restore.manifest]]\nvm = \"vm9\"\ndisk = \"data\""));
        assert!(e.message.contains("no VM is named \"vm9\"") && e.line == 22, "{e}");
        let e =
            err(&with("checks = [\"manifest-matches-backup\"]\n[[restore.manifest]]\nvm = \"vm1\"\ndisk = \"logs\""));
        assert!(e.message.contains("VM \"vm1\" has no disk \"logs\"") && e.line == 23, "{e}");
        let two = GOOD
            .replace("files = { \"hello.txt\" = \"hello\\n\" }", "files = { \"a.txt\" = \"a\", \"b.txt\" = \"b\" }");
        let rb = |body: &str| format!("{two}\n[rollback]\n{body}");
        let good = rb("cycles = 5\nmethods = [\"child-snapshot\", \"saved-state\"]\ndisk = \"data\"\n");
        assert!(parse(Path::new("scenarios/x.toml"), &good).is_ok());
        let e = err(&rb("cycles = 50\nmethods = [\"saved-state\"]\ndisk = \"data\"\n"));
        assert!(e.message.contains("expected 1 to 20") && e.line == 23, "{e}");
        let e = err(&rb("cycles = 2\nmethods = [\"auto\"]\ndisk = \"data\"\n"));
        assert!(e.message.contains("methods"), "{e}");
        let e = err(&rb("cycles = 2\nmethods = [\"saved-state\"]\ndisk = \"root\"\n"));
        assert!(e.message.contains("not a mounted ext4 data disk"), "{e}");
        // GOOD seeds one file only: a cycle needs one to change and one to remove.
        let e = err(&format!("{GOOD}\n[rollback]\ncycles = 2\nmethods = [\"saved-state\"]\ndisk = \"data\"\n"));
        assert!(e.message.contains("two or more seeded files"), "{e}");
        let paused = good.replace("memory_mib = 256", "memory_mib = 256\nstate = \"paused\"");
        let e = err(&paused);
        assert!(e.message.contains("must be running"), "{e}");
    }

    #[test]
    fn ntfs_seeds_are_flat_and_unmounted_disks_take_no_journal() {
        let e = err(&GOOD.replace(
            "filesystem = \"ext4\"\nfiles = { \"hello.txt\"",
            "filesystem = \"ntfs\"\nfiles = { \"a/hello.txt\"",
        ));
        assert!(e.message.contains("top level only"), "{e}");
        let e = err(&GOOD.replace("filesystem = \"ext4\"\n", "filesystem = \"ext4\"\nmount = false\n"));
        assert!(e.message.contains("no mounted"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("1.5G").is_err());
    }
}
