//! libvirt for the benchmarks' comparisons (`virsh save` / `virsh restore`, and
//! `virsh snapshot-create-as --disk-only --quiesce`), with no systemd: the daemon is started
//! by hand and stopped again.
//!
//! - If a libvirtd already listens on `/run/libvirt/libvirt-sock`, it is used as it is and
//!   left running. Otherwise `libvirtd --daemon` is started with its own config, whose
//!   `unix_sock_dir` is a private folder, and reached as `qemu:///system?socket=...`.
//!   `--daemon` returns once the sockets listen, and libvirtd accepts clients only after its
//!   drivers are up, so the first `virsh` simply waits in the socket's backlog: no polling.
//! - It runs in a mount namespace of its own (`unshare --mount`), where its own `qemu.conf`
//!   is bind-mounted over `/etc/libvirt/qemu.conf` (guest output to files, so no virtlogd;
//!   no per-domain namespaces). Nothing outside that namespace changes.
//! - Where KVM is unusable (the harness chose TCG), `/dev/kvm` is masked in that namespace.
//!   Otherwise libvirt 9.0 never trusts its capability cache: QEMU's probe reports KVM
//!   enabled (it can open /dev/kvm as root), while libvirt finds /dev/kvm inaccessible to the
//!   `libvirt-qemu` user, calls the cache outdated, and re-probes QEMU (4 to 12 s under TCG)
//!   on every `virsh create`, `save` and `restore` (seen in its debug log).
//! - The daemon is stopped through a pidfd (SIGTERM, then SIGKILL), so the signal can only
//!   reach the process that was started. Domains are transient (`virsh create`), destroyed
//!   before the daemon stops, and their QEMU is killed through its own pidfd if it is
//!   somehow still there.
//! - On request ([`StartOptions::agent_debug_log`]) the daemon started here logs its guest
//!   agent traffic at debug level, with millisecond timestamps; [`freeze_window`] reads
//!   libvirt's freeze and thaw out of that log.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

const SYSTEM_SOCK: &str = "/run/libvirt/libvirt-sock";
/// A privileged libvirtd reads its QEMU driver settings from here, and nowhere else.
const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
/// Guest output to plain files (no virtlogd needed), and no per-domain mount namespace
/// (it would try to recreate the masked /dev/kvm inside it, and fail).
const QEMU_CONF_TEXT: &str = "stdio_handler = \"file\"\nnamespaces = [ ]\n";
/// Run by `unshare --mount`: $1 is our qemu.conf, $2 the /dev/kvm mask (or empty), the rest
/// is libvirtd's command line. The bind mounts are seen only by this libvirtd and its QEMUs.
const LAUNCH_SCRIPT: &str = "set -e; mount --bind \"$1\" /etc/libvirt/qemu.conf; \
    if [ -n \"$2\" ]; then mount --bind \"$2\" /dev/kvm; fi; shift 2; exec \"$@\"";
