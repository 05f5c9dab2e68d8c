//! Agent and QMP lines are untrusted: a guest writes what the agent channel carries, and
//! QMP replies carry what a guest or a damaged QEMU put there. Three targets:
//!
//! - `framing`: the line reader on mutated byte streams, read in random pieces and with
//!   reads cancelled halfway, against an independent model of the framing; every line is
//!   then classified ([`message::parse`]);
//! - `qmp`: the QMP client against a scripted peer replaying a mutated session;
//! - `agent`: the agent client against a scripted peer whose replies are mutated, the typed
//!   replies fed to the Child VM Snapshot condition rules, and a guest-exec.
//!
//! The peers are scripted because real QEMU and qemu-ga do not produce garbage on demand.
//! Time is tokio's paused clock, so a reply that never comes costs a deadline of no real
//! time.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::UnixStream;

use super::engine::{self, mutate_bytes, Rng};
use quiesce::backup::conditions;
use quiesce::qemu::framing::{Frame, LineReader, DELIMITER};
use quiesce::qemu::message::{self, Message};
use quiesce::qemu::{exec, GuestAgent, Qmp, Transcript};

/// A QMP session as QEMU 10.0 speaks it (ids as the client numbers its commands).
const QMP_SESSION: &[&str] = &[
    r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-1"}, "capabilities": ["oob"]}}"#,
    r#"{"return": {}, "id": 1}"#,
    r#"{"timestamp": {"seconds": 1735689600, "microseconds": 123456}, "event": "RESUME"}"#,
    r#"{"return": {"status": "running", "running": true}, "id": 2}"#,
    r#"{"return": {"status": "completed", "blocked-reasons": ["The vhdx format used by node 'd0' does not support live migration"], "total-time": 812, "ram": {"transferred": 270532608, "remaining": 0, "total": 285212672, "duplicate": 3, "normal": 66000, "normal-bytes": 270336000, "dirty-pages-rate": 0, "mbps": 2662.1, "dirty-sync-count": 2, "postcopy-requests": 0, "page-size": 4096, "multifd-bytes": 0, "pages-per-second": 80000, "precopy-bytes": 270532608, "downtime-bytes": 0, "postcopy-bytes": 0, "dirty-sync-missed-zero-copy": 0}}, "id": 3}"#,
    r#"{"timestamp": {"seconds": 1735689601, "microseconds": 5}, "event": "MIGRATION", "data": {"status": "completed"}}"#,
    r#"{"error": {"class": "GenericError", "desc": "Could not create '/nonexistent/overlay.qcow2': No such file or directory"}, "id": 4}"#,
    r#"{"timestamp": {"seconds": 1735689602, "microseconds": 9}, "event": "BLOCK_JOB_READY", "data": {"device": "commit-d0", "len": 1048576, "offset": 1048576, "speed": 0, "type": "commit"}}"#,
];

/// Agent replies as qemu-ga 10.0 gives them in the test guest; `ID` is the request's id.
fn agent_replies() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        (
            "guest-get-osinfo",
            r##"{"return": {"name": "Debian GNU/Linux", "kernel-release": "6.1.0-30-amd64", "version": "12 (bookworm)", "pretty-name": "Debian GNU/Linux 12 (bookworm)", "version-id": "12", "kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.124-1", "machine": "x86_64", "id": "debian"}, "id": ID}"##,
        ),
        (
            "guest-get-fsinfo",
            r##"{"return": [{"name": "vda", "total-bytes": 1006632960, "mountpoint": "/", "disk": [{"serial": "root", "bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 4, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}], "used-bytes": 405012480, "type": "ext4"}, {"name": "vdb", "total-bytes": 62914560, "mountpoint": "/mnt/data", "disk": [{"serial": "data", "bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 5, "domain": 0, "function": 0}, "dev": "/dev/vdb", "target": 0}], "used-bytes": 24576, "type": "ext4"}], "id": ID}"##,
        ),
        (
            "guest-info",
            r##"{"return": {"version": "10.0.2", "supported_commands": [{"enabled": true, "name": "guest-fsfreeze-freeze", "success-response": true}, {"enabled": true, "name": "guest-fsfreeze-thaw", "success-response": true}, {"enabled": false, "name": "guest-exec", "success-response": true}]}, "id": ID}"##,
        ),
        (
            "guest-get-disks",
            r##"{"return": [{"name": "/dev/vda", "partition": false, "dependencies": [], "address": {"serial": "root", "bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 4, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}}, {"name": "/dev/dm-0", "partition": false, "dependencies": ["/dev/vdb"]}], "id": ID}"##,
        ),
        ("guest-exec", r##"{"return": {"pid": 4242}, "id": ID}"##),
        (
            "guest-exec-status",
            r##"{"return": {"exitcode": 0, "out-data": "aGVsbG8K", "exited": true, "err-data": ""}, "id": ID}"##,
        ),
        ("guest-ping", r##"{"return": {}, "id": ID}"##),
    ])
}

