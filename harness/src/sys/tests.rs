//! The runner's promises, each checked against real processes: deadlines kill whole
//! groups, output is capped, failures carry stderr, and nothing is left unreaped.

use std::io::Read;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

use super::child::{pidfd_open, readable};
use super::*;

/// True once process `pid` has exited (or is gone), waiting up to 10 s for it.
fn exits(pid: u32) -> bool {
    match pidfd_open(pid) {
        Ok(fd) => readable(fd.as_fd(), Duration::from_secs(10)),
        Err(e) => e.raw_os_error() == Some(libc::ESRCH),
    }
}

/// Reads the first line a child prints, waiting up to 10 s for it.
fn first_line(child: &mut Child) -> String {
    let mut out = child.take_stdout().expect("stdout is piped");
    let mut line = Vec::new();
    let mut b = [0u8];
    while b[0] != b'\n' {
        assert!(readable(out.as_fd(), Duration::from_secs(10)), "the child printed no line");
        assert_eq!(out.read(&mut b).unwrap(), 1, "the child closed its stdout");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap().trim().to_owned()
}

#[test]
fn a_deadline_that_fires_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild");
    let script = format!("sleep 300 & echo $! > {}; wait", shell_quote(&pidfile.to_string_lossy()));
    let e = Tool::new("sh", Duration::from_secs(3)).args(["-c", &script]).run().unwrap_err();
    assert!(matches!(e, ToolError::TimedOut { waited, .. } if waited == Duration::from_secs(3)), "{e:?}");
    assert!(e.to_string().starts_with("`sh -c ") && e.to_string().contains("it was killed"), "{e}");
    let grandchild: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(exits(grandchild), "the grandchild sleep {grandchild} outlived the deadline");
}

#[test]
fn output_past_the_cap_is_refused_and_the_tool_killed() {
    let e = Tool::new("sh", Duration::from_secs(60))
        .args(["-c", "head -c 100000 /dev/zero; exec sleep 300"])
        .stdout_cap(1000)
        .run()
        .unwrap_err();
    assert!(matches!(e, ToolError::OutputTooLarge { cap: 1000, .. }), "{e:?}");
    // Exactly the cap is accepted, whole.
    let out = Tool::new("head", Duration::from_secs(60)).args(["-c", "1000", "/dev/zero"]).stdout_cap(1000).run();
    assert_eq!(out.unwrap().stdout, vec![0u8; 1000]);
}

#[test]
fn a_failing_exit_is_reported_with_its_stderr() {
    let tool = || Tool::new("sh", Duration::from_secs(60)).args(["-c", "echo out; echo 'disk on fire' >&2; exit 3"]);
    let e = tool().run().unwrap_err();
    let ToolError::Failed { program, status, stderr, .. } = &e else { panic!("{e:?}") };
    assert_eq!((program.as_str(), status.code(), stderr.as_str()), ("sh", Some(3), "disk on fire"));
    assert_eq!(
        e.to_string(),
        "`sh -c 'echo out; echo '\\''disk on fire'\\'' >&2; exit 3'` failed (exit status: 3): disk on fire"
    );
    // The exit code as an answer: no error, and both outputs.
    let out = tool().output().unwrap();
    assert_eq!((out.code(), out.stdout_text().as_str(), out.stderr.as_str()), (Some(3), "out\n", "disk on fire\n"));
}

#[test]
fn stderr_keeps_its_end_and_is_given_line_by_line() {
    let mut lines = Vec::new();
    let mut on_line = |l: &str| lines.push(l.to_owned());
    let script = "i=0; while [ $i -lt 5000 ]; do echo \"noise $i ....................................\" >&2; \
                  i=$((i+1)); done; printf 'the end' >&2";
    let out = Tool::new("sh", Duration::from_secs(60)).args(["-c", script]).on_stderr_line(&mut on_line).run().unwrap();
    assert!(
        out.stderr.len() <= tool::STDERR_TAIL
            && out.stderr.ends_with("noise 4999 ....................................\nthe end")
    );
    assert_eq!(lines.len(), 5001);
    assert_eq!((lines[0].as_str(), lines[5000].as_str()), ("noise 0 ....................................", "the end"));
}

#[test]
fn a_program_that_cannot_start_is_named() {
    let e = Tool::new("/nonexistent/quiesce-tool", Duration::from_secs(5)).arg("x").run().unwrap_err();
    assert!(matches!(&e, ToolError::Spawn { program, .. } if program == "/nonexistent/quiesce-tool"), "{e:?}");
    assert!(e.to_string().contains("`/nonexistent/quiesce-tool x`"), "{e}");
}

