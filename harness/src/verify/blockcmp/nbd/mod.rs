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

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use self::wire::{be32, be64};
use self::wire::{request, CMD_DISC, CMD_READ, REPLY_LEN, REQUEST_LEN, SIMPLE_REPLY_MAGIC};

mod handshake;
mod wire;

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

pub(super) fn protocol<T>(what: impl Into<String>) -> Result<T, NbdError> {
    Err(NbdError::Protocol(what.into()))
}

pub(super) fn io_err(during: impl Into<String>) -> impl FnOnce(io::Error) -> NbdError {
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

#[cfg(test)]
mod tests;
