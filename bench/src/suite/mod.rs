//! `quiesce-bench suite`: issue 11's three suite goals, measured as a new user meets them.
//! The README's two commands (read from the README, see [`readme`]) are each run in a fresh
//! `git clone` of this checkout's commit, with an empty image cache and the clone's own
//! `target/`: the main command (set up, build, build the image, run every scenario), then
//! the warm run (the main command's last part again, in the same clone, everything built),
//! then the test command in a second fresh clone. Each is timed whole and by stage (see
//! [`timed`]); each goal is printed met or missed. Then the test guest is booted a few
//! times and each boot split at the kernel (see [`boot`]), the "the kernel's share".
//!
//! What is not fresh: the clones share this machine's cargo registry (crates already
//! downloaded) and its installed packages (the setup finds them and installs nothing); a
//! new machine adds those downloads, which the report says. Nothing is asserted.

pub mod boot;
pub mod readme;
mod report;
pub mod steps;
pub mod timed;

use std::path::{Path, PathBuf};
use std::time::Duration;

use quiesce::qemu::accel::AccelChoice;
use quiesce::sys::Tool;

use self::readme::Commands;
use self::timed::{Place, Timed};
use crate::stats::loadavg;

/// The goals of issue 11, in seconds: the main command and the test command from a fresh
/// clone, and the warm run.
pub const GOAL_MAIN: f64 = 7.0 * 60.0;
pub const GOAL_TEST: f64 = 8.0 * 60.0;
pub const GOAL_WARM: f64 = 5.0 * 60.0;

/// Deadlines of the parts: each is far past what the part takes on a loaded 2-core TCG
/// machine (the test command took 21 min there), so one that fires is stuck, not slow.
const MAIN_PART: Duration = Duration::from_secs(90 * 60);
const TEST_PART: Duration = Duration::from_secs(150 * 60);
const CLONE: Duration = Duration::from_secs(10 * 60);

/// One of the README's two commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// The main command, then the warm run in the same clone.
    Main,
    /// The test command.
    Test,
}

impl std::fmt::Display for Which {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Which::Main => "main",
            Which::Test => "test",
        })
    }
}

#[derive(Debug, Clone)]
pub struct SuiteOptions {
    pub accel: Option<AccelChoice>,
    /// The folder the clones, caches and logs go in; the clones and caches are removed at
    /// the end (unless `keep`), the logs stay.
    pub work_dir: PathBuf,
    /// The commands to time.
    pub commands: Vec<Which>,
    /// Boots of the test guest to split (0: none).
    pub boots: usize,
    pub keep: bool,
    /// Where the two commands are read from; the checkout's README by default.
    pub readme: Option<PathBuf>,
}

/// Why the suite could not be measured (a command that fails is measured, and reported).
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    /// The README's commands could not be read.
    #[error(transparent)]
    Readme(#[from] readme::ReadmeError),
    /// The README or the work folder could not be read or made.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// git could not tell the commit, or clone it.
    #[error(transparent)]
    Git(#[from] quiesce::sys::ToolError),
    /// SIGINT or SIGTERM: the command running was stopped with everything it started; the
    /// clones and logs are left in the work folder.
    #[error("interrupted: the command running was stopped; the clones and logs are left in the work folder")]
    Interrupted,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SuiteError {
    let what = what.into();
    move |source| SuiteError::Io { what, source }
}

/// The checkout this benchmark was built from.
fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_owned).unwrap_or_default()
}

/// What was measured, for the report.
pub struct SuiteRun {
    pub commands: Commands,
    pub commit: String,
    /// The checkout had changes not committed: they are not in the clones.
    pub dirty: bool,
    pub cores: usize,
    pub main: Vec<Timed>,
    /// The warm run: none when the main command failed.
    pub warm: Vec<Timed>,
    pub test: Vec<Timed>,
    /// From the last run's reports: booting, and restores by cold boot and by loading.
    pub boot_times: Option<steps::BootTimes>,
    pub boots: Vec<boot::BootSplit>,
    /// Why the boots could not be split, if they could not.
    pub boot_error: Option<String>,
    pub load: (f64, f64),
    pub logs: PathBuf,
}