/// One line-level change to a protocol stream: a line dropped, doubled, cut, moved, or a
/// 0xFF or garbage put before it; else a byte-level change.
fn mutate_stream(rng: &mut Rng, lines: &mut Vec<Vec<u8>>, huge: usize) {
    if lines.is_empty() {
        lines.push(Vec::new());
    }
    let i = rng.below(lines.len());
    match rng.below(7) {
        0 => {
            lines.remove(i);
        }
        1 => {
            let l = lines[i].clone();
            lines.insert(i, l);
        }
        2 => {
            let n = rng.below(lines[i].len() + 1);
            lines[i].truncate(n);
        }
        3 => {
            let j = rng.below(lines.len());
            lines.swap(i, j);
        }
        4 => lines[i].insert(0, if rng.one_in(2) { DELIMITER } else { b'\r' }),
        _ => mutate_bytes(rng, &mut lines[i], huge),
    }
}

fn join_lines(lines: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    out
}

/// The framing, written again from its description: one frame per `\n`-ended line (a `\r`
/// before it dropped, blank lines skipped), a line longer than `max` reported by its length
/// only, a 0xFF reported and ending any partial line, a partial line at the end dropped.
fn model(input: &[u8], max: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for &b in input {
        match b {
            DELIMITER => {
                cur.clear();
                out.push(Frame::Delimiter);
            }
            b'\n' => {
                let mut line = std::mem::take(&mut cur);
                if line.len() > max {
                    out.push(Frame::TooLong { len: line.len() });
                    continue;
                }
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if !line.iter().all(u8::is_ascii_whitespace) {
                    out.push(Frame::Line(line));
                }
            }
            _ => cur.push(b),
        }
    }
    out
}

/// A byte stream that hands out random pieces, and says "not yet" every other time (waking
/// itself), so the reader meets every split of its input and a read can be cancelled.
struct Pieces<'a> {
    data: &'a [u8],
    rng: Rng,
    pending: bool,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.pending = !self.pending;
        if self.pending {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        // Pieces of a few bytes, and of up to a quarter of a large input (so a large
        // input does not take a million reads).
        let len = self.data.len();
        let n = self.rng.len(len.max(4) / 4 + 16).max(1).min(len).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// The reader's state is bounded by its line bound and one read; a line's parse by the line.
const FRAMING_MEMORY: usize = 512 << 10;

#[test]
fn framing() {
    let _turn = engine::turn();
    let seed_lines: Vec<Vec<u8>> = QMP_SESSION.iter().map(|l| l.as_bytes().to_vec()).collect();
    engine::run("framing", |rng, input| {
        let huge = if rng.one_in(10) { 2 << 20 } else { 16 << 10 };
        let mut lines = seed_lines.clone();
        for _ in 0..1 + rng.below(6) {
            mutate_stream(rng, &mut lines, huge);
        }
        *input = join_lines(&lines);
        if rng.one_in(3) {
            mutate_bytes(rng, input, huge);
        }
        let max = *rng.pick(&[1usize, 16, 64, 200, 1000, 4096]);
        let want = model(input, max);
        let pieces = Pieces { data: input, rng: Rng::new(rng.next()), pending: false };
        let mut reader = LineReader::new(pieces, max);
        let cancel_every = Rng::new(rng.next());
        let (result, peak) = engine::measure(|| read_all(&mut reader, &want, cancel_every, max));
        result?;
        if peak > FRAMING_MEMORY {
            return Err(format!("reading with lines bounded to {max} bytes held {peak} bytes at once"));
        }
        Ok(format!("frames:{}", want.len().min(9)))
    });
}

/// Reads every frame, dropping a read future at random while it waits (a cancelled
/// command), and compares each frame with the model's as it comes.
fn read_all(reader: &mut LineReader<Pieces<'_>>, want: &[Frame], mut rng: Rng, max: usize) -> Result<(), String> {
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    let mut got = 0usize;
    loop {
        let frame = loop {
            let mut fut = std::pin::pin!(reader.next_frame());
            let polled = match fut.as_mut().poll(&mut cx) {
                Poll::Ready(r) => r,
                Poll::Pending if rng.one_in(2) => continue, // cancelled: a new read starts
                Poll::Pending => loop {
                    if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                        break r;
                    }
                },
            };
            break polled.map_err(|e| format!("read error: {e}"))?;
        };
        let Some(frame) = frame else { break };
        if let Frame::Line(l) = &frame {
            if l.len() > max || l.contains(&b'\n') || l.contains(&DELIMITER) {
                return Err(format!("a line of {} bytes (bound {max}) or holding a separator", l.len()));
            }
            check_message(l)?;
        }
        match want.get(got) {
            Some(w) if *w == frame => got += 1,
            w => {
                return Err(format!(
                    "frame {got} is {} where the model has {}",
                    show(&frame),
                    w.map_or("none".into(), show)
                ))
            }
        }
    }
    if got != want.len() {
        return Err(format!("the reader ended after {got} frames; the model has {}", want.len()));
    }
    Ok(())
}

