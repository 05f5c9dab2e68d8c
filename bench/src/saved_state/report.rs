//! The saved-state benchmark's report: raw numbers, then each ratio beside its goal.

use quiesce::backup::saved_state::Plan;

use super::ROUNDS;
use crate::stats::{goal, median, median_u64, runs};

/// Goals from the issue that asked for this benchmark.
const GOAL_VS_DEFAULTS: f64 = 5.0;
const GOAL_VS_LIBVIRT: f64 = 0.5;
const GOAL_VS_DD: f64 = 0.9;

/// Quiesce's own numbers, every round, in seconds (bytes where named so).
pub(super) struct Ours {
    pub(super) save: Vec<f64>,
    pub(super) save_bytes: Vec<u64>,
    pub(super) whole: Vec<f64>,
    pub(super) downtime: Vec<f64>,
    pub(super) capture: Vec<f64>,
    /// fdatasync of the state file once the backup has returned: what was left unwritten.
    pub(super) flush: Vec<f64>,
    pub(super) restore: Vec<f64>,
    /// The restore's `load state (incoming migration)` step.
    pub(super) load: Vec<f64>,
}

/// `virsh save` / `virsh restore`, every round.
pub(super) struct LibvirtNumbers {
    pub(super) how: String,
    pub(super) fill_mib: u32,
    pub(super) save: Vec<f64>,
    pub(super) restore: Vec<f64>,
    pub(super) bytes: Vec<u64>,
}

/// Whether libvirt was measured, and if not, why.
pub(super) enum LibvirtOutcome {
    Skipped,
    Failed(String),
    Done(LibvirtNumbers),
}

