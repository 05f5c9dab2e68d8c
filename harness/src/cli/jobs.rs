//! `quiesce run -j N`: runs scenarios N at a time. Each worker is a thread with a runtime of
//! its own (a scenario blocks its thread in places: disk seeding, qemu-img, hashing), takes
//! the next scenario from a queue ordered longest first, and sends what happens back to the
//! command, which alone prints and writes reports, so that output stays whole and the
//! summary, the page and the JUnit file keep the order of the files.
//!
//! The default N is what the machine can take: one scenario per core (under TCG each vCPU
//! is a host thread that keeps a core busy), and no more than the available memory holds
//! for the most demanding scenario.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use quiesce::interrupt::Interrupt;
use quiesce::scenario::report::Report;
use quiesce::scenario::shard::{self, Durations};
use quiesce::scenario::{self, RunOptions, Scenario};

/// What QEMU itself takes beside a VM's RAM under TCG (its translated code, its own heap),
/// with room for the harness's own work on the VM's disks.
const OVERHEAD_PER_VM_MIB: u64 = 384;

/// Most scenarios that run at once: beyond this, a run is bound by something else.
const MAX_JOBS: usize = 64;

/// What one scenario of a run reports while it runs. `index` is its place in the file order.
pub enum Event {
    Started {
        index: usize,
    },
    Step {
        what: String,
    },
    Finished {
        index: usize,
        report: Box<Report>,
    },
    /// Its worker could not start a runtime, or the scenario panicked: it has no report.
    Lost {
        index: usize,
        why: String,
    },
}

/// The memory (MiB) a scenario's VMs need together, with QEMU's own share.
fn memory_need_mib(s: &Scenario) -> u64 {
    s.vms().map(|v| u64::from(*v.memory_mib.get_ref()) + OVERHEAD_PER_VM_MIB).sum()
}

/// `MemAvailable` of /proc/meminfo, in MiB; None where it cannot be read.
fn available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Pure: how many scenarios run at once by default, given the cores, the available memory
/// and the most any one scenario needs. At least one: a single scenario too large for the
/// memory is QEMU's to refuse, as it is without -j.
pub fn default_jobs(cores: usize, available_mib: Option<u64>, largest_need_mib: u64) -> usize {
    let by_memory = match available_mib {
        Some(avail) if largest_need_mib > 0 => usize::try_from(avail / largest_need_mib).unwrap_or(usize::MAX),
        _ => usize::MAX,
    };
    cores.min(by_memory).clamp(1, MAX_JOBS)
}

/// The default for this machine and these scenarios.
pub fn jobs_for(scenarios: &[Scenario]) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let largest = scenarios.iter().map(memory_need_mib).max().unwrap_or(0);
    default_jobs(cores, available_mib(), largest)
}

/// A run's options for the scenario at `index` (each gets its own evidence folder).
pub type OptionsFor = dyn Fn(&Scenario) -> RunOptions + Send + Sync;

/// Starts `jobs` workers over `scenarios` (longest recorded first) and returns the channel
/// their events come on; it closes when every worker has ended. Workers take no new
/// scenario once `interrupt` has fired.
pub fn start(
    scenarios: Arc<Vec<Scenario>>,
    durations: &Durations,
    jobs: usize,
    options: Arc<OptionsFor>,
    interrupt: Interrupt,
) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    let names: Vec<String> = scenarios.iter().map(|s| s.name.clone()).collect();
    let queue: Arc<Mutex<VecDeque<usize>>> = Arc::new(Mutex::new(shard::longest_first(&names, durations).into()));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..jobs.clamp(1, scenarios.len().max(1)) {
        let (scenarios, queue, tx, options, interrupt) =
            (Arc::clone(&scenarios), Arc::clone(&queue), tx.clone(), Arc::clone(&options), interrupt.clone());
        std::thread::spawn(move || worker(&scenarios, &queue, &tx, &*options, &interrupt));
    }
    rx
}

fn worker(
    scenarios: &[Scenario],
    queue: &Mutex<VecDeque<usize>>,
    tx: &tokio::sync::mpsc::UnboundedSender<Event>,
    options: &OptionsFor,
    interrupt: &Interrupt,
) {
    let next = || {
        if interrupt.is_triggered() {
            return None;
        }
        queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    };
    while let Some(index) = next() {
        let s = &scenarios[index];
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.send(Event::Lost { index, why: format!("could not start a runtime: {e}") });
                continue;
            }
        };
        let _ = tx.send(Event::Started { index });
        let opts = options(s);
        let mut say = |what: &str| {
            let _ = tx.send(Event::Step { what: what.to_owned() });
        };
        // A panic is a bug; it loses this scenario's report, not the run's other scenarios,
        // and the machines of the scenario are stopped by their guards as it unwinds.
        let ran =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(scenario::run(s, &opts, &mut say))));
        // The runtime goes (and with it anything the scenario left spawned) before the next.
        drop(rt);
        let _ = tx.send(match ran {
            Ok(report) => Event::Finished { index, report: Box::new(report) },
            Err(p) => {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                Event::Lost { index, why: format!("the run panicked: {why}") }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::default_jobs;

    #[test]
    fn cores_and_memory_bound_the_default() {
        // Memory to spare: one per core.
        assert_eq!(default_jobs(2, Some(22_000), 1_800), 2);
        assert_eq!(default_jobs(16, Some(64_000), 900), 16);
        // Memory for three of the largest scenario, on eight cores.
        assert_eq!(default_jobs(8, Some(3 * 2_700 + 100), 2_700), 3);
        // Never below one, whatever the memory; unknown memory leaves the cores.
        assert_eq!(default_jobs(4, Some(500), 2_700), 1);
        assert_eq!(default_jobs(4, None, 2_700), 4);
        assert_eq!(default_jobs(0, None, 0), 1);
    }
}