fn show(f: &Frame) -> String {
    match f {
        Frame::Line(l) => format!("Line({})", message::snippet(l)),
        other => format!("{other:?}"),
    }
}

/// A line of any shape is classified without a panic, and what is kept of garbage is short.
fn check_message(line: &[u8]) -> Result<(), String> {
    if let Message::Unknown { text, .. } = message::parse(line) {
        if text.chars().count() > 260 {
            return Err(format!("an unknown line is kept as {} characters", text.chars().count()));
        }
    }
    Ok(())
}

/// The client records every line it read in its transcript, a long one as its start and
/// `…(N bytes)`: none may be longer than the client's bound.
fn longest_line_read(transcript: &std::path::Path, bound: usize) -> Result<(), String> {
    let text = std::fs::read(transcript).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&text);
    for line in text.lines().filter(|l| l.contains(" <- ")) {
        let len = line.rsplit_once("…(").and_then(|(_, n)| n.strip_suffix(" bytes)")?.parse::<usize>().ok());
        if let Some(len) = len.filter(|&n| n > bound) {
            return Err(format!("the client read a line of {len} bytes; its bound is {bound}"));
        }
    }
    Ok(())
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

/// QMP's line bound is 16 MiB (query-qmp-schema); the rare input past it is read and
/// dropped, and a line within it parsed, in about three times its size.
const QMP_MEMORY: usize = 96 << 20;

#[test]
fn qmp() {
    let _turn = engine::turn();
    let dir = tempfile::tempdir().unwrap();
    let rt = paused_runtime();
    engine::run("qmp", |rng, input| {
        // The session in turns: what QEMU says first, then after each command.
        let mut turns: Vec<Vec<Vec<u8>>> =
            QMP_TURNS.iter().map(|t| t.iter().map(|&i| QMP_SESSION[i].as_bytes().to_vec()).collect()).collect();
        let huge = if rng.one_in(10) { 1 << 20 } else { 16 << 10 };
        for _ in 0..rng.below(6) {
            let t = rng.below(turns.len());
            mutate_stream(rng, &mut turns[t], huge);
        }
        if rng.one_in(400) {
            // One line past QMP's bound.
            let t = rng.below(turns.len());
            turns[t].push(vec![b'x'; (16 << 20) + 1 + rng.below(1000)]);
        }
        let turns: Vec<Vec<u8>> = turns.iter().map(|t| join_lines(t)).collect();
        turns.iter().for_each(|t| input.extend_from_slice(t));
        let path = dir.path().join("transcript");
        let transcript = Transcript::create(&path).map_err(|e| e.to_string())?;
        let (result, peak) = engine::measure(|| rt.block_on(qmp_session(&turns, transcript)));
        if peak > QMP_MEMORY {
            return Err(format!("a QMP session held {peak} bytes at once (bound {QMP_MEMORY})"));
        }
        longest_line_read(&path, 16 << 20)?;
        result
    });
}

/// Which lines of [`QMP_SESSION`] QEMU sends at each turn: the greeting, then one turn
/// after each command the client sends.
const QMP_TURNS: &[&[usize]] = &[&[0], &[1, 2], &[3], &[4, 5], &[6, 7]];

