//! The scenario file's contents: plain structs serde reads (unknown keys refused), and the
//! questions the runner asks of a scenario. What may be written where is checked after
//! (`check.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

pub use crate::backup::job::MethodChoice;
pub use crate::image::seed::{Filesystem, Partitioning};
use crate::qemu::DiskFormat;

/// Declares an enum whose variants each carry the one name a scenario file and a report
/// give them: serde reads that name (`#[serde(rename)]`), `name()` returns it and `ALL`
/// lists every variant, so the name is written once.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $ty:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $name:tt, )*
        }
    ) => {
        $(#[$meta])*
        $vis enum $ty {
            $( $(#[$vmeta])* #[serde(rename = $name)] $variant, )*
        }

        impl $ty {
            /// Every variant, in the order declared.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),*];

            /// The name a scenario file gives it.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)*
                }
            }
        }
    };
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub description: String,
    #[serde(rename = "vm")]
    pub vms: Vec<Spanned<VmSpec>>,
    /// Required, but in rollback scenarios: their cycles take the methods from `[rollback]`,
    /// and a `[backup]` table there may only place overlays or bound the freeze.
    #[serde(default)]
    pub backup: Option<BackupSpec>,
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

impl FaultSpec {
    /// The disk and path of a fault on a restored file (the check makes sure both are given).
    pub fn file(&self) -> (String, String) {
        let get = |x: &Option<Spanned<String>>| x.as_ref().map(|v| v.get_ref().clone()).unwrap_or_default();
        (get(&self.disk), get(&self.path))
    }
}

named_enum! {
    /// A fault a scenario injects (`[[fault]] kind`), by the name its file gives it.
    #[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
    pub enum FaultKind {
        /// The snapshot transaction asks QEMU for an overlay at a path that cannot be created.
        TransactionFails = "transaction-fails",
        /// The saved state goes to a target folder that does not exist, so `migrate` fails.
        SaveFails = "save-fails",
        /// A freeze hook in the guest outlasts the freeze deadline (the agent hangs in freeze).
        AgentHangsInFreeze = "agent-hangs-in-freeze",
        /// The run is interrupted right after the guest is frozen (as SIGINT would).
        InterruptAfterFreeze = "interrupt-after-freeze",
        /// The harness process gets a real SIGINT right after the guest is frozen (CLI only).
        SigintAfterFreeze = "sigint-after-freeze",
        /// QEMU is killed between PrepareForSnapshot and PostSnapshot.
        QemuKilledAfterPrepare = "qemu-killed-after-prepare",
        /// The backup is written to a small tmpfs that fills up during the copy (needs root
        /// to mount it).
        BackupTargetFull = "backup-target-full",
        /// A freeze hook in the guest fails (a VSS writer's veto): guest-fsfreeze-freeze
        /// returns the agent's error.
        AgentFreezeFails = "agent-freeze-fails",
        /// The guest agent stops answering right after it froze the guest (SIGSTOP from inside
        /// the guest), for longer than the thaw may wait: the thaw times out.
        AgentStopsAfterFreeze = "agent-stops-after-freeze",
        /// One byte of a file's data is flipped in the restored disk, under the filesystem
        /// (`disk` and `path` name the file). The verification must name it.
        FlipByteInRestore = "flip-byte-in-restore",
        /// A file is truncated to half its size in the restored guest (`disk`, `path`).
        TruncateInRestore = "truncate-in-restore",
        /// Child VM Snapshot exactly as usual, but no freeze is sent: the backup is a
        /// crash-consistent copy of a live guest. Test-only; the consistency checks must fail.
        SkipFreeze = "skip-freeze",
        /// The filesystems are frozen, but the app's freeze hook is made non-executable in the
        /// guest first, so the app is not paused: a VSS writer that did not take part.
        SkipFreezeHooks = "skip-freeze-hooks",
        /// Windows: the host holds the guest frozen for 12 s before the snapshot transaction,
        /// past VSS's 10 s hold limit, so the thaw reports that writes went on.
        HoldPastVssLimit = "hold-past-vss-limit",
        /// Windows: qemu-ga's VSS provider is unregistered in the guest before the backup
        /// (`qemu-ga.exe -s vss-uninstall`), so VSS fails to initialise.
        VssProviderUnregistered = "vss-provider-unregistered",
        /// The VM's folder (disks and overlays) is a small tmpfs, and a writer in the guest
        /// fills it after the thaw: QEMU pauses the VM for space during the copy-out (needs
        /// root to mount it).
        SnapshotVolumeFull = "snapshot-volume-full",
        /// A writer in the guest outpaces a rate-limited merge, which does not catch up within
        /// its short convergence deadline: the VM is paused to finish it.
        MergeDoesNotConverge = "merge-does-not-converge",
        /// The backup target is a tmpfs lazily unmounted after the VM's first disk is copied
        /// (needs root to mount it).
        BackupTargetVanishes = "backup-target-vanishes",
    }
}

impl FaultKind {
    /// Faults on a restored file, which need `disk` and `path`.
    pub fn on_restored_file(self) -> bool {
        matches!(self, FaultKind::FlipByteInRestore | FaultKind::TruncateInRestore)
    }

    /// The consistency checks this fault must make fail: a scenario with it expects the
    /// restore's verification to fail (`expect = "mismatch"`), and proves that they bite.
    pub fn defeats(self) -> &'static [Check] {
        match self {
            FaultKind::SkipFreeze => &[Check::FsQuiesced, Check::AppConsistent, Check::JournalCutAtFreeze],
            FaultKind::SkipFreezeHooks => &[Check::AppConsistent],
            _ => &[],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: Spanned<String>,
    /// A guest image recipe under guest-images/, or an image the user brings (`own.rs`).
    #[serde(default = "default_image")]
    pub image: Spanned<super::own::ImageSpec>,
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

fn default_image() -> Spanned<super::own::ImageSpec> {
    Spanned::new(0..0, super::own::ImageSpec::Recipe("linux".to_owned()))
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// A counter in guest RAM; a restored saved state continues it. (Spanned, so that an
    /// image that cannot run it refuses it at its line.)
    #[serde(default = "no")]
    pub counter: Spanned<bool>,
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

fn no() -> Spanned<bool> {
    Spanned::new(0..0, false)
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec { counter: no(), journal: None, app: None }
    }
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
    /// Absent means `auto`; kept optional so that a rollback scenario that sets it (where
    /// it means nothing) is told so, at the line that sets it.
    #[serde(default)]
    pub method: Option<Spanned<MethodChoice>>,
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

impl BackupSpec {
    /// What a scenario without a `[backup]` table (a rollback scenario) backs up with.
    pub const DEFAULT: BackupSpec =
        BackupSpec { method: None, snapshot_dir: None, expect: Expect::Success, freeze_deadline_ms: None };

    /// The method asked for (`auto` when none is).
    pub fn method(&self) -> MethodChoice {
        self.method.as_ref().map(|m| *m.get_ref()).unwrap_or_default()
    }
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
    /// Child VM Snapshot: every ext4 filesystem in the backup was frozen when it was taken,
    /// read from its superblock and journal on the host: `needs_recovery` clear and the
    /// journal's log empty (NTFS: the dirty flag clear).
    FsQuiesced,
    /// Child VM Snapshot: the journal workload's lines acknowledged before the freeze are
    /// all in the backup, and none acknowledged after the thaw is, read from the backup's
    /// image on the host and placed by the guest's own clock against the freeze.
    JournalCutAtFreeze,
    /// The backup's ext4 data disks, booted on their own (never from a saved state), mount
    /// clean: a crash-consistent one after the kernel replays its journal, which the check
    /// names; a frozen one with no replay at all.
    AutoRecoverable,
}

impl Check {
    /// The name a scenario file gives it, and reports show.
    pub fn name(self) -> &'static str {
        match self {
            Check::SameBoot => "same-boot",
            Check::CounterContinues => "counter-continues",
            Check::DisksMatchBackup => "disks-match-backup",
            Check::FilesMatchSeed => "files-match-seed",
            Check::JournalIntact => "journal-intact",
            Check::FsckClean => "fsck-clean",
            Check::AppConsistent => "app-consistent",
            Check::ManifestMatchesBackup => "manifest-matches-backup",
            Check::BlocksMatchBackup => "blocks-match-backup",
            Check::GuestFsck => "guest-fsck",
            Check::RootFromBackup => "root-from-backup",
            Check::FsQuiesced => "fs-quiesced",
            Check::JournalCutAtFreeze => "journal-cut-at-freeze",
            Check::AutoRecoverable => "auto-recoverable",
        }
    }
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

    /// The `[backup]` table, or what its absence means (only rollback scenarios may omit it).
    pub fn backup(&self) -> &BackupSpec {
        self.file.backup.as_ref().unwrap_or(&BackupSpec::DEFAULT)
    }

    /// The faults of `kind` injected into VM `vm`.
    pub fn faults<'a>(&'a self, vm: &'a str, kind: FaultKind) -> impl Iterator<Item = &'a FaultSpec> + 'a {
        self.file.faults.iter().map(|f| f.get_ref()).filter(move |f| f.vm.get_ref() == vm && f.kind == kind)
    }

    /// Whether the scenario injects a fault of `kind` into VM `vm`.
    pub fn has_fault(&self, vm: &str, kind: FaultKind) -> bool {
        self.faults(vm, kind).next().is_some()
    }

    /// Whether any VM gets a fault of `kind`.
    pub fn any_fault(&self, kind: FaultKind) -> bool {
        self.file.faults.iter().any(|f| f.get_ref().kind == kind)
    }

    /// The fault on VM `vm` that must make `check` fail, if there is one.
    pub fn defeated_by(&self, vm: &str, check: Check) -> Option<FaultKind> {
        self.file
            .faults
            .iter()
            .map(|f| f.get_ref())
            .find(|f| f.vm.get_ref() == vm && f.kind.defeats().contains(&check))
            .map(|f| f.kind)
    }
}

/// What is wrong with a disk size in a scenario file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// The size does not start with a whole number of bytes or units.
    #[error("size {0:?} is not a number with an optional unit (K, M, G, T)")]
    NotANumber(String),
    /// The unit is none of those the format knows.
    #[error("size {size:?} has an unknown unit {unit:?}; expected K, M, G or T")]
    UnknownUnit { size: String, unit: String },
    /// The size does not fit in 64 bits of bytes.
    #[error("size {0:?} is too large")]
    TooLarge(String),
}

/// The bytes a size string means: a whole number, with an optional unit (K, M, G, T).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| SizeError::NotANumber(s.to_owned()))?;
    let mult: u64 = match unit.trim() {
        "" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        u => return Err(SizeError::UnknownUnit { size: s.to_owned(), unit: u.to_owned() }),
    };
    n.checked_mul(mult).ok_or_else(|| SizeError::TooLarge(s.to_owned()))
}

/// Sizes a scenario disk may have: big enough for a filesystem, small enough for a test.
pub const MIN_DISK: u64 = 4 << 20;
pub const MAX_DISK: u64 = 64 << 30;
