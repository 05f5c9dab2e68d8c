//! What every benchmark's report uses: medians, runs as printed, goals, and the filesystem a
//! measurement was taken on.

use std::path::Path;

/// The middle value (mean of the two middle ones for an even count); NaN for none.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// [`median`] of byte counts, rounded.
pub fn median_u64(xs: &[u64]) -> u64 {
    median(&xs.iter().map(|&x| x as f64).collect::<Vec<_>>()).round() as u64
}

/// Every run, as printed after the median: `[0.500 0.400 0.600]`.
pub fn runs(xs: &[f64]) -> String {
    let v: Vec<String> = xs.iter().map(|x| format!("{x:.3}")).collect();
    format!("[{}]", v.join(" "))
}

/// How a ratio stands against its goal, as printed beside it.
pub fn goal(met: bool) -> &'static str {
    if met {
        "goal met"
    } else {
        "goal missed"
    }
}

/// The 1-minute load average now (0 when it cannot be read).
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

/// "ext4 on /dev/vda at /": the filesystem holding `path`, from /proc/self/mounts.
pub fn filesystem_of(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| (f[0], f[1].replace("\\040", " "), f[2]))
        })
        .filter(|(_, mnt, _)| path.starts_with(mnt))
        .max_by_key(|(_, mnt, _)| mnt.len())
        .map(|(dev, mnt, ty)| format!("{ty} on {dev} at {mnt}"))
        .unwrap_or_else(|| "filesystem unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median_u64(&[10, 30, 20]), 20);
    }

    #[test]
    fn runs_and_the_root_filesystem() {
        assert_eq!(runs(&[0.5, 0.25]), "[0.500 0.250]");
        assert!(filesystem_of(Path::new("/")).ends_with(" at /"));
    }
}