/// The scripted QEMU: the first turn at once, the next after each request line; when the
/// turns run out, it stops talking (and reads on, so the client's writes succeed).
async fn qmp_peer(peer: UnixStream, turns: &[Vec<u8>]) {
    let mut peer = BufReader::new(peer);
    let mut line = Vec::new();
    for turn in turns {
        if peer.get_mut().write_all(turn).await.is_err() {
            return;
        }
        line.clear();
        match peer.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    let _ = peer.get_mut().shutdown().await;
    while matches!(peer.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
        line.clear();
    }
}

/// The client connects and runs what a backup runs against the scripted QEMU. Every result
/// is a value or a typed error.
async fn qmp_session(turns: &[Vec<u8>], transcript: Transcript) -> Result<String, String> {
    let (client, peer) = UnixStream::pair().map_err(|e| e.to_string())?;
    let run = async {
        let qmp = match Qmp::connect(client, transcript, Duration::from_secs(5)).await {
            Ok(q) => q,
            Err(e) => return format!("connect:{}", engine::kind_of(&format!("{e:?}"))),
        };
        let _ = qmp.version();
        let status = qmp.execute_within(qapi::qmp::query_status {}, Duration::from_secs(5)).await;
        let migrate = qmp.execute_within(qapi::qmp::query_migrate {}, Duration::from_secs(5)).await;
        if let Ok(info) = &migrate {
            let _ = quiesce::backup::job::migration_blockers(info);
        }
        let _ = qmp.execute_raw("transaction", Value::Null, Duration::from_secs(5)).await;
        let _ = qmp.wait_event("MIGRATION", |d| d["status"] == "completed", Duration::from_secs(1)).await;
        let _ = qmp.events().snapshot();
        let label = |r: Result<(), String>| r.map_or_else(|e| engine::kind_of(&e), |_| "ok".into());
        format!(
            "status:{} migrate:{}",
            label(status.map(drop).map_err(|e| format!("{e:?}"))),
            label(migrate.map(drop).map_err(|e| format!("{e:?}")))
        )
    };
    let (_, outcome) = tokio::join!(qmp_peer(peer, turns), run);
    Ok(outcome)
}

/// The agent client's line bound here (the real one is 4 MiB): small, so that mutations
/// cross it often. Replies within it are parsed, typed and checked in a few MiB.
const AGENT_MAX_REPLY: usize = 64 << 10;
const AGENT_MEMORY: usize = 8 << 20;

#[test]
fn agent() {
    let _turn = engine::turn();
    let templates = agent_replies();
    let dir = tempfile::tempdir().unwrap();
    let rt = paused_runtime();
    engine::run("agent", |rng, input| {
        // Each command's replies, mutated in advance (the peer has no generator of its own).
        // Past the client's line bound now and then, within it mostly.
        let huge = if rng.one_in(10) { 1 << 20 } else { 48 << 10 };
        let mut script: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
        for (cmd, reply) in &templates {
            let mut replies = Vec::new();
            for _ in 0..3 {
                let mut lines = vec![reply.as_bytes().to_vec()];
                for _ in 0..rng.below(4) {
                    mutate_stream(rng, &mut lines, huge);
                }
                replies.push(join_lines(&lines));
            }
            script.insert(cmd, replies);
        }
        let mut garbage: Vec<Vec<u8>> = (0..4).map(|_| Vec::new()).collect();
        for g in garbage.iter_mut() {
            if !rng.one_in(4) {
                continue;
            }
            let mut lines = vec![rng.pick(QMP_SESSION).as_bytes().to_vec()];
            mutate_stream(rng, &mut lines, huge);
            *g = join_lines(&lines);
        }
        for replies in script.values() {
            replies.iter().for_each(|r| input.extend_from_slice(r));
        }
        let path = dir.path().join("transcript");
        let transcript = Transcript::create(&path).map_err(|e| e.to_string())?;
        let (result, peak) = engine::measure(|| rt.block_on(agent_session(script, garbage, transcript)));
        if peak > AGENT_MEMORY {
            return Err(format!("an agent session held {peak} bytes at once (bound {AGENT_MEMORY})"));
        }
        longest_line_read(&path, AGENT_MAX_REPLY)?;
        result
    });
}

/// The scripted agent: answers each sync properly (after some garbage, sometimes), and each
/// command with its next scripted reply, the request's id put in for `ID`.
async fn agent_peer(peer: UnixStream, mut script: BTreeMap<&str, Vec<Vec<u8>>>, mut garbage: Vec<Vec<u8>>) {
    let mut peer = BufReader::new(peer);
    let mut line = Vec::new();
    loop {
        line.clear();
        match peer.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let start = line.iter().position(|&b| b != DELIMITER).unwrap_or(0);
        let Ok(req) = serde_json::from_slice::<Value>(&line[start..]) else { return };
        let name = req["execute"].as_str().unwrap_or_default();
        let mut out = Sender { peer: peer.get_mut(), buf: Vec::with_capacity(PEER_CHUNK) };
        let sent = async {
            out.put(&garbage.pop().unwrap_or_default()).await?;
            if name == "guest-sync-delimited" {
                out.put(&[DELIMITER]).await?;
                out.put(format!("{{\"return\": {}}}\n", req["arguments"]["id"]).as_bytes()).await?;
            } else {
                let reply =
                    script.get_mut(name).and_then(|r| r.pop()).unwrap_or_else(|| b"{\"return\": {}}\n".to_vec());
                let id = req["id"].to_string();
                let mut rest = &reply[..];
                while let Some(i) = rest.windows(2).position(|w| w == b"ID") {
                    out.put(&rest[..i]).await?;
                    out.put(id.as_bytes()).await?;
                    rest = &rest[i + 2..];
                }
                out.put(rest).await?;
            }
            out.flush().await
        };
        if sent.await.is_err() {
            return;
        }
    }
}

/// The scripted agent writes through a buffer of this size. It runs in the thread whose
/// allocations are measured: a reply built whole, with a 10-digit id put in for each of
/// the half million `ID`s a repeated chunk can hold, was megabytes that the client never
/// held, and failed the client's bound.
const PEER_CHUNK: usize = 16 << 10;

struct Sender<'a> {
    peer: &'a mut UnixStream,
    buf: Vec<u8>,
}

