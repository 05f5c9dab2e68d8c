//! Reaching libvirt: the libvirtd already listening, or one started here for this run in a
//! mount namespace of its own (see the notes of [`super`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use quiesce::sys::{Process, Tool, ToolError};

use super::{io, read_pid, Libvirt, LibvirtError};

const SYSTEM_SOCK: &str = "/run/libvirt/libvirt-sock";
/// A privileged libvirtd reads its QEMU driver settings from here, and nowhere else.
const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
/// Guest output to plain files (no virtlogd needed), and no per-domain mount namespace
/// (it would try to recreate the masked /dev/kvm inside it, and fail).
const QEMU_CONF_TEXT: &str = "stdio_handler = \"file\"\nnamespaces = [ ]\n";
/// Run by `unshare --mount`: $1 is our qemu.conf, $2 the /dev/kvm mask (or empty), the rest
/// is libvirtd's command line. The mounts are seen only by this libvirtd and its QEMUs. The
/// private tmpfs on /run/libvirt keeps its drivers' pid files and state apart from any other
/// libvirtd's (a system one, or another test's or benchmark's started at the same time):
/// each driver holds a lock on its pid file there, and a second daemon on the same
/// /run/libvirt fails to start ("Failed to acquire pid file '/run/libvirt/network/driver.pid'").
const LAUNCH_SCRIPT: &str = "set -e; mount --bind \"$1\" /etc/libvirt/qemu.conf; \
    mkdir -p /run/libvirt; mount -t tmpfs -o mode=0755 quiesce-libvirt-run /run/libvirt; \
    if [ -n \"$2\" ]; then mount --bind \"$2\" /dev/kvm; fi; shift 2; exec \"$@\"";
/// `libvirtd --daemon` returning: its parent returns once the daemon's sockets listen, a
/// second or two.
const LIBVIRTD_START: Duration = Duration::from_secs(30);
/// The first virsh command of a run: libvirt's QEMU driver probes QEMU before it answers
/// (about 10 s cold, up to 12 s under TCG; see the module notes of [`super`]).
const LIBVIRT_FIRST_ANSWER: Duration = Duration::from_secs(120);

/// Finds a program in `$PATH`, then in the sbin folders root's PATH may lack.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn listening(sock: &str) -> bool {
    std::os::unix::net::UnixStream::connect(sock).is_ok()
}

/// A daemon this run started, held by a pidfd.
pub(super) struct Daemon {
    pub(super) name: String,
    pub(super) process: Process,
}

/// Runs `program args` (`unshare ... libvirtd --daemon`), which returns once the daemon it
/// forked listens, and takes hold of that daemon by the pid it wrote. The daemon has left
/// the process group of the program we ran (it makes a session of its own), so it outlives
/// the runner's clean-up of that group.
async fn start_daemon(program: &Path, args: &[String], pid_file: &Path) -> Result<Daemon, LibvirtError> {
    let name = "libvirtd".to_owned();
    let fail = |why: String| LibvirtError::Start { daemon: name.clone(), why };
    match Tool::new(program, LIBVIRTD_START).args(args).run_async().await {
        Ok(_) => {}
        Err(ToolError::Failed { status, stderr, .. }) => return Err(fail(format!("it exited {status}: {stderr}"))),
        Err(e) => return Err(fail(e.to_string())),
    }
    let pid = read_pid(pid_file).ok_or_else(|| fail(format!("no pid in {}", pid_file.display())))?;
    let process = Process::open(pid).map_err(|e| fail(format!("pidfd_open({pid}): {e}")))?;
    Ok(Daemon { name, process })
}

/// How [`Libvirt::start_with`] starts a daemon (a libvirtd found running is used as it is).
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// Hide /dev/kvm from the daemon (see the module notes).
    pub mask_kvm: bool,
    /// Log the guest agent traffic (`qemu.qemu_agent`) at debug level, everything else at
    /// warning level, to [`Libvirt::log_path`].
    pub agent_debug_log: bool,
}

impl Libvirt {
    /// Connects to a running libvirtd, or starts one for this run (see the module notes);
    /// `mask_kvm` hides /dev/kvm from a libvirtd started here.
    pub async fn start(mask_kvm: bool, progress: &mut dyn FnMut(&str)) -> Result<Libvirt, LibvirtError> {
        Self::start_with(StartOptions { mask_kvm, agent_debug_log: false }, progress).await
    }

