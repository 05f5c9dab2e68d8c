//! A small, time-bounded mutation fuzzer that runs in a plain test binary on stable Rust
//! (libFuzzer needs nightly). Each target starts from valid inputs (a real manifest, the
//! scenario files in scenarios/, recorded QMP and agent exchanges), mutates them with the
//! structure they have (JSON nodes, TOML lines, protocol lines) and sometimes byte by byte,
//! and checks properties: no panic (in any thread), memory within a bound, and what each
//! target says of its errors.
//!
//! Time: `QUIESCE_FUZZ_SECS` for all targets together (default 4; `ci/test.sh` gives 60),
//! shared equally. Every iteration draws from its own generator, seeded by
//! `QUIESCE_FUZZ_SEED` (default: the clock, printed) and its number, so a failure prints
//! the two variables that replay it alone (`QUIESCE_FUZZ_ITER`), and saves its input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// How many targets share the time budget (the `#[test]`s of this binary).
pub const TARGETS: u32 = 6;
/// One iteration taking longer than this is a failure: untrusted input must not make
/// quiesce work without bound either (a quadratic scan of a long line took minutes).
/// Generous, so that a loaded machine does not trip it.
const SLOW: Duration = Duration::from_secs(60);

/// At least this many iterations per target, however slow the machine: the targets'
/// checks on their statistics need a sample.
const MIN_ITERATIONS: u64 = 100;

/// Counts the bytes allocated now and the peak since [`measure`] began.
pub struct Counting;

static CURRENT: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size() as isize, Ordering::Relaxed) + layout.size() as isize;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            let delta = new_size as isize - layout.size() as isize;
            let now = CURRENT.fetch_add(delta, Ordering::Relaxed) + delta;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