#[test]
fn drop_kills_the_group_and_reaps_the_child() {
    let mut child = Spawn::new("sh")
        .args(["-c", "sleep 300 & echo $!; wait"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let grandchild: u32 = first_line(&mut child).parse().unwrap();
    let pid = Pid::from_raw(child.pid() as i32);
    drop(child);
    // Reaped: it is no child of ours any more (a zombie would still be one).
    assert_eq!(waitpid(pid, Some(WaitPidFlag::WNOHANG)), Err(Errno::ECHILD));
    assert!(exits(grandchild), "the grandchild sleep {grandchild} outlived the drop");
}

#[test]
fn an_exited_child_takes_what_it_left_running_with_it() {
    let mut child =
        Spawn::new("sh").args(["-c", "sleep 300 & echo $!"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let grandchild: u32 = first_line(&mut child).parse().unwrap();
    assert!(child.wait_timeout(Duration::from_secs(10)).unwrap().success());
    assert!(exits(grandchild), "the grandchild sleep {grandchild} outlived its parent's reaping");
}

#[test]
fn a_child_dies_with_the_thread_that_started_it() {
    let mut child =
        std::thread::spawn(|| Spawn::new("sleep").arg("300").die_with_parent().spawn().unwrap()).join().unwrap();
    let status = child.wait_timeout(Duration::from_secs(10)).expect("PDEATHSIG killed it");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
}

#[test]
fn kept_fds_are_inherited_under_their_number() {
    // Close-on-exec, as every fd the crate makes: only `keep_fd` lets the child have it, and
    // the children other tests start meanwhile do not hold the write end open. bash, not
    // sh: dash takes only fds 0-9 in a redirection, and with tests running side by side the
    // pipe is often 10 or above.
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tx);
    let mut child = Spawn::new("bash").args(["-c", &format!("echo hello >&{fd}")]).keep_fd(fd).spawn().unwrap();
    drop(tx);
    assert!(child.wait_timeout(Duration::from_secs(10)).unwrap().success());
    let mut got = String::new();
    std::fs::File::from(rx).read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello\n");
}

#[test]
fn blocking_waits_end_at_their_deadline() {
    let mut child = Spawn::new("sleep").arg("300").spawn().unwrap();
    assert_eq!(child.wait_timeout(Duration::from_millis(50)), None);
    assert!(child.terminate(Duration::from_secs(5)).is_some());
}

#[tokio::test]
async fn async_waits_end_at_their_deadline_or_the_exit() {
    let mut sleeping = Spawn::new("sleep").arg("300").spawn().unwrap();
    assert_eq!(sleeping.wait_async(Duration::from_millis(50)).await, None);
    let mut quick = Spawn::new("true").spawn().unwrap();
    assert!(quick.wait_async(Duration::from_secs(10)).await.unwrap().success());
}

#[tokio::test]
async fn async_tools_run_to_their_end_and_stop_when_dropped() {
    let out = Tool::new("sh", Duration::from_secs(60)).args(["-c", "echo hi; exit 3"]).output_async().await.unwrap();
    assert_eq!((out.code(), out.stdout_text().as_str()), (Some(3), "hi\n"));
    let e = Tool::new("sh", Duration::from_millis(200)).args(["-c", "exec sleep 300"]).run_async().await.unwrap_err();
    assert!(matches!(e, ToolError::TimedOut { .. }), "{e:?}");

    // Dropped while it runs: the tool and what it started are killed at once, long before
    // their deadline.
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild");
    let script = format!("sleep 300 & echo $! > {}; wait", shell_quote(&pidfile.to_string_lossy()));
    let tool = Tool::new("sh", Duration::from_secs(300)).args(["-c", &script]);
    let abandoned = tokio::time::timeout(Duration::from_millis(500), tool.output_async()).await;
    assert!(abandoned.is_err(), "the tool ended by itself: {abandoned:?}");
    let grandchild: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(exits(grandchild), "the grandchild sleep {grandchild} outlived the dropped future");
}

/// Blocking work that runs tools, dropped (an interruption): by the time the drop returns,
/// its tool is dead and reaped, so what it held (here a lock, as `qemu-img convert` holds
/// an image's) is free at once, and the work starts no further tool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_blocking_work_has_stopped_its_tools_when_the_drop_returns() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("image.lock");
    let later = dir.path().join("later");
    let (lock2, later2) = (lock.clone(), later.clone());
    let work = blocking_tools(move || {
        // `-o`: only flock itself holds the lock, not its `sleep`, as qemu-img holds an
        // image alone. Without it the lock would outlive the reaped leader until the
        // SIGKILLed `sleep` finished exiting: a race under load, not the property tested.
        let held = Tool::new("flock", Duration::from_secs(300)).arg("-o").arg(&lock2).args(["sleep", "300"]).output();
        // Abandoned: a further tool is refused rather than started.
        let next = Tool::new("touch", Duration::from_secs(5)).arg(&later2).output();
        (held.is_err(), next.is_err())
    });
    // 0 once nobody holds the lock, 1 while someone does.
    let try_lock =
        || Tool::new("flock", Duration::from_secs(30)).arg("-n").arg(&lock).arg("true").output().unwrap().code();
    let abandoned = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::select! {
            _ = work => panic!("the work ended by itself"),
            // Polls until the tool holds the lock (each try is a process: no spin).
            _ = async { while try_lock() != Some(1) { tokio::task::yield_now().await } } => {}
        }
    })
    .await;
    assert!(abandoned.is_ok(), "the tool never took the lock");
    // The work's future is gone: its tool must be too, with no wait.
    assert_eq!(try_lock(), Some(0), "the lock was still held after the dropped work's future had gone");
    assert!(!later.exists(), "abandoned work started another tool");
}

#[test]
fn a_process_we_did_not_start_is_waited_for_and_stopped_by_pidfd() {
    // A daemon as `--daemon` makes one: its parent exits and it lives on in a session of
    // its own, no child of ours.
    let out = Tool::new("sh", Duration::from_secs(60))
        .args([
            "-c",
            // Waits until it is in a session of its own, out of the group the runner kills.
            "setsid sleep 300 </dev/null >/dev/null 2>&1 & p=$!; \
             until [ \"$(cut -d' ' -f6 /proc/$p/stat)\" = $p ]; do :; done; echo $p",
        ])
        .run()
        .unwrap();
    let pid: u32 = out.stdout_text().trim().parse().unwrap();
    let p = Process::open(pid).unwrap();
    assert_eq!(p.pid(), pid);
    assert!(!p.has_exited());
    assert!(!p.wait_exit(Duration::from_millis(50)));
    assert!(p.terminate(Duration::from_secs(5)));
    assert!(p.has_exited());
    // Signalling one that is gone is no error.
    p.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
}