/// Runs the parts of one command in order, stopping at the first that fails (as `&&`).
async fn command(
    parts: &[String],
    place: &Place<'_>,
    logs: &Path,
    name: &str,
    deadline: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Timed>, SuiteError> {
    let mut done = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        progress(&format!("{name}: {part}"));
        let log = logs.join(format!("{name}-{}.log", i + 1));
        let t = timed::run(part, place, &log, deadline).await.map_err(io(format!("running `{part}`")))?;
        let ok = t.ok();
        done.push(t);
        if !ok {
            break;
        }
    }
    Ok(done)
}

fn clone(from: &Path, to: &Path) -> Result<(), SuiteError> {
    Tool::new("git", CLONE).args(["clone", "--quiet"]).arg(from).arg(to).run()?;
    Ok(())
}

/// Runs the suite and returns the text to print.
pub async fn run(opts: &SuiteOptions, progress: &mut dyn FnMut(&str)) -> Result<String, SuiteError> {
    let root = checkout();
    let readme_path = opts.readme.clone().unwrap_or_else(|| root.join("README.md"));
    let readme = std::fs::read_to_string(&readme_path).map_err(io(format!("reading {}", readme_path.display())))?;
    let commands = readme::commands(&readme)?;
    let git = |args: &[&str]| {
        Tool::new("git", CLONE).arg("-C").arg(&root).args(args).run().map(|o| o.stdout_text().trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    // Absolute: the commands run in the clones, and QUIESCE_CACHE_DIR and the clones'
    // paths are handed to them (the default `--work-dir` is relative).
    let work_dir = std::path::absolute(&opts.work_dir).map_err(io(format!("resolving {}", opts.work_dir.display())))?;
    let work = work_dir.join(format!("suite-{}", std::process::id()));
    let logs = work_dir.join(format!("suite-logs-{commit}-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(io(format!("making {}", work.display())))?;
    std::fs::create_dir_all(&logs).map_err(io(format!("making {}", logs.display())))?;
    let load_before = loadavg();

    let (mut main, mut warm, mut boot_times) = (Vec::new(), Vec::new(), None);
    if opts.commands.contains(&Which::Main) {
        let (main_dir, main_cache) = (work.join("main"), work.join("cache-main"));
        progress("cloning for the main command");
        clone(&root, &main_dir)?;
        let place = Place { dir: &main_dir, cache: &main_cache };
        main = command(&commands.main.parts, &place, &logs, "main", MAIN_PART, progress).await?;
        // Everything is built once the parts before the last have passed: a scenario that
        // failed in the last does not stop the warm run.
        let last = commands.main.parts.len().saturating_sub(1);
        if main.len() == commands.main.parts.len() && main[..last].iter().all(Timed::ok) {
            let last = vec![commands.main.last_part().to_owned()];
            warm = command(&last, &place, &logs, "warm", MAIN_PART, progress).await?;
        }
        boot_times = steps::read(&main_dir.join("quiesce-reports"));
    }

    let (mut boots, mut boot_error) = (Vec::new(), None);
    if opts.boots > 0 {
        match boot::measure(opts.boots, opts.accel, progress).await {
            Ok(b) => boots = b,
            Err(e) => boot_error = Some(e.to_string()),
        }
    }

    let mut test = Vec::new();
    if opts.commands.contains(&Which::Test) {
        let (test_dir, test_cache) = (work.join("test"), work.join("cache-test"));
        progress("cloning for the test command");
        clone(&root, &test_dir)?;
        let place = Place { dir: &test_dir, cache: &test_cache };
        test = command(&commands.test.parts, &place, &logs, "test", TEST_PART, progress).await?;
    }
    let load = (load_before, loadavg());
    if !opts.keep {
        progress("removing the clones and their caches");
        std::fs::remove_dir_all(&work).map_err(io(format!("removing {}", work.display())))?;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let run = SuiteRun { commands, commit, dirty, cores, main, warm, test, boot_times, boots, boot_error, load, logs };
    Ok(report::render(&run))
}