/// The targets' turn: each test holds it from its first line to its last (a panic's
/// backtrace included, which allocates megabytes), so that [`measure`] sees one target.
pub fn turn() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` and returns what it returned and the most memory it held at once beyond what
/// was held when it began. Targets run one at a time ([`turn`]), so what other threads of
/// this binary allocate meanwhile is noise of a few KiB.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, (PEAK.load(Ordering::Relaxed) - base).max(0) as usize)
}

/// Panics anywhere in the process (a reader task of the QMP client included, whose panic
/// no caller would see), counted by a hook that then prints as usual.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

/// A small, fast generator (SplitMix64): reproducible from its seed, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// True once in `n` times.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    /// A length that is mostly small and sometimes large, up to `max`.
    pub fn len(&mut self, max: usize) -> usize {
        match self.below(10) {
            0..=6 => self.below(16.min(max) + 1),
            7 | 8 => self.below(1024.min(max) + 1),
            _ => self.below(max + 1),
        }
    }
}

/// Byte strings that parsers and path checks treat specially.
pub const TOKENS: &[&[u8]] = &[
    b"..",
    b"/",
    b"../",
    b"/etc/passwd",
    b"\\",
    b"\0",
    b"\xff",
    b"\xc3",
    b"\r",
    b"\n",
    b"\"",
    b"\\u0000",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"=",
    b"#",
    b"'''",
    b"\"\"\"",
    b"null",
    b"true",
    b"-1",
    b"1e309",
    b"18446744073709551616",
    b"4294967296",
    b"-0",
    b"NaN",
    b"inf",
    b"\xe2\x80\xae",
    b"\xf0\x9f\x92\xa9",
];

/// One byte-level change: flip, set, insert, delete, duplicate, truncate, a token, or a
/// run that makes the input huge (up to `huge` bytes).
pub fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, huge: usize) {
    let at = |rng: &mut Rng, data: &Vec<u8>| rng.below(data.len() + 1);
    match rng.below(9) {
        0 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] ^= 1 << rng.below(8);
        }
        1 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] = rng.next() as u8;
        }
        2 => {
            let i = at(rng, data);
            let n = rng.len(64);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            data.splice(i..i, bytes);
        }
        3 if !data.is_empty() => {
            let i = rng.below(data.len());
            let n = rng.len(data.len() - i);
            data.drain(i..i + n);
        }
        4 if !data.is_empty() => {
            let i = rng.below(data.len());
            let n = rng.len(data.len() - i).max(1);
            let chunk = data[i..i + n].to_vec();
            data.splice(i..i, chunk);
        }
        5 => {
            let n = rng.below(data.len() + 1);
            data.truncate(n);
        }
        6 | 7 => {
            let i = at(rng, data);
            let t = rng.pick(TOKENS);
            data.splice(i..i, t.iter().copied());
        }
        _ if !data.is_empty() && huge > data.len() => {
            // One chunk repeated until the input is large: long lines, long strings.
            let i = rng.below(data.len());
            let n = rng.len(data.len() - i).clamp(1, 64);
            let chunk = data[i..i + n].to_vec();
            let target = data.len() + rng.below(huge - data.len());
            let mut run = Vec::with_capacity(target);
            while run.len() + data.len() < target {
                run.extend_from_slice(&chunk);
            }
            data.splice(i..i, run);
        }
        _ => data.push(rng.next() as u8),
    }
}

/// True when one iteration is replayed (`QUIESCE_FUZZ_ITER`): a target's checks on its
/// statistics need a sample, and one iteration is none (a replayed input that fails to
/// parse would fail "nothing parsed").
pub fn replaying() -> bool {
    std::env::var("QUIESCE_FUZZ_ITER").is_ok_and(|v| !v.is_empty())
}

/// What one iteration showed, for the target's statistics ("ok", or the kind of error).
pub type Outcome = String;

/// Runs `body` over iterations until this target's share of the time is spent (and at
/// least [`MIN_ITERATIONS`] ran). `body` gets the iteration's generator and a buffer in
/// which to leave its input (saved if the iteration fails); it returns the outcome or a
/// broken property. Returns how often each outcome happened.
pub fn run(
    target: &str,
    mut body: impl FnMut(&mut Rng, &mut Vec<u8>) -> Result<Outcome, String>,
) -> BTreeMap<Outcome, u64> {
    count_panics();
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let secs: f64 = env("QUIESCE_FUZZ_SECS").and_then(|v| v.parse().ok()).unwrap_or(4.0);
    let seed: u64 = env("QUIESCE_FUZZ_SEED").and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let only: Option<u64> = env("QUIESCE_FUZZ_ITER").and_then(|v| v.parse().ok());
    let share = Duration::from_secs_f64(secs / f64::from(TARGETS));
    let started = Instant::now();
    let mut stats = BTreeMap::new();
    let mut input = Vec::new();
    let mut i = only.unwrap_or(0);
    loop {
        let mut rng = Rng::new(seed ^ i.wrapping_mul(0xA076_1D64_78BD_642F));
        input.clear();
        let panics = PANICS.load(Ordering::SeqCst);
        let began = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mut rng, &mut input)));
        let took = began.elapsed();
        let broken = match result {
            Ok(Ok(_)) if took > SLOW => Some(format!("it took {took:?} (bound {SLOW:?})")),
            Ok(Ok(outcome)) if PANICS.load(Ordering::SeqCst) == panics => {
                *stats.entry(outcome).or_insert(0) += 1;
                None
            }
            Ok(Ok(_)) => Some("a thread panicked (see the panic message above)".to_owned()),
            Ok(Err(property)) => Some(property),
            Err(_) => Some("it panicked (see the panic message above)".to_owned()),
        };
        if let Some(why) = broken {
            let saved = std::env::temp_dir().join(format!("quiesce-fuzz-{target}-{seed}-{i}.bin"));
            let _ = std::fs::write(&saved, &input);
            panic!(
                "fuzz target {target}, iteration {i}: {why}\n  input ({} bytes) saved to {}\n  \
                 replay: QUIESCE_FUZZ_SEED={seed} QUIESCE_FUZZ_ITER={i} cargo test -p quiesce --test fuzz {target}",
                input.len(),
                saved.display()
            );
        }
        i += 1;
        let ran = i - only.unwrap_or(0);
        if only.is_some() || (started.elapsed() >= share && ran >= MIN_ITERATIONS) {
            break;
        }
    }
    eprintln!(
        "fuzz target {target}: {} iterations in {:.1} s (QUIESCE_FUZZ_SEED={seed}): {stats:?}",
        stats.values().sum::<u64>(),
        started.elapsed().as_secs_f64()
    );
    stats
}

/// The outcome of an error: its kind, without the details that make every one different.
pub fn kind_of(debug: &str) -> String {
    let end = debug.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(debug.len());
    debug[..end].to_owned()
}

/// At most `n` bytes of `s`, cut at a character boundary.
pub fn cut(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