    /// [`Libvirt::start`] with more choices for a daemon started here.
    pub async fn start_with(opts: StartOptions, progress: &mut dyn FnMut(&str)) -> Result<Libvirt, LibvirtError> {
        let mask_kvm = opts.mask_kvm;
        let find = |p: &str| find_program(p).ok_or_else(|| LibvirtError::NotInstalled { program: p.to_owned() });
        let virsh = find("virsh")?;
        let dir = tempfile::Builder::new().prefix("quiesce-libvirt-").tempdir().map_err(io("make a libvirt folder"))?;
        let mut lv = Libvirt {
            virsh,
            uri: "qemu:///system".into(),
            how: String::new(),
            daemons: Vec::new(),
            domains: Mutex::new(Vec::new()),
            stopped: false,
            log: None,
            dir,
        };
        if listening(SYSTEM_SOCK) {
            lv.how = format!("the libvirtd already listening on {SYSTEM_SOCK} (used as it is, left running)");
        } else {
            let libvirtd = find("libvirtd")?;
            let unshare = find("unshare")?;
            if !Path::new(QEMU_CONF).is_file() {
                return Err(LibvirtError::NotInstalled { program: QEMU_CONF.to_owned() });
            }
            let d = lv.dir.path().to_owned();
            let conf = d.join("libvirtd.conf");
            let log = d.join("libvirtd.log");
            let logging = if opts.agent_debug_log {
                format!(
                    "log_level = 3\nlog_filters = \"1:qemu.qemu_agent\"\nlog_outputs = \"1:file:{}\"\n",
                    log.display()
                )
            } else {
                format!("log_outputs = \"3:file:{}\"\n", log.display())
            };
            fs::write(
                &conf,
                format!(
                    "unix_sock_dir = \"{dir}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n{logging}",
                    dir = d.display()
                ),
            )
            .map_err(io("write libvirtd.conf"))?;
            lv.log = Some(log);
            let qemu_conf = d.join("qemu.conf");
            fs::write(&qemu_conf, QEMU_CONF_TEXT).map_err(io("write qemu.conf"))?;
            let mask = d.join("no-kvm");
            if mask_kvm {
                fs::write(&mask, b"").map_err(io("write the /dev/kvm mask"))?;
                fs::set_permissions(&mask, std::os::unix::fs::PermissionsExt::from_mode(0o000))
                    .map_err(io("write the /dev/kvm mask"))?;
            }
            let pid_file = d.join("libvirtd.pid");
            let mut argv: Vec<String> = vec![
                "--mount".into(),
                "--propagation".into(),
                "private".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                LAUNCH_SCRIPT.into(),
                "quiesce-libvirtd".into(),
                qemu_conf.display().to_string(),
                if mask_kvm { mask.display().to_string() } else { String::new() },
            ];
            argv.extend(
                [&libvirtd, Path::new("--daemon"), Path::new("--config"), &conf, Path::new("--pid-file"), &pid_file]
                    .map(|p| p.display().to_string()),
            );
            progress("starting libvirtd");
            let daemon = start_daemon(&unshare, &argv, &pid_file).await?;
            lv.how = format!(
                "`{} --daemon --config {} --pid-file {}` (pid {}), inside `unshare --mount` with {QEMU_CONF} \
                 bind-mounted from {} ({}){}; unix_sock_dir {}, auth none; stopped at the end",
                libvirtd.display(),
                conf.display(),
                pid_file.display(),
                daemon.process.pid(),
                qemu_conf.display(),
                QEMU_CONF_TEXT.trim().replace('\n', ", "),
                if mask_kvm { " and /dev/kvm masked by an empty mode-000 file" } else { "" },
                d.display(),
            );
            lv.daemons.push(daemon);
            lv.uri = format!("qemu:///system?socket={}/libvirt-sock", d.display());
        }
        // The first connection waits for the QEMU driver to probe QEMU (about 10 s cold).
        progress("connecting to libvirt (the first time, it probes QEMU)");
        let version = match lv.virsh(&["version"], LIBVIRT_FIRST_ANSWER).await {
            Ok(v) => v,
            Err(e) => {
                let dead: Vec<String> = lv
                    .daemons
                    .iter()
                    .filter(|d| d.process.has_exited())
                    .map(|d| format!("{} (pid {}) has exited", d.name, d.process.pid()))
                    .collect();
                let log = fs::read_to_string(lv.dir.path().join("libvirtd.log")).unwrap_or_default();
                return Err(LibvirtError::Start {
                    daemon: "libvirtd".into(),
                    why: format!(
                        "{e}\n{}\nlibvirtd.log (errors):\n{}",
                        dead.join("; "),
                        quiesce::qemu::serial::tail_of(&log, 10)
                    ),
                });
            }
        };
        let running = version.lines().find(|l| l.contains("Running hypervisor")).unwrap_or("").trim().to_owned();
        let using = version.lines().find(|l| l.contains("Using library")).unwrap_or("").trim().to_owned();
        lv.how = format!("{}; {using}, {running}", lv.how);
        Ok(lv)
    }
}
