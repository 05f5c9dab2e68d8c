//! A minimal NBD client over a unix socket: fixed newstyle handshake, `NBD_OPT_GO`, then
//! `NBD_CMD_READ` with simple replies. Structured replies are never asked for, so the server
//! must answer every read with a simple reply.
//!
//! Reads are pipelined: up to `depth` requests are in flight on a connection, each with its
//! own cookie, and replies are matched to requests by cookie in whatever order they come
//! (QEMU's server handles the requests of one connection in parallel coroutines and may
//! answer them out of order). A reply's payload is read straight into the caller's buffer
//! unless the server's alignment forced a wider read, so most bytes are copied once here.
//! Keeping the server busy matters more than anything else on this path: with one request
//! at a time, the daemon sits idle while we receive and compare, and we sit idle while it
//! reads the image.
//!
//! The server is QEMU's, but what it sends is still checked: lengths are bounded, magic
//! numbers must match, every reply must answer a request in flight, and every exchange has
//! a deadline. After any failure the connection is out of step with the server (replies may
//! be left unread) and refuses further reads.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERROR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const REQUEST_LEN: usize = 28;
const REPLY_LEN: usize = 16;

/// Option replies longer than this are not from a server we talk to.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The largest read we send when the server does not say (the protocol's safe default).
const DEFAULT_MAX_BLOCK: u32 = 32 << 20;
/// No read is longer than this, whatever the server allows: it bounds the scratch buffer
/// an unaligned read needs.
const MAX_REQUEST: u32 = 32 << 20;
/// No more requests than this are ever in flight on one connection.
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed; `during` says what we were doing.
    #[error("{during}: {source}")]
    Io { during: String, source: io::Error },
    /// The server said something the protocol does not allow, refused the export, or
    /// failed a read; the text says which (and, for a failed read, where and why).
    #[error("{0}")]
    Protocol(String),
}

fn protocol<T>(what: impl Into<String>) -> Result<T, NbdError> {
    Err(NbdError::Protocol(what.into()))
}

fn io_err(during: impl Into<String>) -> impl FnOnce(io::Error) -> NbdError {
    move |source| NbdError::Io { during: during.into(), source }
}

/// How reads are pipelined on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pipeline {
    /// Requests in flight at once (1 to [`MAX_DEPTH`]).
    pub depth: usize,
    /// Preferred bytes per request; rounded to the server's alignment and capped by its
    /// maximum.
    pub request: u32,
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline { depth: 1, request: DEFAULT_MAX_BLOCK }
    }
}

/// One connection to one export.
pub struct Client {
    sock: UnixStream,
    pub size: u64,
    /// Reads must start and end on multiples of this (the end of the export excepted).
    pub min_block: u32,
    /// No read may be longer than this.
    pub max_block: u32,
    /// How long the handshake, and then each reply (from when we start waiting for it),
    /// may take.
    timeout: Duration,
    pipeline: Pipeline,
    cookie: u64,
    /// Why the connection is out of step with the server, once it is.
    broken: Option<String>,
    /// Scratch buffers for reads widened to the server's alignment, kept between calls.
    spare: Vec<Vec<u8>>,
}

/// A read in flight.
struct Pending {
    cookie: u64,
    /// Where and how much the server was asked for.
    offset: u64,
    len: u32,
    /// Where the wanted bytes go in the caller's buffer, and how many there are.
    dst: usize,
    take: usize,
    /// For a widened read: the buffer the whole reply goes to, and where in it the wanted
    /// bytes start. None when the reply is exactly the wanted bytes.
    scratch: Option<(Vec<u8>, usize)>,
}

impl Client {
    /// Connects to `socket` and opens `export`. The handshake must be over within
    /// `timeout`, and later each reply must arrive within it.
    pub fn connect(socket: &Path, export: &str, timeout: Duration) -> Result<Client, NbdError> {
        let sock = UnixStream::connect(socket).map_err(io_err(format!("connecting to {}", socket.display())))?;
        let mut c = Client {
            sock,
            size: 0,
            min_block: 1,
            max_block: DEFAULT_MAX_BLOCK,
            timeout,
            pipeline: Pipeline::default(),
            cookie: 0,
            broken: None,
            spare: Vec::new(),
        };
        let deadline = Instant::now() + timeout;
        c.handshake(export, deadline)?;
        Ok(c)
    }

