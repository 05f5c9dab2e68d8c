//! The summary of a run, one row per VM and method: the table `quiesce run` prints, and the
//! overview at the top of the HTML page.
//!
//! One row per VM, so that a set whose VMs used different methods shows each; and one per
//! method of a VM's rollback cycles (with how many cycles used it), so no cell holds a list.
//! The downtime of a Child VM Snapshot is its freeze window (the guest's writes held while
//! it kept running); the cell says so.

use super::lanes::{self, Kind, Lane};
use super::model::{ScenarioReport, Status, Vm};
use super::text::duration;
use crate::backup::Method;

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Empty on a scenario's second and later rows.
    pub scenario: String,
    pub status: Option<Status>,
    pub vm: String,
    pub method: String,
    pub downtime: String,
    pub save_mb_per_s: String,
    pub restore: String,
    /// The scenario's duration, on its first row.
    pub time: String,
}

pub const HEADERS: [&str; 8] = ["SCENARIO", "RESULT", "VM", "METHOD", "DOWNTIME", "SAVE MB/s", "RESTORE", "TIME"];

/// What the DOWNTIME column means, printed under the table.
pub const DOWNTIME_NOTE: &str = "DOWNTIME: Saved State, how long the VM was stopped; \
     Child VM Snapshot, the freeze window (the guest runs, its writes held).";

pub fn rows(reports: &[ScenarioReport]) -> Vec<Row> {
    let mut out = Vec::new();
    for r in reports {
        let first = out.len();
        let status = r.status();
        if status == Status::Skipped || r.vms.is_empty() {
            out.push(row(r, "-", "-".into()));
        }
        for vm in &r.vms {
            let restore = restore_cell(r, &vm.name);
            let mut methods: Vec<(Method, usize)> = Vec::new();
            for m in &vm.methods {
                match methods.iter_mut().find(|(x, _)| x == m) {
                    Some((_, n)) => *n += 1,
                    None => methods.push((*m, 1)),
                }
            }
            if methods.is_empty() {
                let mut rw = row(r, &vm.name, "-".into());
                rw.restore = restore.clone();
                out.push(rw);
            }
            let several = vm.methods.len() > 1;
            for (i, (m, n)) in methods.iter().enumerate() {
                let label = if several { format!("{} ×{n}", m.as_str()) } else { m.as_str().to_owned() };
                let mut rw = row(r, &vm.name, label);
                rw.downtime = downtime_cell(r, vm, *m, several);
                rw.save_mb_per_s = match (m, &vm.timings) {
                    (Method::SavedState, Some(t)) if !several => {
                        t.save_mb_per_s.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
                    }
                    _ => "-".into(),
                };
                if i == 0 {
                    rw.restore = restore.clone();
                }
                out.push(rw);
            }
        }
        // The scenario, its result and its time, on its first row only.
        for (i, rw) in out.iter_mut().enumerate().skip(first) {
            if i > first {
                rw.scenario.clear();
                rw.status = None;
                rw.time.clear();
            }
        }
    }
    out
}

fn row(r: &ScenarioReport, vm: &str, method: String) -> Row {
    Row {
        scenario: r.scenario.clone(),
        status: Some(r.status()),
        vm: vm.to_owned(),
        method,
        downtime: "-".into(),
        save_mb_per_s: "-".into(),
        restore: "-".into(),
        time: if r.status() == Status::Skipped { "-".into() } else { format!("{:.1}s", r.duration_ms / 1000.0) },
    }
}

/// The downtime of `vm`'s backups by `method`. One backup: from its timings. Several
/// (rollback cycles): the range over their timeline intervals.
fn downtime_cell(r: &ScenarioReport, vm: &Vm, method: Method, several: bool) -> String {
    if !several {
        if let Some(t) = &vm.timings {
            return match method {
                Method::ChildSnapshot => t.freeze_window_ms.map(|ms| format!("{} (freeze)", duration(ms))),
                Method::SavedState if vm.state_before == "paused" => Some("none (paused)".into()),
                Method::SavedState => t.downtime_ms.map(duration),
            }
            .unwrap_or_else(|| "-".into());
        }
    }
    let kind = match method {
        Method::ChildSnapshot => Kind::FrozenDowntime,
        Method::SavedState => Kind::Stopped,
    };
    let t = lanes::of_vm(r, &vm.name);
    let ms: Vec<f64> = t.lane(Lane::Downtime).filter(|b| b.kind == kind).map(|b| b.ms()).collect();
    let suffix = if method == Method::ChildSnapshot { " (freeze)" } else { "" };
    match range(&ms) {
        None if method == Method::SavedState && vm.state_before == "paused" => "none (paused)".into(),
        None => "-".into(),
        Some((lo, hi)) if ms.len() == 1 || duration(lo) == duration(hi) => format!("{}{suffix}", duration(lo)),
        Some((lo, hi)) => format!("{}–{}{suffix}", duration(lo), duration(hi)),
    }
}

/// The restore times of `vm`: one, or the range and how many.
fn restore_cell(r: &ScenarioReport, vm: &str) -> String {
    let ms: Vec<f64> = r.restores_of(vm).map(|x| x.restore_ms).collect();
    match range(&ms) {
        None => "-".into(),
        Some((lo, _)) if ms.len() == 1 => duration(lo),
        Some((lo, hi)) => format!("{}–{} ({})", duration(lo), duration(hi), ms.len()),
    }
}

fn range(v: &[f64]) -> Option<(f64, f64)> {
    let lo = v.iter().copied().reduce(f64::min)?;
    let hi = v.iter().copied().reduce(f64::max)?;
    Some((lo, hi))
}

