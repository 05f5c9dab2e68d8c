//! What the per-scenario reports of a `quiesce run` say about booting: the VM-time spent in
//! steps that boot a VM, and, like for like from the same run, how long a restored VM took
//! to reach its agent by a cold boot and by loading a saved state. The second is what a
//! scenario VM started from a booted template would cost (issue 11's "booted template"),
//! measured before building one.

use std::path::Path;

use quiesce::report::ScenarioReport;

/// Steps that cold-boot a VM: a scenario's VMs (`boot and prepare`, which also makes and
/// mounts its data disks), and restores (`boot`, `boot until the agent answers`).
const BOOT_STEPS: [&str; 3] = ["boot", "boot and prepare", "boot until the agent answers"];
/// A restore that cold-boots: QEMU on the backup's disks, then the boot.
const COLD_RESTORE: [&str; 2] = ["launch from the backup's disks", "boot until the agent answers"];
/// A restore that loads a saved state: QEMU waiting for it, then the load.
const STATE_RESTORE: [&str; 2] = ["launch restore target", "load state (incoming migration)"];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootTimes {
    /// Seconds of the scenarios, summed.
    pub scenarios: f64,
    /// VM-seconds in [`BOOT_STEPS`] (VMs of one scenario boot at once).
    pub booting: f64,
    /// Each cold-booted restore, launch to agent (seconds).
    pub cold: Vec<f64>,
    /// Each saved-state restore, launch to loaded (seconds).
    pub loaded: Vec<f64>,
}

/// Adds `r`'s steps to `t`.
fn add(t: &mut BootTimes, r: &ScenarioReport) {
    t.scenarios += r.duration_ms / 1000.0;
    let secs = |s: &quiesce::timeline::Step| (s.end_ms - s.start_ms).max(0.0) / 1000.0;
    t.booting += r.steps.iter().filter(|s| BOOT_STEPS.contains(&s.name.as_str())).map(secs).sum::<f64>();
    // A restore's two steps come in order for the same VM: pair each launch with the next
    // step of that VM, and count the pair only when it is the second step of the kind.
    for (kind, out) in [(COLD_RESTORE, &mut t.cold), (STATE_RESTORE, &mut t.loaded)] {
        for (i, launch) in r.steps.iter().enumerate().filter(|(_, s)| s.name == kind[0]) {
            let next = r.steps[i + 1..].iter().find(|s| s.vm == launch.vm);
            if let Some(second) = next.filter(|s| s.name == kind[1]) {
                out.push(secs(launch) + secs(second));
            }
        }
    }
}

/// Reads every `*.json` report in `dir`; None if there is none.
pub fn read(dir: &Path) -> Option<BootTimes> {
    let mut t = BootTimes::default();
    let mut any = false;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        // A report that does not read is left out: these are the run's own, and what they
        // say is a figure of the benchmark, not a verdict.
        let Some(r) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<ScenarioReport>(&b).ok()) else {
            continue;
        };
        add(&mut t, &r);
        any = true;
    }
    any.then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_steps_and_both_kinds_of_restore_are_summed_from_a_report() {
        let r: ScenarioReport = serde_json::from_str(
            r#"{"scenario":"s","duration_ms":20000,"steps":[
              {"vm":"vm1","name":"boot and prepare","start_ms":0,"end_ms":6000,"outcome":"ok"},
              {"vm":"vm1-r","name":"launch from the backup's disks","start_ms":7000,"end_ms":7500,"outcome":"ok"},
              {"vm":"vm1-s","name":"launch restore target","start_ms":7000,"end_ms":7400,"outcome":"ok"},
              {"vm":"vm1-r","name":"boot until the agent answers","start_ms":7500,"end_ms":12500,"outcome":"ok"},
              {"vm":"vm1-s","name":"load state (incoming migration)","start_ms":7400,"end_ms":8000,"outcome":"ok"},
              {"vm":"vm2-s","name":"launch restore target","start_ms":9000,"end_ms":9400,"outcome":"ok"},
              {"vm":"vm2-s","name":"resume","start_ms":9400,"end_ms":9500,"outcome":"ok"}]}"#,
        )
        .unwrap();
        let mut t = BootTimes::default();
        add(&mut t, &r);
        assert_eq!(t.scenarios, 20.0);
        assert_eq!(t.booting, 11.0);
        assert_eq!(t.cold, [5.5]);
        // vm2-s's launch is followed by no load: not a pair.
        assert_eq!(t.loaded.len(), 1);
        assert!((t.loaded[0] - 1.0).abs() < 1e-9);
    }
}