/// Everything the report prints.
pub(super) struct Report {
    pub(super) memory_mib: u32,
    pub(super) accel: String,
    pub(super) qemu: String,
    pub(super) plan: Plan,
    pub(super) max_bandwidth: u64,
    pub(super) work_dir: String,
    pub(super) fill_mib: u32,
    pub(super) fill_secs: f64,
    pub(super) default_bandwidth: Option<u64>,
    pub(super) defaults: Vec<f64>,
    pub(super) defaults_bytes: Vec<u64>,
    pub(super) ours: Ours,
    pub(super) dd_cmd: String,
    /// With conv=fsync.
    pub(super) dd: Vec<f64>,
    /// Without: the page cache only.
    pub(super) dd_cached: Vec<f64>,
    pub(super) dd_bytes: u64,
    pub(super) libvirt: LibvirtOutcome,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

pub(super) fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let o = &r.ours;
    let save = median(&o.save);
    let save_bytes = median_u64(&o.save_bytes);
    let mbps = |bytes: u64, secs: f64| bytes as f64 / 1e6 / secs;
    let ours_mbps = mbps(save_bytes, save);
    let dd_mbps = mbps(r.dd_bytes, median(&r.dd));
    let cached_mbps = mbps(r.dd_bytes, median(&r.dd_cached));
    let defaults = median(&r.defaults);
    let plan = match (r.plan.mapped_ram, r.plan.multifd_channels) {
        (true, Some(n)) => format!("mapped-ram + multifd ({n} channels)"),
        (true, None) => "mapped-ram, one channel".to_owned(),
        (false, _) => "stream format (no mapped-ram in this QEMU)".to_owned(),
    };
    let bw = |b: u64| format!("{:.0} MiB/s", mib(b));
    let _ = writeln!(s, "quiesce-bench saved-state: {} MiB guest, {}, QEMU {}", r.memory_mib, r.accel, r.qemu);
    let _ = writeln!(
        s,
        "guest RAM: {} MiB of random, non-repeating data in a tmpfs (filled in {:.1} s); {ROUNDS} rounds each, medians",
        r.fill_mib, r.fill_secs
    );
    let _ = writeln!(s, "work dir: {}", r.work_dir);
    let _ = writeln!(s, "ours: {plan}, max-bandwidth {}", bw(r.max_bandwidth));
    let _ = writeln!(s);
    let _ = writeln!(s, "raw numbers: median, then every run (seconds)");
    let line = |s: &mut String, what: &str, xs: &[f64], extra: String| {
        let _ = writeln!(s, "  {what:<42} {:>7.3} s  {}{extra}", median(xs), runs(xs));
    };
    line(
        &mut s,
        "ours: save state (migrate to file)",
        &o.save,
        format!("  {:.0} MiB, {ours_mbps:.0} MB/s", mib(save_bytes)),
    );
    line(&mut s, "ours: fdatasync of the state file, after", &o.flush, "  (what was still unwritten)".into());
    line(&mut s, "ours: whole backup (save + disk capture)", &o.whole, String::new());
    line(&mut s, "ours: guest downtime", &o.downtime, String::new());
    line(&mut s, "ours: disk capture (with verification)", &o.capture, String::new());
    line(&mut s, "ours: restore (QEMU launch to running)", &o.restore, String::new());
    line(&mut s, "ours: restore, of which loading the state", &o.load, String::new());
    line(&mut s, "dd, conv=fsync", &r.dd, format!("  {:.0} MiB, {dd_mbps:.0} MB/s", mib(r.dd_bytes)));
    line(
        &mut s,
        "dd, no fsync (page cache)",
        &r.dd_cached,
        format!("  {:.0} MiB, {cached_mbps:.0} MB/s", mib(r.dd_bytes)),
    );
    let _ = writeln!(s, "      {}", r.dd_cmd);
    let def_bw = r.default_bandwidth.map(bw).unwrap_or_else(|| "unknown".into());
    line(
        &mut s,
        "QEMU defaults: migrate to file:",
        &r.defaults,
        format!("  {:.0} MiB; max-bandwidth {def_bw}, stream format, live", mib(median_u64(&r.defaults_bytes))),
    );
    match &r.libvirt {
        LibvirtOutcome::Done(l) => {
            line(&mut s, "virsh save", &l.save, format!("  {:.0} MiB", mib(median_u64(&l.bytes))));
            line(&mut s, "virsh restore", &l.restore, String::new());
        }
        LibvirtOutcome::Skipped => {
            let _ = writeln!(s, "  virsh save / restore: skipped (--no-libvirt)");
        }
        LibvirtOutcome::Failed(why) => {
            let _ = writeln!(s, "  virsh save / restore: not measured: {why}");
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "ratios");
    let tp = ours_mbps / dd_mbps;
    let _ = writeln!(
        s,
        "  1. our save throughput / dd's (conv=fsync)     {tp:>6.2}x   (goal >= {GOAL_VS_DD}x: {})",
        goal(tp >= GOAL_VS_DD)
    );
    let _ = writeln!(
        s,
        "     for reference, our save / dd without fsync     {:>6.2}x   (both end in the page cache)",
        ours_mbps / cached_mbps
    );
    let faster = defaults / save;
    let _ = writeln!(
        s,
        "  2. our save time / QEMU defaults'              {:>6.3}    ({faster:.1}x faster; goal >= {GOAL_VS_DEFAULTS}x faster: {})",
        save / defaults,
        goal(faster >= GOAL_VS_DEFAULTS)
    );
    match &r.libvirt {
        LibvirtOutcome::Done(l) => {
            let sv = save / median(&l.save);
            let rs = median(&o.restore) / median(&l.restore);
            let _ = writeln!(
                s,
                "  3. our save time / virsh save's                {sv:>6.3}    (goal <= {GOAL_VS_LIBVIRT}: {})",
                goal(sv <= GOAL_VS_LIBVIRT)
            );
            let _ = writeln!(
                s,
                "     our restore time / virsh restore's          {rs:>6.3}    (goal <= {GOAL_VS_LIBVIRT}: {})",
                goal(rs <= GOAL_VS_LIBVIRT)
            );
            let _ = writeln!(
                s,
                "     for reference, our whole backup / virsh save   {:>6.3}    (both on disk when they return)",
                median(&o.whole) / median(&l.save)
            );
            let _ = writeln!(s);
            let _ = writeln!(s, "libvirt: {}", l.how);
            let _ = writeln!(
                s,
                "libvirt guest: same kernel, initrd and cmdline, qcow2 overlay over root.img (raw), {} MiB, 1 vCPU; \
                 filled with {} MiB the same way",
                r.memory_mib, l.fill_mib
            );
        }
        LibvirtOutcome::Skipped => {
            let _ = writeln!(s, "  3. vs virsh save / restore: skipped (--no-libvirt)");
        }
        LibvirtOutcome::Failed(why) => {
            let _ = writeln!(s, "  3. vs virsh save / restore: not measured: {why}");
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "notes: QEMU does not fsync a file: migration (checked with strace on 10.0.2), so our save step \
         ends in the page cache;\n  the backup's own fsyncs (capture, manifest) leave the state file on disk \
         when the whole backup returns (the fdatasync after it found {:.3} s of work).",
        median(&o.flush)
    );
    if matches!(r.libvirt, LibvirtOutcome::Done(_)) {
        let _ = writeln!(
            s,
            "  virsh save writes through libvirt_iohelper, which fdatasyncs the file before virsh returns."
        );
    }
    let _ = writeln!(s, "  Every measured file is removed (and the removal synced) before the next measurement.");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(libvirt: LibvirtOutcome) -> Report {
        Report {
            memory_mib: 1024,
            accel: "TCG".into(),
            qemu: "10.0.2".into(),
            plan: Plan { mapped_ram: true, multifd_channels: Some(2) },
            max_bandwidth: 1 << 40,
            work_dir: "/w (ext4 on /dev/vda at /)".into(),
            fill_mib: 768,
            fill_secs: 5.0,
            default_bandwidth: Some(128 << 20),
            defaults: vec![6.0, 6.2, 6.1],
            defaults_bytes: vec![800 << 20; 3],
            ours: Ours {
                save: vec![0.5, 0.6, 0.4],
                save_bytes: vec![800 << 20; 3],
                whole: vec![3.0; 3],
                downtime: vec![2.0; 3],
                capture: vec![1.0; 3],
                flush: vec![0.5; 3],
                restore: vec![1.0; 3],
                load: vec![0.5; 3],
            },
            dd_cmd: "dd ...".into(),
            dd: vec![1.0; 3],
            dd_cached: vec![0.25; 3],
            dd_bytes: 800 << 20,
            libvirt,
        }
    }

    #[test]
    fn report_prints_every_ratio_with_its_goal() {
        let l = LibvirtNumbers {
            how: "started by hand".into(),
            fill_mib: 768,
            save: vec![1.0; 3],
            restore: vec![3.0; 3],
            bytes: vec![800 << 20; 3],
        };
        let text = render(&report(LibvirtOutcome::Done(l)));
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "our save throughput / dd's (conv=fsync) 2.00x (goal >= 0.9x: goal met)",
            "our save / dd without fsync 0.50x",
            "our whole backup / virsh save 3.000",
            "our save time / QEMU defaults' 0.082 (12.2x faster; goal >= 5x faster: goal met)",
            "our save time / virsh save's 0.500 (goal <= 0.5: goal met)",
            "our restore time / virsh restore's 0.333 (goal <= 0.5: goal met)",
        ] {
            assert!(flat.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn report_says_why_libvirt_is_missing() {
        let text = render(&report(LibvirtOutcome::Failed("libvirt is not installed".into())));
        assert!(text.contains("3. vs virsh save / restore: not measured: libvirt is not installed"), "{text}");
        let text = render(&report(LibvirtOutcome::Skipped));
        assert!(text.contains("skipped (--no-libvirt)"), "{text}");
    }
}
