//! The page: `index.html`, the one file to open after a run. Self-contained: its style is
//! inline, its timelines are inline SVG, it loads no font, script or image, and its
//! Content-Security-Policy forbids any (so text that slipped through unescaped still could
//! not fetch or run anything). Every piece of text is escaped.

use std::fmt::Write;

use super::lanes::{self, Kind, Lane, PHASES};
use super::model::{FirstFailure, ScenarioReport, Status, Vm};
use super::summary::{self, DOWNTIME_NOTE};
use super::text::{duration, esc, href};
use super::{svg, Entry};
use crate::backup::conditions::Outcome as ConditionOutcome;
use crate::backup::Method;

const STYLE: &str = include_str!("page.css");

/// The files a machine's evidence folder holds, as `qemu::evidence` writes them.
const EVIDENCE_FILES: [(&str, &str); 5] = [
    ("why.txt", "why"),
    ("serial.log", "serial log"),
    ("transcript.log", "QMP and agent transcript"),
    ("qemu.out", "QEMU's output"),
    ("cmdline.sh", "command line"),
];

pub fn page(entries: &[Entry]) -> String {
    let reports: Vec<ScenarioReport> = entries.iter().map(|e| e.report.clone()).collect();
    let ids = ids(&reports);
    let mut s = String::with_capacity(64 * 1024);
    s.push_str(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        "<title>quiesce report</title><style>"
    ));
    s.push_str(STYLE);
    s.push_str("</style></head><body>");
    header(&mut s, &reports);
    s.push_str("<main>");
    overview(&mut s, &reports, &ids);
    for (e, id) in entries.iter().zip(&ids) {
        scenario(&mut s, e, id);
    }
    s.push_str("</main></body></html>\n");
    s
}

/// An element id per scenario: its name with anything but letters, digits, `-` and `_`
/// replaced, made unique.
fn ids(reports: &[ScenarioReport]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        let clean: String = r
            .scenario
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
            .collect();
        let mut id = format!("s-{clean}");
        if out.contains(&id) {
            id = format!("{id}-{i}");
        }
        out.push(id);
    }
    out
}

