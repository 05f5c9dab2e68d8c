//! `quiesce backup --qmp SOCKET ...`: backs up VMs quiesce did not start, by their QMP (and
//! agent) sockets, into a backup folder of the same format a scenario writes, so `quiesce
//! verify`, `quiesce diff` and `quiesce restore` work on it. Several `--qmp` are one set,
//! all or nothing. SIGINT and SIGTERM put every VM back and leave no backup.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quiesce::backup::attached::{self, AttachedBackup};
use quiesce::backup::conditions::{self, Outcome, Verdict};
use quiesce::backup::job::{Choice, MethodChoice};
use quiesce::backup::set::SetError;
use quiesce::interrupt::Interrupt;
use quiesce::qemu::{attach, Machine};
use quiesce::sys::deadline;
use quiesce::timeline::{self, Timeline};

pub mod libvirt;
pub mod recover;

use super::{CliResult, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE};

/// How often the steps done so far are printed while the backup runs (display only).
const STEP_PRINT: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum MethodArg {
    /// Child VM Snapshot when all six conditions hold, else Saved State (the condition named).
    Auto,
    /// Child VM Snapshot, or refuse (touching nothing) if a condition fails.
    ChildSnapshot,
    /// Saved State: the VM's RAM and device state saved, the disks copied meanwhile.
    SavedState,
}

impl From<MethodArg> for MethodChoice {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Auto => MethodChoice::Auto,
            MethodArg::ChildSnapshot => MethodChoice::ChildSnapshot,
            MethodArg::SavedState => MethodChoice::SavedState,
        }
    }
}

#[derive(clap::Args)]
pub struct BackupArgs {
    /// The QMP socket of a running or paused QEMU (its -qmp unix:PATH,server). Repeat it to
    /// back up several VMs as one set, all or nothing.
    #[arg(long = "qmp", value_name = "SOCKET", required_unless_present = "libvirt", conflicts_with = "libvirt")]
    qmp: Vec<PathBuf>,
    /// A running or paused libvirt domain (its name or UUID), backed up through libvirt
    /// (virsh). Repeat it to back up several domains as one set, all or nothing. See the
    /// README, "Back up a libvirt domain".
    #[arg(long, value_name = "DOMAIN", conflicts_with = "agent")]
    libvirt: Vec<String>,
    /// libvirt's connection URI for --libvirt (virsh -c); virsh's default if not given.
    #[arg(long, value_name = "URI", requires = "libvirt")]
    connect: Option<String>,
    /// The socket of its guest agent's chardev (virtserialport org.qemu.guest_agent.0). With
    /// several --qmp, give one --agent per --qmp in the same order ("none" for a VM without).
    #[arg(long = "agent", value_name = "SOCKET")]
    agent: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    method: MethodArg,
    /// Where Child VM Snapshot's overlays go while it runs (removed afterwards); by default
    /// the folder of each VM's first disk.
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// Child VM Snapshot: the merge's rate limit, in bytes per second, so that merging the
    /// overlays back does not starve the guest's own I/O (none by default).
    #[arg(long, value_name = "BYTES")]
    merge_speed: Option<u64>,
    /// Child VM Snapshot: how long, in seconds, the merge may take to catch up with the
    /// guest's writes before the VM is paused for it to finish (see the README).
    #[arg(long, value_name = "SECONDS")]
    merge_converge: Option<u64>,
    /// The backup folder to write; it must not exist.
    out: PathBuf,
}

pub async fn run(args: BackupArgs) -> CliResult {
    if args.out.exists() {
        eprintln!("quiesce: {} exists already; nothing was touched (give a new folder)", args.out.display());
        return Ok(EXIT_FAILED);
    }
    if !args.agent.is_empty() && args.agent.len() != args.qmp.len() {
        eprintln!(
            "quiesce: {} --qmp but {} --agent: give one --agent per --qmp, in the same order (\"none\" for a VM without)",
            args.qmp.len(),
            args.agent.len()
        );
        return Ok(EXIT_USAGE);
    }
    // SIGINT and SIGTERM fire the interruption: a backup under way puts every VM back.
    let (interrupt, signals) = super::interrupt_on_signals();
    let code =
        if args.libvirt.is_empty() { backup(&args, &interrupt).await } else { libvirt::run(&args, &interrupt).await };
    signals.abort();
    code
}