const QEMU_RUN_DIR: &str = "/run/libvirt/qemu";
const QEMU_LOG_DIR: &str = "/var/log/libvirt/qemu";
const INSTALL_HINT: &str = "apt-get install -y libvirt-daemon-system libvirt-clients";
/// Deadline for a virsh command that does no bulk work.
const T: Duration = Duration::from_secs(30);
/// Deadline for `libvirtd --daemon` (the parent returns once the sockets listen).
const START: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("libvirt is not installed ({program} not found); install it with `{INSTALL_HINT}`")]
    NotInstalled { program: String },
    #[error("could not start {daemon}: {why}")]
    Start { daemon: String, why: String },
    #[error("`virsh {args}` failed ({status}): {stderr}")]
    Virsh { args: String, status: String, stderr: String },
    #[error("`virsh {args}` did not finish within {waited:?}")]
    Timeout { args: String, waited: Duration },
    #[error("could not {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("libvirt domain {domain}: the guest agent did not answer within {waited:?}\nserial tail:\n{serial}")]
    AgentNotReady { domain: String, waited: Duration, serial: String },
    #[error("libvirt domain {domain}: guest-exec {what}")]
    GuestExec { domain: String, what: String },
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> LibvirtError + '_ {
    move |source| LibvirtError::Io { what: what.to_owned(), source }
}

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

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall; on success the kernel hands us a new fd that we then own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_signal(fd: &OwnedFd, sig: i32) -> std::io::Result<()> {
    // SAFETY: a plain syscall on a pidfd we own; no siginfo is passed.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, std::ptr::null::<u8>(), 0) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        // ESRCH: it has exited already.
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// True once the process behind `fd` has exited, waiting up to `timeout`.
fn pidfd_wait(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// SIGTERM, then SIGKILL; true if the process is gone.
fn terminate(fd: &OwnedFd, grace: Duration) -> bool {
    if pidfd_wait(fd, Duration::ZERO) {
        return true;
    }
    let _ = pidfd_signal(fd, libc::SIGTERM);
    if pidfd_wait(fd, grace) {
        return true;
    }
    let _ = pidfd_signal(fd, libc::SIGKILL);
    pidfd_wait(fd, Duration::from_secs(5))
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A daemon this run started, held by a pidfd.
struct Daemon {
    name: String,
    pid: i32,
    pidfd: OwnedFd,
}

async fn start_daemon(program: &Path, args: &[String], pid_file: &Path) -> Result<Daemon, LibvirtError> {
    let name = "libvirtd".to_owned();
    let fail = |why: String| LibvirtError::Start { daemon: name.clone(), why };
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("{}: {e}", program.display())))?;
    let out = tokio::time::timeout(START, child.wait_with_output())
        .await
        .map_err(|_| fail(format!("`libvirtd --daemon` did not return within {START:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).trim().to_owned();
        return Err(fail(format!("it exited {}: {said}", out.status)));
    }
    let pid = read_pid(pid_file).ok_or_else(|| fail(format!("no pid in {}", pid_file.display())))?;
    let pidfd = pidfd_open(pid).map_err(|e| fail(format!("pidfd_open({pid}): {e}")))?;
    Ok(Daemon { name, pid, pidfd })
}

/// A data disk after the root disk: a standalone image, on virtio-blk with `serial` as its
/// guest-visible serial (as quiesce's own launch gives each disk its node name).
#[derive(Debug, Clone)]
pub struct DataDisk {
    pub serial: String,
    pub path: PathBuf,
    /// QEMU's driver name of the image's format (`qcow2`, `raw`, ...).
    pub format: String,
}

/// What a domain is made of: the test guest's kernel, initrd and command line, a qcow2
/// overlay over its root image, any data disks, its RAM and vCPUs, and the agent's
/// virtio-serial port.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    pub name: String,
    pub kvm: bool,
    pub emulator: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub overlay: PathBuf,
    pub backing: PathBuf,
    pub backing_format: String,
    /// Attached after the root disk, as vdb, vdc, ...
    pub data_disks: Vec<DataDisk>,
    pub serial_log: PathBuf,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

fn escp(p: &Path) -> String {
    esc(&p.to_string_lossy())
}

/// The domain XML. ACPI is named explicitly: without it libvirt 9.0 passes `-no-acpi`,
/// which QEMU 10 no longer accepts. QEMU runs as root with the files left as they are
/// (static DAC label, no relabelling), as quiesce's own QEMU does.
pub fn domain_xml(d: &DomainSpec) -> String {
    format!(
        "<domain type='{ty}'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <currentMemory unit='MiB'>{mem}</currentMemory>
  <vcpu>{cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
{cpu}  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{overlay}'/>
      <backingStore type='file'>
        <format type='{bfmt}'/>
        <source file='{backing}'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <serial>root</serial>
    </disk>
{data}    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <console type='file'><source path='{serial}'/><target type='serial' port='0'/></console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
",
        ty = if d.kvm { "kvm" } else { "qemu" },
        // As quiesce's own launch does: the host CPU under KVM, QEMU's default under TCG.
        cpu = if d.kvm { "  <cpu mode='host-passthrough'/>\n" } else { "" },
        name = esc(&d.name),
        mem = d.memory_mib,
        cpus = d.cpus,
        kernel = escp(&d.kernel),
        initrd = escp(&d.initrd),
        cmdline = esc(&d.cmdline),
        emulator = escp(&d.emulator),
        overlay = escp(&d.overlay),
        bfmt = esc(&d.backing_format),
        backing = escp(&d.backing),
        data = data_disks_xml(&d.data_disks),
        serial = escp(&d.serial_log),
    )
}

/// The `<disk>` elements of the data disks, targets vdb onwards (at most 25 of them).
fn data_disks_xml(disks: &[DataDisk]) -> String {
    disks
        .iter()
        .zip(b'b'..=b'z')
        .map(|(d, letter)| {
            format!(
                "    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{path}'/>
      <backingStore/>
      <target dev='vd{letter}' bus='virtio'/>
      <serial>{serial}</serial>
    </disk>
",
                fmt = esc(&d.format),
                path = escp(&d.path),
                letter = letter as char,
                serial = esc(&d.serial),
            )
        })
        .collect()
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

/// A libvirt connection, with the daemons this run started (if any) and the domains it
/// created. [`Libvirt::stop`] (or Drop) destroys the domains and stops the daemons.
pub struct Libvirt {
    virsh: PathBuf,
    uri: String,
    /// How libvirt was reached, for the report.
    pub how: String,
    daemons: Vec<Daemon>,
    domains: Mutex<Vec<(String, Option<OwnedFd>)>>,
    stopped: bool,
    /// The daemon's log file, if this run started the daemon.
    log: Option<PathBuf>,
    // Last: removed after the daemons that use it have stopped.
    dir: tempfile::TempDir,
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
                daemon.pid,
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
        let version = match lv.virsh(&["version"], Duration::from_secs(120)).await {
            Ok(v) => v,
            Err(e) => {
                let dead: Vec<String> = lv
                    .daemons
                    .iter()
                    .filter(|d| pidfd_wait(&d.pidfd, Duration::ZERO))
                    .map(|d| format!("{} (pid {}) has exited", d.name, d.pid))
                    .collect();
                let log = fs::read_to_string(lv.dir.path().join("libvirtd.log")).unwrap_or_default();
                return Err(LibvirtError::Start {
                    daemon: "libvirtd".into(),
                    why: format!(
                        "{e}\n{}\nlibvirtd.log (errors):\n{}",
                        dead.join("; "),
                        crate::qemu::serial::tail_of(&log, 10)
                    ),
                });
            }
        };
        let running = version.lines().find(|l| l.contains("Running hypervisor")).unwrap_or("").trim().to_owned();
        let using = version.lines().find(|l| l.contains("Using library")).unwrap_or("").trim().to_owned();
        lv.how = format!("{}; {using}, {running}", lv.how);
        Ok(lv)
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The log of the daemon this run started (none when a running one was used).
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// A private folder for this run's domain files (overlay, serial log, XML).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs virsh and returns its stdout; a non-zero exit is an error with its stderr.
    pub async fn virsh(&self, args: &[&str], timeout: Duration) -> Result<String, LibvirtError> {
        let shown = args.join(" ");
        let child = tokio::process::Command::new(&self.virsh)
            .args(["-q", "-c", &self.uri])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(io("run virsh"))?;
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| LibvirtError::Timeout { args: shown.clone(), waited: timeout })?
            .map_err(io("run virsh"))?;
        if !out.status.success() {
            return Err(LibvirtError::Virsh {
                args: shown,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Remembers a domain's QEMU (by pidfd) so that nothing of it outlives the run.
    fn track(&self, name: &str) {
        let fd = read_pid(&Path::new(QEMU_RUN_DIR).join(format!("{name}.pid"))).and_then(|p| pidfd_open(p).ok());
        let mut doms = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        doms.retain(|(n, _)| n != name);
        doms.push((name.to_owned(), fd));
    }

    /// Starts a transient domain.
    pub async fn create(&self, spec: &DomainSpec) -> Result<(), LibvirtError> {
        let xml = self.dir().join(format!("{}.xml", spec.name));
        fs::write(&xml, domain_xml(spec)).map_err(io("write the domain XML"))?;
        // Tracked before it starts too, so a failure half-way still destroys it.
        self.domains.lock().unwrap_or_else(|e| e.into_inner()).push((spec.name.clone(), None));
        self.virsh(&["create", &xml.to_string_lossy()], Duration::from_secs(60)).await?;
        self.track(&spec.name);
        Ok(())
    }

    /// `virsh save`; the domain is gone afterwards.
    pub async fn save(&self, domain: &str, file: &Path, timeout: Duration) -> Result<(), LibvirtError> {
        self.virsh(&["save", domain, &file.to_string_lossy()], timeout).await.map(drop)
    }

    /// `virsh restore`; the domain runs again (it was running when saved).
    pub async fn restore(&self, domain: &str, file: &Path, timeout: Duration) -> Result<(), LibvirtError> {
        let r = self.virsh(&["restore", &file.to_string_lossy()], timeout).await;
        self.track(domain);
        r.map(drop)
    }

    pub async fn state(&self, domain: &str) -> Result<String, LibvirtError> {
        Ok(self.virsh(&["domstate", domain], T).await?.trim().to_owned())
    }

    /// Destroys a domain this run created and waits (on its pidfd) until its QEMU is gone.
    /// If that fails, the domain stays tracked, for [`Libvirt::stop`] to try again.
    pub async fn destroy(&self, domain: &str) -> Result<(), LibvirtError> {
        self.virsh(&["destroy", domain], T).await?;
        let qemu = {
            let mut doms = self.domains.lock().unwrap_or_else(|e| e.into_inner());
            let i = doms.iter().position(|(n, _)| n == domain);
            i.map(|i| doms.remove(i)).and_then(|(_, fd)| fd)
        };
        if let Some(fd) = qemu {
            let (fd, gone) = tokio::task::spawn_blocking(move || {
                let gone = pidfd_wait(&fd, Duration::from_secs(10)) || terminate(&fd, Duration::from_secs(3));
                (fd, gone)
            })
            .await
            .map_err(|e| LibvirtError::Io { what: format!("stop libvirt domain {domain}"), source: e.into() })?;
            if !gone {
                self.domains.lock().unwrap_or_else(|e| e.into_inner()).push((domain.to_owned(), Some(fd)));
                return Err(LibvirtError::Io {
                    what: format!("stop the QEMU of libvirt domain {domain}"),
                    source: std::io::Error::other("it would not exit"),
                });
            }
        }
        let _ = fs::remove_file(Path::new(QEMU_LOG_DIR).join(format!("{domain}.log")));
        Ok(())
    }

    /// `virsh snapshot-create-as DOMAIN NAME --disk-only --quiesce --atomic --no-metadata`:
    /// libvirt freezes the guest through its agent, puts a new overlay on every disk (named
    /// after the disk's image with `.NAME` for its extension) and thaws. Nothing is recorded
    /// as a snapshot: the domain simply runs on the new overlays.
    pub async fn snapshot_disk_only(&self, domain: &str, name: &str, timeout: Duration) -> Result<(), LibvirtError> {
        self.virsh(
            &["snapshot-create-as", domain, name, "--disk-only", "--quiesce", "--atomic", "--no-metadata"],
            timeout,
        )
        .await
        .map(drop)
    }

    /// `virsh domfsfreeze`, then `virsh domfsthaw`, which is tried even if the freeze failed.
    pub async fn freeze_thaw(&self, domain: &str) -> Result<(), LibvirtError> {
        let frozen = self.virsh(&["domfsfreeze", domain], T).await;
        let thawed = self.virsh(&["domfsthaw", domain], T).await;
        frozen.and(thawed).map(drop)
    }

    /// Each disk's target (vda, ...) and the image at the top of its chain.
    pub async fn disks(&self, domain: &str) -> Result<Vec<(String, PathBuf)>, LibvirtError> {
        let out = self.virsh(&["domblklist", domain, "--details"], T).await?;
        Ok(parse_domblklist(&out))
    }

    /// Merges the top image of `target` into the image right under it and pivots to that:
    /// `virsh blockcommit --active --shallow --pivot`. `--shallow` matters: without it
    /// libvirt commits into the deepest image of the chain (a shared base image too).
    pub async fn commit_top(&self, domain: &str, target: &str, timeout: Duration) -> Result<(), LibvirtError> {
        let secs = timeout.as_secs().max(1).to_string();
        self.virsh(
            &["blockcommit", domain, target, "--active", "--shallow", "--pivot", "--timeout", &secs],
            timeout + Duration::from_secs(10),
        )
        .await
        .map(drop)
    }

    /// One guest-agent command through libvirt; the reply's `return` value.
    pub async fn agent(&self, domain: &str, cmd: &Value, timeout_s: u64) -> Result<Value, LibvirtError> {
        let out = self
            .virsh(
                &["qemu-agent-command", domain, &cmd.to_string(), "--timeout", &timeout_s.to_string()],
                Duration::from_secs(timeout_s + 10),
            )
            .await?;
        let v: Value = serde_json::from_str(out.trim()).map_err(|e| LibvirtError::GuestExec {
            domain: domain.to_owned(),
            what: format!("reply is not JSON ({e}): {}", crate::qemu::message::snippet(out.as_bytes())),
        })?;
        Ok(v["return"].clone())
    }

    /// Waits until the domain's guest agent answers, failing early if the domain stops.
    pub async fn wait_agent(&self, domain: &str, serial_log: &Path, timeout: Duration) -> Result<(), LibvirtError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = Duration::from_millis(100);
        loop {
            match self.agent(domain, &json!({"execute": "guest-ping"}), 5).await {
                Ok(_) => return Ok(()),
                Err(LibvirtError::Virsh { .. }) | Err(LibvirtError::Timeout { .. }) => {}
                Err(e) => return Err(e),
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let state = self.state(domain).await.unwrap_or_default();
            if left.is_zero() || (!state.is_empty() && state != "running") {
                let serial = fs::read_to_string(serial_log).unwrap_or_default();
                let serial = crate::qemu::serial::tail_of(&serial, 20);
                return Err(LibvirtError::AgentNotReady {
                    domain: domain.to_owned(),
                    waited: timeout,
                    serial: format!("(domain state: {state})\n{serial}"),
                });
            }
            // The agent has no readiness event through libvirt; poll it under the deadline.
            tokio::time::sleep(interval.min(left)).await;
            interval = (interval * 2).min(Duration::from_millis(500));
        }
    }

    /// Runs a shell script in the guest through guest-exec and returns its stdout.
    pub async fn guest_sh(&self, domain: &str, script: &str, timeout: Duration) -> Result<String, LibvirtError> {
        let gerr = |what: String| LibvirtError::GuestExec { domain: domain.to_owned(), what };
        let cmd = json!({"execute": "guest-exec", "arguments": {
            "path": "/bin/sh", "arg": ["-c", script], "capture-output": true}});
        let started = self.agent(domain, &cmd, 10).await?;
        let pid = started["pid"].as_i64().ok_or_else(|| gerr(format!("gave no pid: {started}")))?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = Duration::from_millis(50);
        loop {
            let st =
                self.agent(domain, &json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}), 10).await?;
            if st["exited"].as_bool() == Some(true) {
                let field = |n: &str| {
                    let b = base64::engine::general_purpose::STANDARD
                        .decode(st[format!("{n}-data")].as_str().unwrap_or(""))
                        .unwrap_or_default();
                    String::from_utf8_lossy(&b[..b.len().min(crate::qemu::exec::MAX_OUTPUT)]).into_owned()
                };
                let code = st["exitcode"].as_i64().or_else(|| st["signal"].as_i64().map(|s| 128 + s)).unwrap_or(-1);
                if code != 0 {
                    return Err(gerr(format!("exited with {code}; stderr: {}", field("err").trim())));
                }
                return Ok(field("out"));
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(gerr(format!("still running after {timeout:?}")));
            }
            // guest-exec has no completion event; poll its status under the deadline.
            tokio::time::sleep(interval.min(left)).await;
            interval = (interval * 2).min(Duration::from_millis(300));
        }
    }

    /// Destroys every domain this run created, makes sure their QEMU is gone, and stops the
    /// daemons this run started. Returns what could not be cleaned up.
    pub fn stop(&mut self) -> Vec<String> {
        if self.stopped {
            return Vec::new();
        }
        self.stopped = true;
        let mut problems = Vec::new();
        let doms = std::mem::take(&mut *self.domains.lock().unwrap_or_else(|e| e.into_inner()));
        for (name, qemu) in doms {
            // Errors are expected here (a saved domain no longer exists); the pidfd check decides.
            let _ = run_blocking(
                std::process::Command::new(&self.virsh).args(["-q", "-c", &self.uri, "destroy", &name]),
                T,
            );
            let qemu = qemu.or_else(|| {
                read_pid(&Path::new(QEMU_RUN_DIR).join(format!("{name}.pid"))).and_then(|p| pidfd_open(p).ok())
            });
            let gone = match qemu {
                Some(fd) => pidfd_wait(&fd, Duration::from_secs(5)) || terminate(&fd, Duration::from_secs(3)),
                None => true,
            };
            if gone {
                // libvirt keeps each domain's QEMU output; a benchmark domain's is of no use later.
                let _ = fs::remove_file(Path::new(QEMU_LOG_DIR).join(format!("{name}.log")));
            } else {
                problems.push(format!("the QEMU of libvirt domain {name} would not exit"));
            }
        }
        while let Some(d) = self.daemons.pop() {
            if !terminate(&d.pidfd, STOP_GRACE) {
                problems.push(format!("{} (pid {}) would not exit", d.name, d.pid));
            }
        }
        problems
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        for p in self.stop() {
            eprintln!("quiesce: libvirt clean-up: {p}");
        }
    }
}

/// Runs a command to completion from a non-async context (Drop), killing it at the deadline.
fn run_blocking(cmd: &mut std::process::Command, timeout: Duration) -> Result<std::process::ExitStatus, String> {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let fd = pidfd_open(child.id() as i32).map_err(|e| e.to_string())?;
    if !pidfd_wait(&fd, timeout) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("did not finish within {timeout:?}"));
    }
    child.wait().map_err(|e| e.to_string())
}

/// `virsh -q domblklist --details` lines: type, device, target, source. Disks with no
/// source (`-`) are left out.
fn parse_domblklist(out: &str) -> Vec<(String, PathBuf)> {
    out.lines()
        .filter_map(|l| {
            let mut rest = l.trim_start();
            let mut fields = Vec::new();
            for _ in 0..3 {
                let end = rest.find(char::is_whitespace)?;
                fields.push(&rest[..end]);
                rest = rest[end..].trim_start();
            }
            let source = rest.trim_end();
            (!source.is_empty() && source != "-").then(|| (fields[2].to_owned(), PathBuf::from(source)))
        })
        .collect()
}

/// libvirt's freeze and thaw of one `--quiesce` snapshot, read from its debug log of the
/// agent traffic. Times are milliseconds since the epoch, as libvirt stamps its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreezeWindow {
    /// `guest-fsfreeze-freeze` handed to the agent channel.
    pub freeze_sent_ms: i64,
    /// Its reply received.
    pub freeze_returned_ms: i64,
    /// `guest-fsfreeze-thaw` handed to the agent channel.
    pub thaw_sent_ms: i64,
    /// Its reply received.
    pub thaw_returned_ms: i64,
    /// The freeze's reply: how many filesystems the guest froze.
    pub frozen: Option<u64>,
}

impl FreezeWindow {
    /// From sending the freeze until the thaw returned.
    pub fn window_ms(&self) -> f64 {
        (self.thaw_returned_ms - self.freeze_sent_ms) as f64
    }
    /// The guest's own freeze: from sending it until it returned.
    pub fn guest_freeze_ms(&self) -> f64 {
        (self.freeze_returned_ms - self.freeze_sent_ms) as f64
    }
    /// The host's share: from the freeze returning until the thaw was sent.
    pub fn host_ms(&self) -> f64 {
        (self.thaw_sent_ms - self.freeze_returned_ms) as f64
    }
    pub fn thaw_ms(&self) -> f64 {
        (self.thaw_returned_ms - self.thaw_sent_ms) as f64
    }
}

/// One line of libvirt's log: `2026-11-28 06:56:13.891+0000: 13552: debug : func:1039 : msg`.
struct LogLine<'a> {
    ms: i64,
    thread: &'a str,
    func: &'a str,
    msg: &'a str,
}

fn parse_log_line(line: &str) -> Option<LogLine<'_>> {
    let ms = parse_log_time(line.get(..28)?)?;
    let rest = line.get(28..)?.strip_prefix(": ")?;
    let (thread, rest) = rest.split_once(": ")?;
    let (_level, rest) = rest.split_once(" : ")?;
    let (func, msg) = rest.split_once(" : ")?;
    Some(LogLine { ms, thread, func: func.split(':').next()?, msg })
}

/// `2026-11-28 06:56:13.891+0000` to milliseconds since the epoch.
fn parse_log_time(s: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes().all(|b| b.is_ascii_digit()).then(|| t.parse().ok())?
    };
    let b = s.as_bytes();
    if b.len() != 28 || b[4] != b'-' || b[7] != b'-' || b[10] != b' ' || b[19] != b'.' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    let sign = match b[23] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let offset_min = sign * (num(24..26)? * 60 + num(26..28)?);
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((((days * 24 + h) * 60 + mi - offset_min) * 60 + sec) * 1000 + ms)
}

