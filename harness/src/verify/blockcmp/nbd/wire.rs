//! The transmission phase's wire format (request and simple-reply headers, big-endian
//! fields) and the socket I/O under a deadline that both phases use.

use std::io::{self, Read, Write};
use std::time::Instant;

use super::Client;

pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(super) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(super) const CMD_READ: u16 = 0;
pub(super) const CMD_DISC: u16 = 2;
pub(super) const REQUEST_LEN: usize = 28;
pub(super) const REPLY_LEN: usize = 16;

impl Client {
    /// Fills `buf` from the socket by `deadline`.
    pub(super) fn read_full(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
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
    pub(super) fn write_full(&mut self, buf: &[u8], deadline: Instant) -> io::Result<()> {
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
pub(super) fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut req = [0u8; REQUEST_LEN];
    req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req[6..8].copy_from_slice(&cmd.to_be_bytes());
    req[8..16].copy_from_slice(&cookie.to_be_bytes());
    req[16..24].copy_from_slice(&offset.to_be_bytes());
    req[24..28].copy_from_slice(&len.to_be_bytes());
    req
}

pub(super) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

pub(super) fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}
