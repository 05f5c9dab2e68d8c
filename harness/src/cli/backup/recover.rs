//! What `quiesce backup --qmp` does about a quiesce killed mid-backup: first, each VM's
//! recovery journal is replayed (leftovers undone, or a stale journal removed); then each
//! VM gets a journal of its own for this backup.

use std::path::PathBuf;
use std::sync::Arc;

use quiesce::backup::attached::MigrationSettings;
use quiesce::backup::recovery::{self, Before, Found, Identity, Journal};
use quiesce::backup::runstate;
use quiesce::qemu::{attach, AttachOptions, Machine};
use quiesce::timeline::Timeline;

use super::super::CliResult;

/// `quiesce recover --qmp SOCKET [--agent SOCKET]` (or `--libvirt DOMAIN [--connect URI]`,
/// [`super::libvirt::recover`]): only the first thing `quiesce backup`
/// does, for a person who wants a VM a killed quiesce left frozen or stopped put back now,
/// without making a backup (which needs a target folder and the time of a copy).
#[derive(clap::Args)]
pub struct RecoverArgs {
    /// The QMP socket of the VM (its -qmp unix:PATH,server), as given to the killed backup.
    #[arg(long = "qmp", value_name = "SOCKET", required_unless_present = "libvirt", conflicts_with = "libvirt")]
    qmp: Vec<PathBuf>,
    /// Its guest agent's socket, needed to thaw a guest left frozen; one per --qmp ("none"
    /// for a VM without).
    #[arg(long = "agent", value_name = "SOCKET")]
    agent: Vec<PathBuf>,
    /// A libvirt domain (its name or UUID), as given to the killed `backup --libvirt`.
    #[arg(long = "libvirt", value_name = "DOMAIN")]
    libvirt: Vec<String>,
    /// libvirt's connection URI for --libvirt (virsh -c); virsh's default if not given.
    #[arg(long, value_name = "URI", requires = "libvirt")]
    connect: Option<String>,
}

/// The VMs `--qmp SOCKET [--agent SOCKET|none]` name, as `backup` and `recover` take them:
/// the i-th `--agent` goes with the i-th `--qmp`, and "none" (or no i-th `--agent`) is a VM
/// without an agent.
pub fn attach_options(qmp: &[PathBuf], agents: &[PathBuf]) -> Vec<AttachOptions> {
    let agent = |i: usize| agents.get(i).filter(|a| a.as_os_str() != "none").cloned();
    qmp.iter().enumerate().map(|(i, q)| AttachOptions::new(q.clone(), agent(i))).collect()
}

pub async fn run(args: RecoverArgs) -> CliResult {
    if !args.libvirt.is_empty() {
        return super::libvirt::recover(&args.libvirt, args.connect).await;
    }
    for opts in attach_options(&args.qmp, &args.agent) {
        let qmp = &opts.qmp;
        let m = attach(&opts).await?;
        let name = m.name().to_owned();
        let before = recovery::journal_path(qmp)?.exists();
        drop(leftovers(m, &opts).await?);
        if !before {
            println!("VM {name}: no recovery journal: nothing to undo");
        }
    }
    Ok(0)
}

/// Replays the journal of the VM attached as `m`, printing what it found and did. A VM
/// whose disks changed under it (overlays merged) is attached again, so that its disks are
/// learnt as they are now. An error means the VM may still hold leftovers: nothing more is
/// done to it.
pub async fn leftovers(m: Machine, opts: &AttachOptions) -> Result<Machine, Box<dyn std::error::Error>> {
    let tl = Timeline::new();
    let found = recovery::replay(&m, &opts.qmp, &tl, quiesce::verify::rollback_attached::roll_forward).await?;
    let reattach = match &found {
        Found::Nothing => false,
        Found::Undone { steps, .. } => !steps.is_empty(),
        Found::Stale { .. } | Found::Unreadable { .. } => false,
    };
    if !matches!(found, Found::Nothing) {
        println!("VM {}: {found}", m.name());
    }
    if !reattach {
        return Ok(m);
    }
    // QEMU serves one QMP client at a time: this connection closes before the next opens.
    drop(m);
    Ok(attach(opts).await?)
}

/// A journal for each VM (attached from `qmp[i]`, with agent `agents[i]`), written at the
/// first change quiesce makes to it.
pub async fn journals(
    machines: &[Machine],
    opts: &[AttachOptions],
) -> Result<Vec<Option<Arc<Journal>>>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for (m, o) in machines.iter().zip(opts) {
        let Some(id) = Identity::of(&o.qmp, m.pid(), m.name()).filter(|_| m.pid() != 0) else {
            return Err(format!(
                "VM {}: QEMU's pid could not be learnt from {}, so no recovery journal can name it; nothing was touched",
                m.name(),
                o.qmp.display()
            )
            .into());
        };
        let now = runstate::query(m).await?;
        let before = Before { running: now.running, status: now.status };
        let migration = MigrationSettings::read(m).await?;
        out.push(Some(Arc::new(Journal::new(id, o.agent.clone(), before, migration)?)));
    }
    Ok(out)
}