/// The table as text, its columns as wide as their widest cell.
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.clone(),
                r.status.map(result_word).unwrap_or_default().into(),
                r.vm.clone(),
                r.method.clone(),
                r.downtime.clone(),
                r.save_mb_per_s.clone(),
                r.restore.clone(),
                r.time.clone(),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for c in &cells {
        for (w, cell) in widths.iter_mut().zip(c) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Numbers are right-aligned, words left.
    let right = [false, false, false, false, true, true, true, true];
    let line = |c: &[String]| {
        let mut s = String::new();
        for (i, cell) in c.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            if i > 0 {
                s.push_str("  ");
            }
            if right[i] {
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(pad));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(&HEADERS.map(String::from));
    for c in &cells {
        out.push_str(&line(c));
    }
    out
}

/// The RESULT column: short, and a failure in capitals so it stands out in a log.
pub fn result_word(s: Status) -> &'static str {
    match s {
        Status::Passed => "pass",
        Status::Failed => "FAIL",
        Status::Skipped => "skip",
    }
}

/// `N passed, N failed, N skipped`: the closing line CI log readers look for.
pub fn counts(reports: &[ScenarioReport]) -> String {
    let n = |s: Status| reports.iter().filter(|r| r.status() == s).count();
    format!("{} passed, {} failed, {} skipped", n(Status::Passed), n(Status::Failed), n(Status::Skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> ScenarioReport {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_set_gets_a_row_per_vm_with_its_own_method_and_downtime() {
        let r = parse(
            r#"{"scenario":"set","passed":true,"duration_ms":61000,
            "vms":[{"name":"web","state_before":"running","method":"child-snapshot","timings":{"freeze_window_ms":312,"downtime_ms":null,"capture_ms":1}},
                   {"name":"batch","state_before":"paused","method":"saved-state","timings":{"downtime_ms":null,"save_mb_per_s":95.2,"capture_ms":1}},
                   {"name":"db","state_before":"running","method":"saved-state","timings":{"downtime_ms":812,"save_mb_per_s":88,"capture_ms":1}}],
            "restores":[{"vm":"web","restore_ms":3000},{"vm":"batch","restore_ms":1500}]}"#,
        );
        let rows = rows(&[r]);
        let got: Vec<(&str, &str, &str, &str, &str)> = rows
            .iter()
            .map(|r| {
                (r.vm.as_str(), r.method.as_str(), r.downtime.as_str(), r.save_mb_per_s.as_str(), r.restore.as_str())
            })
            .collect();
        assert_eq!(
            got,
            [
                ("web", "child-snapshot", "312 ms (freeze)", "-", "3.00 s"),
                ("batch", "saved-state", "none (paused)", "95", "1.50 s"),
                ("db", "saved-state", "812 ms", "88", "-"),
            ]
        );
        assert_eq!(
            (rows[0].scenario.as_str(), rows[0].status, rows[0].time.as_str()),
            ("set", Some(Status::Passed), "61.0s")
        );
        assert!(rows[1..].iter().all(|r| r.scenario.is_empty() && r.status.is_none() && r.time.is_empty()));
    }

    #[test]
    fn rollback_methods_get_a_row_each_with_their_downtime_range() {
        let step = |name: &str, start: f64, end: f64| {
            format!(r#"{{"vm":"vm1","name":"{name}","start_ms":{start},"end_ms":{end},"outcome":"ok"}}"#)
        };
        let steps = [
            step("freeze", 0.0, 10.0),
            step("thaw", 100.0, 110.0),
            step("stop", 1000.0, 1010.0),
            step("return to prior state", 1800.0, 1900.0),
            step("freeze", 3000.0, 3010.0),
            step("thaw", 3200.0, 3250.0),
        ];
        let r = parse(&format!(
            r#"{{"scenario":"rollback","passed":true,"vms":[{{"name":"vm1","state_before":"running",
            "method":"child-snapshot, saved-state, child-snapshot"}}],"steps":[{}],
            "restores":[{{"vm":"vm1-restored-1","restore_ms":2000}},{{"vm":"vm1 (in place, cycle 1)","restore_ms":4000}}]}}"#,
            steps.join(",")
        ));
        let rows = rows(&[r]);
        let got: Vec<(&str, &str, &str)> =
            rows.iter().map(|r| (r.method.as_str(), r.downtime.as_str(), r.restore.as_str())).collect();
        assert_eq!(
            got,
            [("child-snapshot ×2", "110 ms–250 ms (freeze)", "2.00 s–4.00 s (2)"), ("saved-state ×1", "900 ms", "-")]
        );
        let text = table(&rows);
        assert!(text.lines().all(|l| !l.contains(", ")), "no cell holds a list: {text}");
        // Every row's METHOD cell starts in the header's column: the columns hold.
        let col = text.lines().next().unwrap().find("METHOD").unwrap();
        for l in text.lines() {
            assert!(l.as_bytes()[col - 1] == b' ' && l.as_bytes()[col] != b' ', "{text}");
        }
    }

    #[test]
    fn skipped_and_failed_scenarios_have_a_row_and_count() {
        let skipped = parse(r#"{"scenario":"win","passed":false,"skipped":"no Windows image"}"#);
        let failed = parse(r#"{"scenario":"bad","passed":false,"vms":[{"name":"vm1","method":null}]}"#);
        let rows = rows(&[skipped.clone(), failed.clone()]);
        assert_eq!(rows.iter().map(|r| r.status).collect::<Vec<_>>(), [Some(Status::Skipped), Some(Status::Failed)]);
        let text = table(&rows);
        assert!(text.contains("skip") && text.contains("FAIL"), "{text}");
        assert_eq!(counts(&[skipped, failed]), "0 passed, 1 failed, 1 skipped");
    }
}