impl Sender<'_> {
    async fn put(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(PEER_CHUNK - self.buf.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == PEER_CHUNK {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.peer.write_all(&self.buf).await?;
        self.buf.clear();
        Ok(())
    }
}

async fn agent_session(
    script: BTreeMap<&str, Vec<Vec<u8>>>,
    garbage: Vec<Vec<u8>>,
    transcript: Transcript,
) -> Result<String, String> {
    let (client, peer) = UnixStream::pair().map_err(|e| e.to_string())?;
    let run = async {
        let agent = GuestAgent::with_max_reply(client, transcript, AGENT_MAX_REPLY);
        let d = Duration::from_secs(2);
        let kind = |e: &dyn std::fmt::Debug| engine::kind_of(&format!("{e:?}"));
        let mut outcome = Vec::new();
        match agent.execute_within(qapi::qga::guest_get_osinfo {}, d).await {
            Ok(os) => outcome.push(format!("os:{}", finding(conditions::os_supported(&os))?)),
            Err(e) => outcome.push(format!("os:{}", kind(&e))),
        }
        match agent.execute_within(qapi::qga::guest_get_fsinfo {}, d).await {
            Ok(fs) => outcome
                .push(format!("fs:{}", finding(conditions::filesystems_support_snapshots(&fs, &["root", "data"]))?)),
            Err(e) => outcome.push(format!("fs:{}", kind(&e))),
        }
        match agent.execute_within(qapi::qga::guest_info {}, d).await {
            Ok(info) => outcome.push(format!("info:{}", finding(conditions::agent_can_freeze(&info))?)),
            Err(e) => outcome.push(format!("info:{}", kind(&e))),
        }
        match agent.execute_within(qapi::qga::guest_get_disks {}, d).await {
            Ok(disks) => {
                outcome.push(format!("disks:{}", finding(conditions::guest_disks_basic(&disks, &["root", "data"]))?))
            }
            Err(e) => outcome.push(format!("disks:{}", kind(&e))),
        }
        match exec::run(&agent, &["/bin/echo", "hello"], Duration::from_secs(3)).await {
            Ok(out) if out.stdout.len() > exec::MAX_OUTPUT => {
                return Err(format!("guest-exec kept {} bytes", out.stdout.len()))
            }
            Ok(_) => outcome.push("exec:ok".into()),
            Err(e) => outcome.push(format!("exec:{}", kind(&e))),
        }
        let _ = agent.execute_within(qapi::qga::guest_ping {}, d).await;
        Ok(outcome.join(" "))
    };
    let (_, outcome) = tokio::join!(agent_peer(peer, script, garbage), run);
    outcome
}

/// A condition's finding from the guest's reply: its kind. Its reason goes into the
/// manifest and the report, so what it repeats of the guest's words must be short.
fn finding(f: conditions::Finding) -> Result<String, String> {
    let (conditions::Finding::Held(r) | conditions::Finding::Failed(r) | conditions::Finding::NotChecked(r)) = &f;
    if r.len() > 4096 {
        return Err(format!(
            "a condition's reason repeats {} bytes of the guest's reply: {}",
            r.len(),
            engine::cut(r, 200)
        ));
    }
    Ok(engine::kind_of(&format!("{f:?}")))
}
