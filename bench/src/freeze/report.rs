//! The freeze-window benchmark's report: every run's parts of the window, then the ratios
//! against libvirt (or the bare baseline) beside their goals.

use super::{LibvirtOutcome, Report, Series, DATA_DISK_BYTES, GOAL_HOST, GOAL_WINDOW, MEMORY_MIB};
use crate::stats::{goal, median};

fn ms_runs(xs: &[f64]) -> String {
    let v: Vec<String> = xs.iter().map(|x| format!("{x:.1}")).collect();
    format!("[{}]", v.join(" "))
}

pub(super) fn disks_label(n: usize) -> String {
    if n == 1 {
        "1 disk (root)".to_owned()
    } else {
        format!("{n} disks (root + {} data)", n - 1)
    }
}

pub(super) fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "quiesce-bench freeze-window: {}, QEMU {}, {} runs each, medians", r.accel, r.qemu, r.rounds);
    let _ = writeln!(
        s,
        "guest: the test guest, {MEMORY_MIB} MiB, 1 vCPU; ext4 root on vda; data disks: {} MiB qcow2, ext4, \
         mounted at /mnt/dataN",
        DATA_DISK_BYTES >> 20
    );
    let _ = writeln!(s, "disk images and overlays in: {}", r.files);
    let _ = writeln!(s);
    let _ = writeln!(s, "raw numbers: median, then every run (ms)");
    let line = |s: &mut String, what: &str, xs: &[f64]| {
        if !xs.is_empty() {
            let _ = writeln!(s, "  {what:<60} {:>7.1}  {}", median(xs), ms_runs(xs));
        }
    };
    let parts = |s: &mut String, who: &str, x: &Series| {
        line(s, &format!("{who}: freeze window (freeze sent .. thaw returned)"), &x.window);
        line(s, &format!("{who}:   guest's freeze (freeze sent .. returned)"), &x.freeze);
        line(s, &format!("{who}:   host share (freeze returned .. thaw sent)"), &x.host);
        line(s, &format!("{who}:   thaw (sent .. returned)"), &x.thaw);
    };
    for c in &r.cases {
        let _ = writeln!(s, " {}", disks_label(c.disks));
        parts(&mut s, "ours", &c.ours);
        line(&mut s, "ours: PrepareForSnapshot (overlays, freeze, transaction, thaw)", &c.ours.whole);
        parts(&mut s, "bare", &c.bare);
        match &c.libvirt {
            LibvirtOutcome::Done(l) => {
                line(&mut s, "libvirt: virsh snapshot-create-as (whole command)", &l.series.whole);
                if l.series.window.is_empty() {
                    let _ =
                        writeln!(s, "  libvirt: freeze window: not measured (libvirtd was not started here, no log)");
                }
                parts(&mut s, "libvirt", &l.series);
            }
            LibvirtOutcome::Skipped => {
                let _ = writeln!(s, "  libvirt: skipped (--no-libvirt)");
            }
            LibvirtOutcome::Failed(why) => {
                let _ = writeln!(s, "  libvirt: not measured: {why}");
            }
        }
        let frozen = |f: Option<u64>| f.map_or("?".to_owned(), |n| n.to_string());
        let lv_frozen = match &c.libvirt {
            LibvirtOutcome::Done(l) => format!(", libvirt's {}", frozen(l.frozen)),
            _ => String::new(),
        };
        let _ = writeln!(s, "  filesystems frozen (the freeze's reply): our guest {}{lv_frozen}", frozen(c.frozen));
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "ratios (medians)");
    let ratio = |s: &mut String, label: &str, what: String, x: f64, goal_text: Option<String>| {
        let what = format!("{label}: {what}");
        let _ = writeln!(s, "  {what:<62} {x:>6.3}{}", goal_text.map(|g| format!("  ({g})")).unwrap_or_default());
    };
    for c in &r.cases {
        let label = disks_label(c.disks);
        let (base, name) = match &c.libvirt {
            LibvirtOutcome::Done(l) if !l.series.window.is_empty() => (&l.series, "libvirt's"),
            _ => (&c.bare, "bare's"),
        };
        let host = median(&c.ours.host) / median(&base.host);
        let window = median(&c.ours.window) / median(&base.window);
        let host_goal = format!("goal <= {GOAL_HOST}: {}", goal(host <= GOAL_HOST));
        let window_goal = format!("goal < {GOAL_WINDOW}: {}", goal(window < GOAL_WINDOW));
        ratio(&mut s, &label, format!("our host share / {name} host share"), host, Some(host_goal));
        ratio(&mut s, &label, format!("our window / {name} window"), window, Some(window_goal));
    }
    if r.cases.iter().any(|c| matches!(c.libvirt, LibvirtOutcome::Done(_))) {
        let _ = writeln!(s, "  for reference:");
    }
    for c in &r.cases {
        let label = disks_label(c.disks);
        if let LibvirtOutcome::Done(l) = &c.libvirt {
            if !l.series.window.is_empty() {
                let host = median(&c.ours.host) / median(&c.bare.host);
                let window = median(&c.ours.window) / median(&c.bare.window);
                ratio(&mut s, &label, "our host share / bare's host share".into(), host, None);
                ratio(&mut s, &label, "our window / bare's window".into(), window, None);
            }
            let whole = median(&c.ours.whole) / median(&l.series.whole);
            ratio(&mut s, &label, "our PrepareForSnapshot / virsh's whole command".into(), whole, None);
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "notes:");
    let _ = writeln!(
        s,
        "  ours: overlays are made and added before the freeze; freeze; one transaction of blockdev-snapshot; \
         thaw.\n  bare: freeze; one transaction of blockdev-snapshot-sync (QEMU creates every overlay while the \
         guest is frozen); thaw;\n  on the same guest as ours. Both merge back with an active block-commit after \
         each run."
    );
    let lv_ran = r.libvirt_how.is_some();
    let _ = writeln!(
        s,
        "  Each round runs ours, bare{} back to back, in a rotating order{}.\n  Before the rounds, each guest \
         is frozen and thawed once, untimed (its first freeze after boot is slower).",
        if lv_ran { " and libvirt" } else { "" },
        if lv_ran { "; the guest not being measured sits idle" } else { "" },
    );
    if let Some(how) = &r.libvirt_how {
        let _ = writeln!(
            s,
            "  libvirt: window and its parts from libvirtd's log (millisecond stamps), where only qemu.qemu_agent \
             is at debug level\n  (a few lines per agent command; the monitor is not logged). After each run, every \
             disk's new overlay is merged into\n  the image under it with `virsh blockcommit --active --shallow --pivot` \
             and removed, so each run starts from the same chains.\n  The whole command includes starting virsh and \
             connecting.\n  libvirt guest: same kernel, initrd, cmdline, root.img (raw) under a qcow2 overlay, data \
             disks from the same seeds, RAM, vCPU,\n  virtio-blk serials and agent channel.\n  libvirt: {how}"
        );
    }
    if let Some(why) = &r.cleanup {
        let _ = writeln!(s, "  WARNING: libvirt's clean-up failed: {why}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::{Case, LibvirtCase};
    use super::*;

    fn series(window: f64, host: f64) -> Series {
        Series {
            window: vec![window; 3],
            freeze: vec![window - host - 5.0; 3],
            host: vec![host; 3],
            thaw: vec![5.0; 3],
            whole: vec![window * 2.0; 3],
        }
    }

    fn report(libvirt: LibvirtOutcome) -> Report {
        Report {
            accel: "TCG".into(),
            qemu: "10.0.2".into(),
            rounds: 3,
            files: "/tmp/x (ext4 on /dev/vda at /)".into(),
            cases: vec![
                Case {
                    disks: 1,
                    ours: series(40.0, 2.0),
                    bare: series(60.0, 20.0),
                    frozen: Some(1),
                    libvirt: libvirt.clone(),
                },
                Case { disks: 4, ours: series(200.0, 30.0), bare: series(250.0, 80.0), frozen: Some(4), libvirt },
            ],
            libvirt_how: None,
            cleanup: None,
        }
    }

    #[test]
    fn report_prints_both_ratios_for_both_disk_counts_with_goals() {
        let l = LibvirtCase { series: series(100.0, 40.0), frozen: Some(1) };
        let text = render(&report(LibvirtOutcome::Done(l)));
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "1 disk (root): our host share / libvirt's host share 0.050 (goal <= 0.25: goal met)",
            "1 disk (root): our window / libvirt's window 0.400 (goal < 1: goal met)",
            "4 disks (root + 3 data): our host share / libvirt's host share 0.750 (goal <= 0.25: goal missed)",
            "4 disks (root + 3 data): our window / libvirt's window 2.000 (goal < 1: goal missed)",
            "1 disk (root): our host share / bare's host share 0.100",
            "our PrepareForSnapshot / virsh's whole command 0.400",
            "filesystems frozen (the freeze's reply): our guest 4, libvirt's 1",
        ] {
            assert!(flat.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn without_libvirt_the_goals_are_against_the_bare_baseline() {
        let text = render(&report(LibvirtOutcome::Failed("libvirt is not installed".into())));
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains("libvirt: not measured: libvirt is not installed"), "{text}");
        assert!(
            flat.contains("1 disk (root): our host share / bare's host share 0.100 (goal <= 0.25: goal met)"),
            "{text}"
        );
        assert!(
            flat.contains("4 disks (root + 3 data): our window / bare's window 0.800 (goal < 1: goal met)"),
            "{text}"
        );
        let text = render(&report(LibvirtOutcome::Skipped));
        assert!(text.contains("skipped (--no-libvirt)"), "{text}");
    }
}
