//! Fills most of a guest's RAM with data that neither QEMU's zero-page check nor any
//! dedup could shortcut: a 16 MiB random seed, then copies of it each shifted by a
//! different number of bytes (i * 257, distinct modulo the 4 KiB page size), so no two
//! pages are alike. It lives in a tmpfs, so it stays in RAM and travels with the state.
//!
//! `/dev/urandom` under TCG gives about 12 MB/s, `cat` from tmpfs to tmpfs about 250 MB/s
//! (measured here), so the seed is small and the copies do the filling: ~6 s for 768 MiB.
//!
//! The script is plain busybox sh, so the same text runs through quiesce's own agent
//! client and through `virsh qemu-agent-command`.

/// Running [`script`] in a guest: it writes some hundreds of MiB from a shell under TCG, a
/// minute or two on a loaded host.
pub const FILL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// Size of the random seed, MiB; the fill is a whole number of these.
pub const SEED_MIB: u32 = 16;
/// Least left available to the guest kernel and qemu-ga, MiB (no swap: tmpfs pages stay).
pub const MIN_HEADROOM_MIB: u32 = 64;

/// What the fill leaves of the guest's available memory: an eighth of its RAM, at least
/// [`MIN_HEADROOM_MIB`].
pub fn headroom_mib(memory_mib: u32) -> u32 {
    (memory_mib / 8).max(MIN_HEADROOM_MIB)
}

/// What to ask for: three quarters of the guest's RAM.
pub fn target_mib(memory_mib: u32) -> u32 {
    memory_mib / 4 * 3
}

/// The guest-side script. It caps the fill by what the guest reports available less
/// `headroom_mib`, fills, and prints the MiB it wrote (the only thing on stdout).
pub fn script(target_mib: u32, headroom_mib: u32) -> String {
    format!(
        "set -e
want={target_mib}
avail=$(awk '/^MemAvailable:/ {{ print int($2 / 1024) }}' /proc/meminfo)
max=$((avail - {headroom_mib}))
[ \"$want\" -le \"$max\" ] || want=$max
copies=$((want / {SEED_MIB}))
[ \"$copies\" -ge 1 ] || {{ echo \"only $avail MiB available; nothing to fill\" >&2; exit 1; }}
mkdir -p /fill
mountpoint -q /fill || mount -t tmpfs -o size=$((copies * {SEED_MIB} + 16))m quiesce-fill /fill
dd if=/dev/urandom of=/fill/seed bs=1M count={SEED_MIB} 2>/dev/null
i=1
while [ $i -lt $copies ]; do
  {{ head -c $((i * 257)) /fill/seed; cat /fill/seed; }} > /fill/copy$i
  i=$((i + 1))
done
echo $((copies * {SEED_MIB}))
"
    )
}

/// The MiB the script reports having written.
pub fn parse_filled(stdout: &str) -> Option<u32> {
    stdout.trim().lines().last()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_for_three_quarters_and_reads_the_answer() {
        assert_eq!(target_mib(1024), 768);
        assert_eq!(target_mib(512), 384);
        assert_eq!((headroom_mib(1024), headroom_mib(256)), (128, 64));
        let s = script(768, 128);
        assert!(s.contains("want=768") && s.contains("avail - 128") && s.contains("i * 257"));
        assert_eq!(parse_filled("768\n"), Some(768));
        assert_eq!(parse_filled("garbage"), None);
    }

    #[test]
    fn shifts_are_distinct_per_page() {
        let mut seen: Vec<u32> = (1..64).map(|i| i * 257 % 4096).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 63);
    }
}