const AGENT_COMMAND: &str = "qemuAgentCommandFull";

/// Finds the first freeze in `log` (the part of the daemon's log written during one
/// snapshot) and the thaw after it.
pub fn freeze_window(log: &str) -> Result<FreezeWindow, String> {
    let lines: Vec<LogLine> = log.lines().filter_map(parse_log_line).collect();
    let sent = |cmd: &str, from: usize| {
        let needle = format!("\"execute\":\"{cmd}\"");
        lines[from..]
            .iter()
            .position(|l| l.func == AGENT_COMMAND && l.msg.starts_with("Send command") && l.msg.contains(&needle))
            .map(|i| from + i)
            .ok_or_else(|| format!("no `{cmd}` sent in libvirt's log"))
    };
    let returned = |cmd: &str, from: usize| {
        let thread = lines[from].thread;
        let i = lines[from + 1..]
            .iter()
            .position(|l| l.func == AGENT_COMMAND && l.thread == thread && l.msg.starts_with("Receive command reply"))
            .map(|i| from + 1 + i)
            .ok_or_else(|| format!("no reply to `{cmd}` in libvirt's log"))?;
        match lines[i].msg.split_once("ret=").map(|(_, r)| r.split_whitespace().next().unwrap_or("")) {
            Some("0") => Ok(i),
            other => Err(format!("`{cmd}` failed in libvirt's log (ret={})", other.unwrap_or("?"))),
        }
    };
    let f = sent("guest-fsfreeze-freeze", 0)?;
    let fr = returned("guest-fsfreeze-freeze", f)?;
    let t = sent("guest-fsfreeze-thaw", fr)?;
    let tr = returned("guest-fsfreeze-thaw", t)?;
    // The agent's reply, logged by the I/O thread between the send and its return.
    let frozen = lines[f..fr].iter().find_map(|l| {
        let json = l.msg.strip_prefix("Line [")?.strip_suffix(']')?;
        serde_json::from_str::<Value>(json).ok()?["return"].as_u64()
    });
    Ok(FreezeWindow {
        freeze_sent_ms: lines[f].ms,
        freeze_returned_ms: lines[fr].ms,
        thaw_sent_ms: lines[t].ms,
        thaw_returned_ms: lines[tr].ms,
        frozen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_xml_names_the_backing_format_and_escapes() {
        let d = DomainSpec {
            name: "b&d".into(),
            kvm: false,
            emulator: "/usr/bin/qemu-system-x86_64".into(),
            memory_mib: 1024,
            cpus: 1,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "console=ttyS0 a='b'".into(),
            overlay: "/o.qcow2".into(),
            backing: "/root.img".into(),
            backing_format: "raw".into(),
            data_disks: vec![DataDisk { serial: "data1".into(), path: "/d1.qcow2".into(), format: "qcow2".into() }],
            serial_log: "/s.log".into(),
        };
        let x = domain_xml(&d);
        assert!(x.starts_with("<domain type='qemu'>"));
        assert!(x.contains("<name>b&amp;d</name>"));
        assert!(x.contains("<format type='raw'/>"));
        assert!(x.contains("<cmdline>console=ttyS0 a=&apos;b&apos;</cmdline>"));
        assert!(x.contains("name='org.qemu.guest_agent.0'"));
        assert!(x.contains("<memory unit='MiB'>1024</memory>"));
        assert!(x.contains("<source file='/d1.qcow2'/>"));
        assert!(x.contains("<target dev='vdb' bus='virtio'/>\n      <serial>data1</serial>"));
    }

    #[test]
    fn domblklist_details() {
        let out =
            " file   disk     vda      /tmp/a b/root.s1\n file   cdrom    sda      -\n\n file disk vdb /d.qcow2\n";
        assert_eq!(
            parse_domblklist(out),
            vec![("vda".to_owned(), PathBuf::from("/tmp/a b/root.s1")), ("vdb".to_owned(), PathBuf::from("/d.qcow2"))]
        );
    }

    #[test]
    fn log_times() {
        assert_eq!(parse_log_time("1970-01-01 00:00:00.000+0000"), Some(0));
        assert_eq!(parse_log_time("2026-11-28 06:56:13.891+0000"), Some(1_795_848_973_891));
        assert_eq!(parse_log_time("2026-11-28 07:56:13.891+0100"), Some(1_795_848_973_891));
        assert_eq!(parse_log_time("2024-02-29 23:59:59.999-0030"), Some(1_709_251_199_999 + 1_800_000));
        assert_eq!(parse_log_time("2026-11-28 06:56:13,891+0000"), None);
        assert_eq!(parse_log_time("garbage"), None);
    }

    /// Lines as libvirt 9.0 wrote them during `snapshot-create-as --quiesce` (one disk).
    const LOG: &str = r#"2026-11-28 06:56:13.747+0000: 13552: debug : qemuAgentGuestSyncSend:823 : Sending guest-sync command with ID: 1795848973747
2026-11-28 06:56:13.891+0000: 13552: debug : qemuAgentCommandFull:1039 : Send command '{"execute":"guest-fsfreeze-freeze"}' for write, seconds = -2
2026-11-28 06:56:14.093+0000: 13583: debug : qemuAgentIOProcessLine:214 : Line [{"return": 2}]
2026-11-28 06:56:14.093+0000: 13583: debug : qemuAgentIOProcessData:294 : Total used 14 bytes out of 14 available in buffer
2026-11-28 06:56:14.093+0000: 13552: debug : qemuAgentCommandFull:1043 : Receive command reply ret=0 rxObject=0x7fe8bc01d1e0
 fd=-1
2026-11-28 06:56:14.200+0000: 13552: debug : qemuAgentCommandFull:1039 : Send command '{"execute":"guest-fsfreeze-thaw"}' for write, seconds = -2
2026-11-28 06:56:14.310+0000: 13583: debug : qemuAgentIOProcessLine:214 : Line [{"return": 2}]
2026-11-28 06:56:14.320+0000: 13552: debug : qemuAgentCommandFull:1043 : Receive command reply ret=0 rxObject=0x7fe8bc003d00
"#;

    #[test]
    fn freeze_window_from_the_log() {
        let w = freeze_window(LOG).unwrap();
        assert_eq!(w.frozen, Some(2));
        assert_eq!((w.guest_freeze_ms(), w.host_ms(), w.thaw_ms(), w.window_ms()), (202.0, 107.0, 120.0, 429.0));
        let no_thaw: String = LOG.lines().take(6).map(|l| format!("{l}\n")).collect();
        assert_eq!(freeze_window(&no_thaw).unwrap_err(), "no `guest-fsfreeze-thaw` sent in libvirt's log");
        let failed = LOG.replacen("reply ret=0", "reply ret=-1", 1);
        assert!(freeze_window(&failed).unwrap_err().contains("`guest-fsfreeze-freeze` failed"));
        assert!(freeze_window("").is_err());
    }
}
