//! Draws a VM's timeline as inline SVG: one row per lane, a time axis, the freeze windows as
//! bands across every row, and a tooltip (`<title>`) on each bar. No script, no external
//! resource; colours come from the page's style sheet (classes `k-*` and `o-*`).

use std::fmt::Write;

use super::lanes::{Bar, Kind, Lane, VmTimeline};
use super::text::{duration, esc};
use crate::timeline::Outcome;

const WIDTH: f64 = 960.0;
/// Lane labels on the left; the plot to the right of them.
const PLOT_X0: f64 = 132.0;
const PLOT_X1: f64 = WIDTH - 12.0;
const AXIS_H: f64 = 22.0;
const LANE_H: f64 = 24.0;
const BAR_H: f64 = 16.0;
/// Bars shorter than this are drawn this wide, so that a 5 ms thaw still shows.
const MIN_BAR_W: f64 = 2.0;
/// About the width of one character of the 11 px labels.
const CHAR_W: f64 = 6.3;

/// The SVG of `t`. `paused` says the VM was paused before the job, so that an empty
/// downtime row says why it is empty.
pub fn timeline(t: &VmTimeline, paused: bool) -> String {
    let lanes: Vec<Lane> = Lane::ALL
        .into_iter()
        .filter(|l| matches!(l, Lane::Downtime | Lane::Steps) || t.lane(*l).next().is_some())
        .collect();
    let height = AXIS_H + LANE_H * lanes.len() as f64 + 6.0;
    let span = (t.to_ms - t.from_ms).max(1.0);
    let x = |ms: f64| PLOT_X0 + (ms - t.from_ms) / span * (PLOT_X1 - PLOT_X0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="timeline" data-vm="{vm}" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" aria-label="timeline of {vm}" xmlns="http://www.w3.org/2000/svg">"#,
        vm = esc(&t.vm)
    );
    axis(&mut s, span, height);
    // The guest's filesystems were frozen: a band across every row, behind the bars.
    for b in t.lane(Lane::FreezeWindow) {
        let (x0, w) = (x(b.start_ms), (x(b.end_ms) - x(b.start_ms)).max(MIN_BAR_W));
        let _ = write!(
            s,
            r#"<rect class="band" x="{x0:.1}" y="{AXIS_H}" width="{w:.1}" height="{:.1}"/>"#,
            height - AXIS_H
        );
    }
    for (i, lane) in lanes.iter().enumerate() {
        let y = AXIS_H + LANE_H * i as f64;
        let _ = write!(s, r#"<g class="lane" data-lane="{}">"#, lane.class());
        let _ =
            write!(s, r#"<text class="lane-label" x="4" y="{:.1}">{}</text>"#, y + LANE_H / 2.0 + 4.0, lane.label());
        let bars: Vec<&Bar> = t.lane(*lane).collect();
        if bars.is_empty() {
            let why = match lane {
                Lane::Downtime if paused => "none: the VM was paused before the backup",
                _ => "none recorded",
            };
            let _ = write!(
                s,
                r#"<text class="empty" x="{:.1}" y="{:.1}">{why}</text>"#,
                PLOT_X0 + 4.0,
                y + LANE_H / 2.0 + 4.0
            );
        }
        // A label goes beside its bar only where it hits no neighbour.
        let mut right = PLOT_X0;
        for (n, b) in bars.iter().enumerate() {
            let next = bars.get(n + 1).map(|nb| x(nb.start_ms)).unwrap_or(PLOT_X1).min(PLOT_X1);
            right = bar(&mut s, b, n, y, t.from_ms, &x, (right, next));
        }
        s.push_str("</g>");
    }
    s.push_str("</svg>");
    s
}

fn axis(s: &mut String, span: f64, height: f64) {
    let step = tick_step(span);
    let mut t = 0.0;
    while t <= span + step * 0.01 {
        let px = PLOT_X0 + t / span * (PLOT_X1 - PLOT_X0);
        // Ticks count from the axis start; seconds once the axis spans one.
        let label = if span >= 1000.0 { format!("{} s", t / 1000.0) } else { format!("{t} ms") };
        let _ = write!(
            s,
            r#"<line class="grid" x1="{px:.1}" y1="{y0}" x2="{px:.1}" y2="{height:.1}"/><text class="tick" x="{px:.1}" y="{ty}">{label}</text>"#,
            y0 = AXIS_H - 4.0,
            ty = AXIS_H - 8.0,
        );
        t += step;
    }
}

/// A round step (1, 2 or 5 times a power of ten, in ms) giving at most about 8 ticks.
fn tick_step(span_ms: f64) -> f64 {
    let mut magnitude = 1.0;
    loop {
        for m in [1.0, 2.0, 5.0] {
            if span_ms / (m * magnitude) <= 8.0 {
                return m * magnitude;
            }
        }
        magnitude *= 10.0;
    }
}

/// Draws `b` and its label, if one fits between `room.0` (where the last bar or label on
/// the row ended) and `room.1` (where the next bar starts); returns where this one ends.
fn bar(s: &mut String, b: &Bar, n: usize, y: f64, from_ms: f64, x: &dyn Fn(f64) -> f64, room: (f64, f64)) -> f64 {
    let x0 = x(b.start_ms);
    let w = (x(b.end_ms) - x0).max(MIN_BAR_W);
    let kind = match b.kind {
        Kind::Phase(i) => format!("k-phase{i}"),
        Kind::FreezeWindow => "k-freeze".into(),
        Kind::Stopped => "k-stopped".into(),
        Kind::FrozenDowntime => "k-frozen".into(),
        Kind::Copy => "k-copy".into(),
        Kind::Restore => "k-restore".into(),
        // Neighbouring steps alternate in shade, so that where one ends shows.
        Kind::Step => format!("k-step{}", n % 2),
    };
    let (outcome, said) = match &b.outcome {
        Outcome::Ok => ("o-ok", String::new()),
        Outcome::Failed { error } => ("o-failed", format!("\nfailed: {error}")),
        Outcome::Interrupted => ("o-interrupted", "\ninterrupted".to_owned()),
    };
    let by = y + (LANE_H - BAR_H) / 2.0;
    let _ = write!(
        s,
        r#"<rect class="bar {kind} {outcome}" x="{x0:.1}" y="{by:.1}" width="{w:.1}" height="{BAR_H}" rx="2"><title>{}</title></rect>"#,
        esc(&format!("{}: {} (from +{}){said}", b.name, duration(b.ms()), duration(b.start_ms - from_ms)))
    );
    let mut end = x0 + w;
    if let Some(label) = label(b) {
        let text_w = label.chars().count() as f64 * CHAR_W;
        // Inside the bar when it fits, else after it, else before it; a phase's name only
        // inside (the legend has them all).
        let inside = matches!(b.kind, Kind::Phase(_));
        let place = if text_w + 8.0 <= w {
            Some((x0 + 4.0, "in"))
        } else if !inside && x0 + w + 4.0 + text_w + 2.0 <= room.1 {
            end = x0 + w + 4.0 + text_w;
            Some((x0 + w + 4.0, "out"))
        } else if !inside && x0 - 4.0 - text_w - 2.0 >= room.0 {
            Some((x0 - 4.0 - text_w, "out"))
        } else {
            None
        };
        if let Some((lx, class)) = place {
            let ty = y + LANE_H / 2.0 + 4.0;
            let _ = write!(s, r#"<text class="bar-label {class}" x="{lx:.1}" y="{ty:.1}">{}</text>"#, esc(&label));
        }
    }
    end
}

/// The words on a bar: the phase's name, or how long the interval took. Steps and
/// restores have too many bars for words; their tooltips say it.
fn label(b: &Bar) -> Option<String> {
    match b.kind {
        Kind::Phase(0) | Kind::Phase(3) => Some(format!("{} {}", b.name, duration(b.ms()))),
        Kind::FreezeWindow | Kind::Stopped | Kind::Copy => Some(duration(b.ms())),
        Kind::FrozenDowntime => Some(format!("{} (freeze window)", duration(b.ms()))),
        Kind::Phase(_) | Kind::Restore | Kind::Step => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(lane: Lane, kind: Kind, name: &str, start_ms: f64, end_ms: f64) -> Bar {
        Bar { lane, kind, name: name.into(), start_ms, end_ms, outcome: Outcome::Ok }
    }

    #[test]
    fn draws_every_lane_with_bars_and_escapes_names() {
        let mut failed = bar(Lane::Steps, Kind::Step, "<b>copy</b>", 100.0, 200.0);
        failed.outcome = Outcome::Failed { error: "disk full & <gone>".into() };
        let t = VmTimeline {
            vm: "vm\"1".into(),
            from_ms: 0.0,
            to_ms: 1000.0,
            bars: vec![
                bar(Lane::Phases, Kind::Phase(0), "PrepareForSnapshot", 0.0, 400.0),
                bar(Lane::FreezeWindow, Kind::FreezeWindow, "freeze window", 100.0, 101.0),
                failed,
            ],
        };
        let svg = timeline(&t, false);
        assert!(svg.starts_with("<svg class=\"timeline\" data-vm=\"vm&quot;1\""), "{svg}");
        for lane in ["phases", "freeze-window", "downtime", "steps"] {
            assert!(svg.contains(&format!("data-lane=\"{lane}\"")), "{lane} missing: {svg}");
        }
        assert!(!svg.contains("data-lane=\"copy\""), "an empty copy lane is left out");
        assert!(svg.contains("none recorded"));
        assert!(
            svg.contains("o-failed")
                && svg.contains("&lt;b&gt;copy&lt;/b&gt;")
                && svg.contains("disk full &amp; &lt;gone&gt;")
        );
        assert!(!svg.contains("<b>"));
        // A 1 ms window on a 1 s axis is still drawn wide enough to see.
        assert!(svg.contains(&format!("width=\"{MIN_BAR_W:.1}\"")));
        assert!(svg.contains(">1 ms</text>"));
    }

    #[test]
    fn paused_vm_says_why_it_had_no_downtime() {
        let t = VmTimeline { vm: "vm1".into(), from_ms: 0.0, to_ms: 10.0, bars: vec![] };
        assert!(timeline(&t, true).contains("none: the VM was paused before the backup"));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(7.0), 1.0);
        assert_eq!(tick_step(900.0), 200.0);
        assert_eq!(tick_step(12_500.0), 2000.0);
        assert_eq!(tick_step(61_000.0), 10_000.0);
    }
}