fn header(s: &mut String, reports: &[ScenarioReport]) {
    let n = |st: Status| reports.iter().filter(|r| r.status() == st).count();
    let mut qemu: Vec<&str> = reports.iter().map(|r| r.qemu_version.as_str()).filter(|v| !v.is_empty()).collect();
    qemu.sort();
    qemu.dedup();
    let mut accel: Vec<&str> = reports.iter().map(|r| r.accel.as_str()).filter(|v| !v.is_empty()).collect();
    accel.sort();
    accel.dedup();
    let total: f64 = reports.iter().map(|r| r.duration_ms).sum();
    let _ = write!(
        s,
        r#"<header class="top"><h1>quiesce report</h1><div class="totals"><span class="pill passed">{} passed</span><span class="pill failed">{} failed</span><span class="pill skipped">{} skipped</span></div><p class="env">{} scenarios in {} · QEMU {} · {} · quiesce {}</p></header>"#,
        n(Status::Passed),
        n(Status::Failed),
        n(Status::Skipped),
        reports.len(),
        duration(total),
        esc(&or_dash(&qemu.join(", "))),
        esc(&or_dash(&accel.join(", ").to_uppercase())),
        env!("CARGO_PKG_VERSION"),
    );
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn overview(s: &mut String, reports: &[ScenarioReport], ids: &[String]) {
    s.push_str(r#"<table class="overview"><thead><tr>"#);
    for h in ["Scenario", "Result", "VM", "Method", "Downtime", "Save MB/s", "Restore", "Time"] {
        let _ = write!(s, "<th>{h}</th>");
    }
    s.push_str("</tr></thead><tbody>");
    for (r, id) in reports.iter().zip(ids) {
        for row in summary::rows(std::slice::from_ref(r)) {
            let first = row.status.is_some();
            let _ = write!(s, r#"<tr class="{}">"#, if first { "first" } else { "more" });
            match row.status {
                Some(st) => {
                    let _ = write!(
                        s,
                        "<td><a href=\"#{id}\">{}</a></td><td><span class=\"pill {c}\">{c}</span></td>",
                        esc(&row.scenario),
                        c = st.as_str()
                    );
                }
                None => s.push_str("<td></td><td></td>"),
            }
            let _ = write!(
                s,
                r#"<td>{}</td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td></tr>"#,
                esc(&row.vm),
                esc(&row.method),
                esc(&row.downtime),
                esc(&row.save_mb_per_s),
                esc(&row.restore),
                esc(&row.time)
            );
        }
    }
    let _ = write!(s, r#"</tbody></table><p class="note">{}</p>"#, esc(DOWNTIME_NOTE));
}

fn scenario(s: &mut String, e: &Entry, id: &str) {
    let r = &e.report;
    let st = r.status().as_str();
    let _ = write!(
        s,
        r#"<section class="scenario" id="{id}" data-status="{st}"><div class="head"><span class="pill {st}">{st}</span><h2>{}</h2><span class="meta">{}</span></div>"#,
        esc(&r.scenario),
        if r.status() == Status::Skipped { String::new() } else { duration(r.duration_ms) },
    );
    if !r.description.is_empty() {
        let _ = write!(s, r#"<p class="description">{}</p>"#, esc(&r.description));
    }
    if let Some(why) = &r.skipped {
        let _ = write!(s, r#"<div class="skip-reason"><strong>Skipped:</strong> {}</div>"#, esc(why));
    }
    if let Some(first) = r.first_failure() {
        problem(s, r, &first, e);
    }
    if let Some(f) = &r.failure {
        let _ = write!(s, r#"<p class="expected">The backup failed as the scenario expects: {}.</p>"#, esc(f));
    }
    links(s, e);
    for vm in &r.vms {
        vm_card(s, r, vm);
    }
    checks(s, r);
    differences(s, r);
    if !r.excluded.is_empty() {
        s.push_str(r#"<h3>Disks left out of the backup</h3><ul class="excluded">"#);
        for x in &r.excluded {
            let _ = write!(
                s,
                "<li>{}/{}: {} (found by {})</li>",
                esc(&x.vm),
                esc(&x.disk),
                esc(&x.advice),
                esc(&x.found_by)
            );
        }
        s.push_str("</ul>");
    }
    s.push_str("</section>");
}

fn problem(s: &mut String, r: &ScenarioReport, first: &FirstFailure<'_>, e: &Entry) {
    let _ = write!(
        s,
        r#"<div class="problem"><strong>First failure: {}</strong><pre>{}</pre>"#,
        esc(&first.headline()),
        esc(first.detail())
    );
    if e.evidence.is_empty() {
        s.push_str("<p>No machine failed, so no evidence folder was kept; the timeline and the checks below show what happened.</p>");
    }
    // The run's error too, when the first failure was a check.
    if let (FirstFailure::Check(_), Some(err)) = (first, &r.error) {
        let _ = write!(s, "<p>The run then stopped with an error:</p><pre>{}</pre>", esc(err));
    }
    s.push_str("</div>");
}

fn links(s: &mut String, e: &Entry) {
    let r = &e.report;
    let _ = write!(s, r#"<p class="links"><a href="{}">JSON report</a>"#, esc(&href(&format!("{}.json", r.scenario))));
    if let Some(b) = &r.backup_path {
        let _ = write!(s, " · backup kept in <code>{}</code>", esc(b));
    }
    s.push_str("</p>");
    if e.evidence.is_empty() {
        return;
    }
    s.push_str(r#"<div class="evidence"><h3>Evidence of failed machines</h3><ul>"#);
    for ev in &e.evidence {
        let dir = ev.dir.to_string_lossy();
        let name = ev.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let _ = write!(s, r#"<li><a href="{}/">{}</a>: "#, esc(&href(&dir)), esc(&name));
        let files: Vec<String> = EVIDENCE_FILES
            .iter()
            .map(|(f, what)| format!(r#"<a href="{}">{what}</a>"#, esc(&href(&format!("{dir}/{f}")))))
            .collect();
        s.push_str(&files.join(" · "));
        let _ = write!(s, "<pre>{}</pre></li>", esc(&ev.why));
    }
    s.push_str("</ul></div>");
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::SavedState => "Saved State",
        Method::ChildSnapshot => "Child VM Snapshot",
    }
}

fn vm_card(s: &mut String, r: &ScenarioReport, vm: &Vm) {
    let mut methods: Vec<(Method, usize)> = Vec::new();
    for m in &vm.methods {
        match methods.iter_mut().find(|(x, _)| x == m) {
            Some((_, n)) => *n += 1,
            None => methods.push((*m, 1)),
        }
    }
    let method = match methods.as_slice() {
        [] => "no backup".to_owned(),
        [(m, 1)] => method_name(*m).to_owned(),
        several => several.iter().map(|(m, n)| format!("{} ×{n}", method_name(*m))).collect::<Vec<_>>().join(", "),
    };
    let _ = write!(
        s,
        r#"<article class="vm" data-vm="{}"><h3>{} <span class="method">{}</span></h3>"#,
        esc(&vm.name),
        esc(&vm.name),
        esc(&method)
    );
    if let Some(why) = &vm.method_reason {
        let _ = write!(s, r#"<p class="reason">{}</p>"#, esc(why));
    }
    if !vm.conditions.is_empty() {
        s.push_str(r#"<ul class="conditions">"#);
        for (name, outcome) in &vm.conditions {
            let (class, mark) = match outcome {
                ConditionOutcome::Held => ("held", "✓"),
                ConditionOutcome::Failed => ("failed", "✗"),
                ConditionOutcome::NotChecked => ("not-checked", "–"),
            };
            let _ = write!(s, r#"<li class="{class}" title="{class}">{mark} {}</li>"#, esc(name));
        }
        s.push_str("</ul>");
    }
    facts(s, r, vm);
    let t = lanes::of_vm(r, &vm.name);
    if !t.bars.is_empty() {
        s.push_str(&svg::timeline(&t, vm.state_before == "paused"));
        legend(s, &t);
    }
    s.push_str("</article>");
}

fn facts(s: &mut String, r: &ScenarioReport, vm: &Vm) {
    let mut f: Vec<(String, String)> = Vec::new();
    let after = vm.state_after_backup.as_deref().unwrap_or("-");
    f.push(("state before → after backup".into(), format!("{} → {after}", or_dash(&vm.state_before))));
    // Rollback cycles keep the timings of their first backup only; say so.
    let of = if vm.methods.len() > 1 { "first backup: " } else { "" };
    if let Some(t) = &vm.timings {
        let mut add = |k: &str, v: String| f.push((format!("{of}{k}"), v));
        if let Some(ms) = t.freeze_window_ms {
            add("downtime: the freeze window", duration(ms));
        }
        if let Some(ms) = t.freeze_host_ms {
            add("host's share of the window", duration(ms));
        }
        match t.downtime_ms {
            Some(ms) => add("downtime: VM stopped", duration(ms)),
            None if vm.state_before == "paused" => add("downtime", "none (paused)".into()),
            None => {}
        }
        if let (Some(ms), Some(rate)) = (t.save_ms, t.save_mb_per_s) {
            add("state saved", format!("{} at {rate:.0} MB/s", duration(ms)));
        }
        add("disks copied", duration(t.capture_ms));
        if let Some(ms) = t.merge_ms {
            add("overlays merged", duration(ms));
        }
    }
    for x in r.restores_of(&vm.name) {
        f.push(("restored".into(), format!("{} ({}, {})", duration(x.restore_ms), x.vm, x.state_after_restore)));
    }
    if let Some(j) = &vm.journal {
        f.push(("journal lines lost".into(), j.lost.to_string()));
    }
    s.push_str(r#"<dl class="facts">"#);
    for (k, v) in f {
        let _ = write!(s, "<div><dt>{}</dt><dd>{}</dd></div>", esc(&k), esc(&v));
    }
    s.push_str("</dl>");
}

/// What the colours mean, with each phase's length (the bars of the short ones are too
/// narrow for words).
fn legend(s: &mut String, t: &lanes::VmTimeline) {
    s.push_str(r#"<p class="legend">"#);
    for (i, name) in PHASES.iter().enumerate() {
        let ms: Vec<f64> = t.lane(Lane::Phases).filter(|b| b.kind == Kind::Phase(i)).map(|b| b.ms()).collect();
        // Rollback cycles run a job each: the phase's total, and over how many jobs.
        let jobs = if ms.len() > 1 { format!(" in {} jobs", ms.len()) } else { String::new() };
        let total = duration(ms.iter().sum());
        let _ = write!(s, r#"<span><i class="sw k-phase{i}"></i>{name} {total}{jobs}</span>"#);
    }
    let swatches = [
        ("k-freeze", "freeze window"),
        ("k-stopped", "VM stopped"),
        ("k-copy", "copy"),
        ("k-restore", "restore"),
        ("o-failed", "failed step"),
    ];
    for (class, what) in swatches {
        let _ = write!(s, r#"<span><i class="sw {class}"></i>{what}</span>"#);
    }
    s.push_str(r#"<span class="hint">hover a bar for its step and times</span></p>"#);
}

fn checks(s: &mut String, r: &ScenarioReport) {
    if r.checks.is_empty() {
        return;
    }
    let failed = r.checks.iter().filter(|c| !c.passed).count();
    let _ = write!(
        s,
        r#"<details class="checks"{}><summary>Checks: {} passed, {failed} failed</summary><table><tbody>"#,
        if failed > 0 { " open" } else { "" },
        r.checks.len() - failed
    );
    for c in &r.checks {
        let (class, mark) = if c.passed { ("pass", "✓") } else { ("fail", "✗") };
        let _ = write!(
            s,
            r#"<tr class="{class}"><td class="mark">{mark}</td><td>{}</td><td>{}</td><td class="detail">{}</td></tr>"#,
            esc(&c.check),
            esc(if c.vm == "*" { "all" } else { &c.vm }),
            esc(&c.detail)
        );
    }
    s.push_str("</tbody></table></details>");
}

fn differences(s: &mut String, r: &ScenarioReport) {
    for m in r.manifests.iter().filter(|m| !m.differences.is_empty()) {
        let _ = write!(
            s,
            r#"<div class="differences"><h3>{}/{}: the restored disk differs from the backup point</h3><pre>{}</pre></div>"#,
            esc(&m.vm),
            esc(&m.disk),
            esc(&m.differences.join("\n"))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: &str) -> Entry {
        Entry { report: serde_json::from_str(json).unwrap(), evidence: vec![] }
    }

    #[test]
    fn untrusted_text_is_escaped_everywhere() {
        let evil = r#"<script>alert(1)</script><img src=x onerror=alert(2)>"#;
        let json = serde_json::json!({
            "scenario": evil, "description": evil, "passed": false, "error": evil,
            "vms": [{"name": evil, "method": "saved-state", "method_reason": evil, "conditions": [[evil, "held"]]}],
            "checks": [{"vm": evil, "check": evil, "passed": false, "detail": evil}],
            "manifests": [{"vm": evil, "disk": evil, "differences": [evil]}],
            "steps": [{"vm": evil, "name": evil, "start_ms": 0, "end_ms": 5, "outcome": {"failed": {"error": evil}}}],
        });
        let page = page(&[entry(&json.to_string())]);
        assert!(!page.contains("<script") && !page.contains("<img"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        // The id and the link are made of the name too, and stay inside their attribute.
        assert!(page.contains(r#"id="s--script-alert-1---script--img-src-x-onerror-alert-2--""#), "{page}");
        assert!(page.contains(r#"href="%3Cscript%3Ealert%281%29"#), "{page}");
    }

    #[test]
    fn needs_nothing_from_the_network() {
        let page = page(&[entry(r#"{"scenario":"a","passed":true}"#)]);
        assert!(page.contains("default-src 'none'"));
        for banned in ["http://", "https://", "<script", "<link", "@import", "url("] {
            let hits: Vec<_> = page.match_indices(banned).map(|(i, _)| &page[i..(i + 60).min(page.len())]).collect();
            // The SVG namespace is a name, not a fetch.
            assert!(hits.iter().all(|h| h.starts_with("http://www.w3.org/2000/svg")), "{banned}: {hits:?}");
        }
    }

    #[test]
    fn marks_each_scenario_with_its_status() {
        let page = page(&[
            entry(r#"{"scenario":"good","passed":true}"#),
            entry(
                r#"{"scenario":"bad","passed":false,"checks":[{"vm":"vm1","check":"same-boot","passed":false,"detail":"new boot"}]}"#,
            ),
            entry(r#"{"scenario":"win","passed":false,"skipped":"no Windows image"}"#),
        ]);
        assert!(page.contains(r#"id="s-good" data-status="passed""#));
        assert!(page.contains(r#"id="s-bad" data-status="failed""#));
        assert!(page.contains("First failure: check same-boot failed on vm1"));
        assert!(page.contains(r#"id="s-win" data-status="skipped""#) && page.contains("no Windows image"));
        assert!(page.contains(r#"<span class="pill passed">1 passed</span>"#));
    }

    #[test]
    fn duplicate_names_get_their_own_ids() {
        let a = entry(r#"{"scenario":"a b"}"#);
        let b = entry(r#"{"scenario":"a?b"}"#);
        assert_eq!(ids(&[a.report, b.report]), ["s-a-b", "s-a-b-1"]);
    }
}