async fn backup(args: &BackupArgs, interrupt: &Interrupt) -> CliResult {
    let mut machines: Vec<Machine> = Vec::new();
    let mut attached_as = Vec::new();
    for opts in recover::attach_options(&args.qmp, &args.agent) {
        // Attaching only asks questions: an interruption here has nothing to undo.
        let m = tokio::select! {
            biased;
            _ = interrupt.fired() => {
                eprintln!("quiesce: interrupted before the backup began; no VM was touched");
                return Ok(EXIT_INTERRUPTED);
            }
            m = attach(&opts) => m?,
        };
        // Before anything else: what a quiesce killed mid-backup left in this VM is undone.
        let m = recover::leftovers(m, &opts).await?;
        machines.push(m);
        attached_as.push(opts);
    }
    let names: Vec<String> = machines.iter().map(|m| m.name().to_owned()).collect();
    if let Some(dup) = names.iter().enumerate().find_map(|(i, n)| names[..i].contains(n).then_some(n)) {
        eprintln!(
            "quiesce: two VMs are both named {dup} (QEMU's -name): give each VM its own -name; nothing was touched"
        );
        return Ok(EXIT_USAGE);
    }
    for m in &machines {
        let disks: Vec<String> = m
            .config()
            .disks
            .iter()
            .map(|d| format!("{} ({}, {})", d.node_name, d.format.driver(), d.path.display()))
            .collect();
        println!("VM {}: {}", m.name(), disks.join(", "));
    }
    let tl = Timeline::new();
    let journals = recover::journals(&machines, &attached_as).await?;
    let how = AttachedBackup {
        method: args.method.into(),
        snapshot_dir: args.snapshot_dir.clone(),
        journals,
        merge_speed: args.merge_speed,
        merge_converge: args.merge_converge.map(std::time::Duration::from_secs),
    };
    let shown = Arc::new(AtomicUsize::new(0));
    let printer = tokio::spawn(print_steps(tl.clone(), shown.clone()));
    let outcome = attached::run(&machines, &how, &args.out, &tl, interrupt).await;
    printer.abort();
    print_new_steps(&tl, &shown);
    let outcome = outcome?;
    for (vm, e) in &outcome.settings_not_restored {
        eprintln!("quiesce: VM {vm}: its migration settings could not be put back as they were: {e}");
    }
    let code = match outcome.result {
        Ok(done) => {
            print_choices(&machines, &done.choices, how.snapshot_dir.as_deref()).await;
            for x in &done.excluded {
                println!("VM {}: disk {} left out: {}", x.vm, x.disk, x.advice);
            }
            println!("backup: {}", done.backup.path.display());
            0
        }
        Err(SetError::Refused { choices, vm, reasons }) => {
            print_choices(&machines, &choices, how.snapshot_dir.as_deref()).await;
            eprintln!("quiesce: VM {vm}: refused, nothing was touched: {reasons}");
            EXIT_FAILED
        }
        Err(e @ SetError::Interrupted { .. }) => {
            eprintln!("quiesce: {e}");
            EXIT_INTERRUPTED
        }
        Err(e) => {
            eprintln!("quiesce: error: {e}");
            EXIT_FAILED
        }
    };
    Ok(if outcome.settings_not_restored.is_empty() { code } else { code.max(EXIT_FAILED) })
}

/// Each VM's six verdicts and its method. With `--method saved-state` the job does not ask
/// the conditions; they are asked here, for the record (asking changes nothing).
async fn print_choices(machines: &[Machine], choices: &[(String, Choice)], snapshot_dir: Option<&std::path::Path>) {
    for (vm, choice) in choices {
        let mut verdicts = choice.conditions.clone();
        if verdicts.is_empty() {
            if let Some(m) = machines.iter().find(|m| m.name() == vm) {
                let dir = attached::snapshot_dir_for(m, snapshot_dir);
                verdicts = conditions::evaluate(m, &dir, deadline::condition_agent_command()).await;
            }
        }
        println!("VM {vm}: conditions for Child VM Snapshot:");
        for v in &verdicts {
            println!("  {}", verdict_line(v));
        }
        println!("VM {vm}: method {} ({})", choice.method.as_str(), choice.reason);
    }
}

fn verdict_line(v: &Verdict) -> String {
    let word = match v.outcome {
        Outcome::Held => "held",
        Outcome::Failed => "FAILED",
        Outcome::NotChecked => "not checked",
    };
    format!("{:<30} {:<11} {}", v.condition.name(), word, v.reason)
}

/// Prints the steps of the backup as they end, so a person (or a test) sees where it is.
async fn print_steps(tl: Timeline, shown: Arc<AtomicUsize>) {
    loop {
        print_new_steps(&tl, &shown);
        tokio::time::sleep(STEP_PRINT).await;
    }
}

fn print_new_steps(tl: &Timeline, shown: &AtomicUsize) {
    let steps = tl.steps();
    for s in steps.iter().skip(shown.load(Ordering::SeqCst)) {
        let how = match &s.outcome {
            timeline::Outcome::Ok => "done".to_owned(),
            timeline::Outcome::Failed { error } => format!("FAILED: {error}"),
            timeline::Outcome::Interrupted => "interrupted".to_owned(),
        };
        eprintln!("  {}{}: {how}", s.vm.as_deref().map(|v| format!("{v}: ")).unwrap_or_default(), s.name);
    }
    shown.store(steps.len(), Ordering::SeqCst);
}