    /// Sets how reads are pipelined; out-of-range values are clamped.
    pub fn set_pipeline(&mut self, p: Pipeline) {
        self.pipeline = Pipeline { depth: p.depth.clamp(1, MAX_DEPTH), request: p.request.max(1) };
    }

    fn handshake(&mut self, export: &str, deadline: Instant) -> Result<(), NbdError> {
        let mut hello = [0u8; 18];
        self.read_full(&mut hello, deadline).map_err(io_err("reading the server's greeting"))?;
        if be64(&hello[0..8]) != NBDMAGIC || be64(&hello[8..16]) != IHAVEOPT {
            return protocol("not an NBD newstyle server");
        }
        let flags = u16::from_be_bytes([hello[16], hello[17]]);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return protocol("the server does not speak fixed newstyle");
        }
        // Skipping the 124 zero bytes of the old export reply only matters for NBD_OPT_EXPORT_NAME;
        // asking for NO_ZEROES when offered is still the polite answer.
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        let name = export.as_bytes();
        let name_len = u32::try_from(name.len()).map_err(|_| NbdError::Protocol("export name too long".into()))?;
        let mut msg = Vec::with_capacity(32 + name.len());
        msg.extend_from_slice(&client_flags.to_be_bytes());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(4 + name_len + 2 + 2).to_be_bytes());
        msg.extend_from_slice(&name_len.to_be_bytes());
        msg.extend_from_slice(name);
        msg.extend_from_slice(&1u16.to_be_bytes());
        msg.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.write_full(&msg, deadline).map_err(io_err("sending NBD_OPT_GO"))?;

        let mut got_export = false;
        loop {
            let mut hdr = [0u8; 20];
            self.read_full(&mut hdr, deadline).map_err(io_err("reading an option reply"))?;
            let (magic, opt, kind, len) = (be64(&hdr[0..8]), be32(&hdr[8..12]), be32(&hdr[12..16]), be32(&hdr[16..20]));
            if magic != OPT_REPLY_MAGIC || opt != OPT_GO {
                return protocol(format!("bad option reply (magic {magic:#x}, option {opt})"));
            }
            if len > MAX_OPTION_REPLY {
                return protocol(format!("an option reply of {len} bytes"));
            }
            let mut data = vec![0u8; len as usize];
            self.read_full(&mut data, deadline).map_err(io_err("reading an option reply"))?;
            match kind {
                REP_ACK if got_export => return Ok(()),
                REP_ACK => return protocol("the server accepted the export without saying its size"),
                REP_INFO => self.info(&data, &mut got_export)?,
                k if k & REP_ERROR_BIT != 0 => {
                    return protocol(format!(
                        "the server refused export {export:?} (error {:#x}): {}",
                        k & !REP_ERROR_BIT,
                        String::from_utf8_lossy(&data)
                    ))
                }
                // Replies a newer server may add are ignored, as the protocol says.
                _ => {}
            }
        }
    }

    fn info(&mut self, data: &[u8], got_export: &mut bool) -> Result<(), NbdError> {
        if data.len() < 2 {
            return protocol("a truncated info reply");
        }
        match u16::from_be_bytes([data[0], data[1]]) {
            INFO_EXPORT if data.len() == 12 => {
                self.size = be64(&data[2..10]);
                *got_export = true;
            }
            INFO_BLOCK_SIZE if data.len() == 14 => {
                let (min, max) = (be32(&data[2..6]), be32(&data[10..14]));
                if min == 0 || !min.is_power_of_two() || min > (64 << 10) || max < min {
                    return protocol(format!("nonsense block sizes: minimum {min}, maximum {max}"));
                }
                self.min_block = min;
                self.max_block = max;
            }
            INFO_EXPORT | INFO_BLOCK_SIZE => return protocol(format!("an info reply of {} bytes", data.len())),
            _ => {}
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, widening to the server's alignment, splitting
    /// into requests of the pipeline's size, and keeping up to its depth in flight.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        if let Some(why) = &self.broken {
            return protocol(format!("the connection is unusable after an earlier failure ({why})"));
        }
        let r = self.read_pipelined(offset, buf);
        if let Err(e) = &r {
            self.broken = Some(e.to_string());
        }
        r
    }

    fn read_pipelined(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.size);
        let Some(end) = end else {
            return protocol(format!(
                "a read of {} bytes at {offset} is past the export's end ({})",
                buf.len(),
                self.size
            ));
        };
        let min = u64::from(self.min_block);
        // The largest aligned read we send: what we prefer, within what the server allows.
        let cap = self.pipeline.request.min(self.max_block).min(MAX_REQUEST);
        let max = (u64::from(cap) / min * min).max(min);
        let depth = self.pipeline.depth.clamp(1, MAX_DEPTH);
        let mut inflight: Vec<Pending> = Vec::with_capacity(depth);
        let mut requests: Vec<u8> = Vec::with_capacity(depth * REQUEST_LEN);
        let mut next = offset;
        while next < end || !inflight.is_empty() {
            requests.clear();
            while next < end && inflight.len() < depth {
                let a_start = next / min * min;
                let a_end = (a_start + max).min(end.div_ceil(min).saturating_mul(min)).min(self.size);
                let take_end = a_end.min(end);
                let len = u32::try_from(a_end - a_start)
                    .map_err(|_| NbdError::Protocol("a read request too large".into()))?;
                let scratch = if a_start == next && a_end == take_end {
                    None
                } else {
                    let mut v = self.spare.pop().unwrap_or_default();
                    v.resize(len as usize, 0);
                    Some((v, (next - a_start) as usize))
                };
                self.cookie = self.cookie.wrapping_add(1);
                requests.extend_from_slice(&request(CMD_READ, self.cookie, a_start, len));
                inflight.push(Pending {
                    cookie: self.cookie,
                    offset: a_start,
                    len,
                    dst: (next - offset) as usize,
                    take: (take_end - next) as usize,
                    scratch,
                });
                next = take_end;
            }
            if !requests.is_empty() {
                let deadline = Instant::now() + self.timeout;
                self.write_full(&requests, deadline).map_err(io_err("sending read requests"))?;
            }
            self.receive_one(&mut inflight, buf)?;
        }
        Ok(())
    }

    /// Waits for one reply, matches it to a read in flight, and puts its payload in place.
    fn receive_one(&mut self, inflight: &mut Vec<Pending>, buf: &mut [u8]) -> Result<(), NbdError> {
        let deadline = Instant::now() + self.timeout;
        let waiting = inflight.len();
        let mut rep = [0u8; REPLY_LEN];
        self.read_full(&mut rep, deadline)
            .map_err(io_err(format!("waiting for a reply with {waiting} reads in flight")))?;
        if be32(&rep[0..4]) != SIMPLE_REPLY_MAGIC {
            return protocol(format!("bad reply magic {:#x}", be32(&rep[0..4])));
        }
        let cookie = be64(&rep[8..16]);
        let Some(i) = inflight.iter().position(|p| p.cookie == cookie) else {
            return protocol(format!("a reply with cookie {cookie:#x}, which matches no read in flight"));
        };
        let mut p = inflight.swap_remove(i);
        let error = be32(&rep[4..8]);
        if error != 0 {
            return protocol(format!(
                "the server failed to read {} bytes at {}: {}",
                p.len,
                p.offset,
                io::Error::from_raw_os_error(i32::try_from(error).unwrap_or(i32::MAX))
            ));
        }
        let what = || format!("reading the {} bytes of data at {}", p.len, p.offset);
        match p.scratch.take() {
            None => {
                let dst = buf
                    .get_mut(p.dst..p.dst + p.take)
                    .ok_or_else(|| NbdError::Protocol("a read outside the buffer".into()))?;
                self.read_full(dst, deadline).map_err(io_err(what()))?;
            }
            Some((mut v, skip)) => {
                self.read_full(&mut v, deadline).map_err(io_err(what()))?;
                let (dst, src) = (buf.get_mut(p.dst..p.dst + p.take), v.get(skip..skip + p.take));
                match (dst, src) {
                    (Some(d), Some(s)) => d.copy_from_slice(s),
                    _ => return protocol("a widened read that does not cover what was asked"),
                }
                self.spare.push(v);
            }
        }
        Ok(())
    }

    /// Fills `buf` from the socket by `deadline`.
    fn read_full(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the server sent {got} of {} bytes within {:?}", buf.len(), self.timeout),
                ));
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the server hung up after {got} of {} bytes", buf.len()),
                    ))
                }
                Ok(n) => got += n,
                // A timeout shows as WouldBlock on Linux; the loop then checks the deadline.
                Err(e) if retryable(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` to the socket by `deadline`.
    fn write_full(&mut self, buf: &[u8], deadline: Instant) -> io::Result<()> {
        let mut sent = 0;
        while sent < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the server took {sent} of {} bytes within {:?}", buf.len(), self.timeout),
                ));
            }
            self.sock.set_write_timeout(Some(left))?;
            match self.sock.write(&buf[sent..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the server stopped reading")),
                Ok(n) => sent += n,
                Err(e) if retryable(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A socket error after which the loop goes on (and checks its deadline): a signal, or a
/// socket timeout, which shows as WouldBlock on Linux.
fn retryable(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// One request header.
fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut req = [0u8; REQUEST_LEN];
    req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req[6..8].copy_from_slice(&cmd.to_be_bytes());
    req[8..16].copy_from_slice(&cookie.to_be_bytes());
    req[16..24].copy_from_slice(&offset.to_be_bytes());
    req[24..28].copy_from_slice(&len.to_be_bytes());
    req
}

impl Drop for Client {
    fn drop(&mut self) {
        // A polite goodbye, never waited for (a server that stops reading must not hold us
        // up); the socket is closed either way.
        if self.sock.set_nonblocking(true).is_ok() {
            let _ = self.sock.write(&request(CMD_DISC, 0, 0, 0));
        }
    }
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted server: sends `script` after reading `expect_in` bytes, then hangs up.
    fn scripted(script: Vec<u8>, expect_in: usize) -> (tempfile::TempDir, std::thread::JoinHandle<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&script[..18.min(script.len())]).unwrap();
            let mut got = vec![0u8; expect_in];
            let _ = s.read_exact(&mut got);
            let _ = s.write_all(&script[18.min(script.len())..]);
            got
        });
        (dir, h)
    }

    fn hello() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&NBDMAGIC.to_be_bytes());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        v
    }

    fn opt_reply(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&OPT_GO.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn connect(script: Vec<u8>) -> Result<Client, NbdError> {
        // client flags (4) + option header (16) + name length (4) + "e" + info count and type (4)
        let (dir, h) = scripted(script, 4 + 16 + 4 + 1 + 4);
        let r = Client::connect(&dir.path().join("s"), "e", Duration::from_secs(5));
        let sent = h.join().unwrap();
        if r.is_ok() {
            assert_eq!(&sent[4..12], &IHAVEOPT.to_be_bytes());
            assert_eq!(&sent[24..25], b"e");
        }
        r
    }

    #[test]
    fn handshake_reads_size_and_block_sizes() {
        let mut s = hello();
        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 30).to_be_bytes());
        export.extend_from_slice(&3u16.to_be_bytes());
        s.extend(opt_reply(REP_INFO, &export));
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 1 << 20] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        s.extend(opt_reply(REP_INFO, &bs));
        s.extend(opt_reply(REP_ACK, &[]));
        let c = connect(s).unwrap();
        assert_eq!((c.size, c.min_block, c.max_block), (1 << 30, 512, 1 << 20));
    }

    #[test]
    fn garbage_and_refusals_are_errors() {
        let e = connect(b"HTTP/1.1 400 Bad Request\r\n".to_vec()).err().unwrap();
        assert!(e.to_string().contains("not an NBD"), "{e}");
        let mut s = hello();
        s.extend(opt_reply(REP_ERROR_BIT | 6, b"no such export"));
        let e = connect(s).err().unwrap();
        assert!(e.to_string().contains("no such export"), "{e}");
        let mut s = hello();
        s.extend(opt_reply(REP_INFO, &[0u8; 1]));
        assert!(connect(s).is_err());
        let mut s = hello();
        let mut huge = opt_reply(REP_INFO, &[]);
        huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        s.extend(huge);
        let e = connect(s).err().unwrap();
        assert!(e.to_string().contains("option reply of"), "{e}");
        let mut s = hello();
        s.extend(opt_reply(REP_ACK, &[]));
        let e = connect(s).err().unwrap();
        assert!(e.to_string().contains("without saying its size"), "{e}");
        // The server hangs up mid-handshake.
        let e = connect(hello()).err().unwrap();
        assert!(matches!(e, NbdError::Io { .. }), "{e}");
    }

    /// A server that completes the handshake (export of `size` bytes, minimum block `min`),
    /// then hands the connection to `serve`.
    fn peer(
        size: u64,
        min: u32,
        serve: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&hello()).unwrap();
            let mut go = [0u8; 4 + 16 + 4 + 1 + 4];
            s.read_exact(&mut go).unwrap();
            let mut export = INFO_EXPORT.to_be_bytes().to_vec();
            export.extend_from_slice(&size.to_be_bytes());
            export.extend_from_slice(&1u16.to_be_bytes());
            let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [min, 4096, 32 << 20] {
                bs.extend_from_slice(&v.to_be_bytes());
            }
            let mut reply = opt_reply(REP_INFO, &export);
            reply.extend(opt_reply(REP_INFO, &bs));
            reply.extend(opt_reply(REP_ACK, &[]));
            s.write_all(&reply).unwrap();
            serve(&mut s);
        });
        (dir, h)
    }

    /// A request as the peer sees it.
    #[derive(Debug, Clone, Copy)]
    struct Req {
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    }

    fn read_req(s: &mut UnixStream) -> Req {
        let mut r = [0u8; REQUEST_LEN];
        s.read_exact(&mut r).unwrap();
        assert_eq!(be32(&r[0..4]), REQUEST_MAGIC);
        Req {
            cmd: u16::from_be_bytes([r[6], r[7]]),
            cookie: be64(&r[8..16]),
            offset: be64(&r[16..24]),
            len: be32(&r[24..28]),
        }
    }

    fn reply_header(cookie: u64, error: u32) -> Vec<u8> {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&error.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v
    }

    /// The byte the test export holds at `at`.
    fn pattern(at: u64) -> u8 {
        (at % 251) as u8 ^ (at >> 12) as u8
    }

    fn reply_data(r: &Req) -> Vec<u8> {
        let mut v = reply_header(r.cookie, 0);
        v.extend((r.offset..r.offset + u64::from(r.len)).map(pattern));
        v
    }

    fn client(dir: &tempfile::TempDir, depth: usize, request: u32, timeout: Duration) -> Client {
        let mut c = Client::connect(&dir.path().join("s"), "e", timeout).unwrap();
        c.set_pipeline(Pipeline { depth, request });
        c
    }

    #[test]
    fn pipelined_reads_take_replies_in_any_order() {
        const SIZE: u64 = 1 << 20;
        // Unaligned at both ends, so the first and last requests are widened to 512 bytes.
        let (offset, len) = (100u64, 70_000usize);
        let (depth, request) = (4usize, 4096u32);
        let (dir, h) = peer(SIZE, 512, move |s| {
            // The client keeps `depth` requests in flight: answer each batch backwards.
            let mut seen = Vec::new();
            loop {
                let mut batch = Vec::new();
                while batch.len() < depth {
                    let r = read_req(s);
                    if r.cmd == CMD_DISC {
                        assert!(batch.is_empty(), "goodbye with reads unanswered");
                        assert!(seen.len() > depth, "the reads were split: {seen:?}");
                        return;
                    }
                    assert_eq!(r.cmd, CMD_READ);
                    assert!(r.len <= request && r.offset % 512 == 0 && r.len % 512 == 0, "{r:?}");
                    batch.push(r);
                    seen.push(r);
                    // The last requests of the read: the client sends no more until answered.
                    if r.offset + u64::from(r.len) >= (offset + len as u64).div_ceil(512) * 512 {
                        break;
                    }
                }
                for r in batch.iter().rev() {
                    s.write_all(&reply_data(r)).unwrap();
                }
            }
        });
        let mut c = client(&dir, depth, request, Duration::from_secs(5));
        let mut buf = vec![0u8; len];
        c.read_at(offset, &mut buf).unwrap();
        let want: Vec<u8> = (offset..offset + len as u64).map(pattern).collect();
        assert!(buf == want, "the data landed in the wrong place");
        // The connection is still in step: a second read works too.
        let mut small = vec![0u8; 10];
        let (dir2, h2) = peer(SIZE, 1, |s| {
            let r = read_req(s);
            s.write_all(&reply_data(&r)).unwrap();
            let _ = read_req(s);
        });
        let mut c2 = client(&dir2, 8, 1 << 20, Duration::from_secs(5));
        c2.read_at(SIZE - 10, &mut small).unwrap();
        assert_eq!(small, (SIZE - 10..SIZE).map(pattern).collect::<Vec<_>>());
        drop((c, c2));
        h.join().unwrap();
        h2.join().unwrap();
    }

    /// Runs one read of 16 KiB in 4 KiB requests, depth 4, against `serve`; returns the
    /// error, and checks that the client refuses to go on.
    fn failing(serve: impl FnOnce(&mut UnixStream, Vec<Req>) + Send + 'static) -> NbdError {
        let (dir, h) = peer(1 << 20, 1, |s| {
            let reqs: Vec<Req> = (0..4).map(|_| read_req(s)).collect();
            serve(s, reqs);
        });
        let mut c = client(&dir, 4, 4096, Duration::from_millis(300));
        let mut buf = vec![0u8; 16384];
        let e = c.read_at(0, &mut buf).unwrap_err();
        let again = c.read_at(0, &mut buf).unwrap_err();
        assert!(again.to_string().contains("unusable after an earlier failure"), "{again}");
        drop(c);
        h.join().unwrap();
        e
    }

    #[test]
    fn a_reply_to_no_request_is_an_error() {
        let e = failing(|s, reqs| {
            s.write_all(&reply_data(&reqs[1])).unwrap();
            let mut bogus = reqs[2];
            bogus.cookie = 0xdead_beef;
            s.write_all(&reply_data(&bogus)).unwrap();
        });
        assert!(e.to_string().contains("cookie 0xdeadbeef, which matches no read in flight"), "{e}");
        // The same reply twice: the second matches nothing any more.
        let e = failing(|s, reqs| {
            s.write_all(&reply_data(&reqs[3])).unwrap();
            s.write_all(&reply_data(&reqs[3])).unwrap();
        });
        assert!(e.to_string().contains("matches no read in flight"), "{e}");
    }

    #[test]
    fn an_error_reply_names_the_read_and_the_error() {
        let e = failing(|s, reqs| {
            s.write_all(&reply_data(&reqs[0])).unwrap();
            s.write_all(&reply_header(reqs[2].cookie, 5)).unwrap();
        });
        let text = e.to_string();
        assert!(text.contains("failed to read 4096 bytes at 8192") && text.contains("Input/output error"), "{text}");
    }

    #[test]
    fn garbage_short_replies_hang_ups_and_silence_are_errors() {
        let e = failing(|s, _| s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap());
        assert!(e.to_string().contains("bad reply magic"), "{e}");
        // Half the data, then the server hangs up.
        let e = failing(|s, reqs| {
            let r = reply_data(&reqs[1]);
            s.write_all(&r[..REPLY_LEN + 1000]).unwrap();
        });
        assert!(matches!(e, NbdError::Io { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("4096 bytes of data at 4096") && text.contains("hung up after 1000 of 4096"), "{text}");
        // A hang-up with every read in flight.
        let e = failing(|_, _| {});
        assert!(e.to_string().contains("4 reads in flight") && e.to_string().contains("hung up after 0"), "{e}");
        // A server that answers nothing but keeps the connection: the deadline ends the wait.
        let e = failing(|s, _| {
            // Until the client gives up and says goodbye.
            let mut b = [0u8; REQUEST_LEN];
            let _ = s.read_exact(&mut b);
        });
        let NbdError::Io { source, .. } = &e else { panic!("{e}") };
        assert_eq!(source.kind(), io::ErrorKind::TimedOut, "{e}");
    }

    #[test]
    fn reads_past_the_end_are_refused_before_sending() {
        let (dir, h) = peer(4096, 1, |s| {
            let r = read_req(s);
            assert_eq!(r.cmd, CMD_DISC, "{r:?}");
        });
        let mut c = client(&dir, 4, 4096, Duration::from_secs(5));
        let e = c.read_at(4000, &mut [0u8; 200]).unwrap_err();
        assert!(e.to_string().contains("past the export's end"), "{e}");
        assert!(c.read_at(u64::MAX, &mut [0u8; 2]).is_err());
        drop(c);
        h.join().unwrap();
    }
}
