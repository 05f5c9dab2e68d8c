//! A minimal NBD client over a unix socket: fixed newstyle handshake, `NBD_OPT_GO`, then
//! `NBD_CMD_READ` with simple replies, one request in flight per connection (parallelism
//! comes from several connections). Structured replies are never asked for, so the server
//! must answer every read with a simple reply.
//!
//! The server is QEMU's, but what it sends is still checked: lengths are bounded, magic
//! numbers and cookies must match, and every read and write has a timeout.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

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

/// Option replies longer than this are not from a server we talk to.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The largest read we send when the server does not say (the protocol's safe default).
const DEFAULT_MAX_BLOCK: u32 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(String),
}

fn protocol<T>(what: impl Into<String>) -> Result<T, NbdError> {
    Err(NbdError::Protocol(what.into()))
}

/// One connection to one export.
pub struct Client {
    sock: UnixStream,
    pub size: u64,
    /// Reads must start and end on multiples of this (the end of the export excepted).
    pub min_block: u32,
    /// No read may be longer than this.
    pub max_block: u32,
    cookie: u64,
}

impl Client {
    /// Connects to `socket` and opens `export`. `timeout` bounds every single read or write
    /// on the socket.
    pub fn connect(socket: &Path, export: &str, timeout: Duration) -> Result<Client, NbdError> {
        let sock = UnixStream::connect(socket)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        let mut c = Client { sock, size: 0, min_block: 1, max_block: DEFAULT_MAX_BLOCK, cookie: 0 };
        c.handshake(export)?;
        Ok(c)
    }

    fn handshake(&mut self, export: &str) -> Result<(), NbdError> {
        let mut hello = [0u8; 18];
        self.sock.read_exact(&mut hello)?;
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
        self.sock.write_all(&msg)?;

        let mut got_export = false;
        loop {
            let mut hdr = [0u8; 20];
            self.sock.read_exact(&mut hdr)?;
            let (magic, opt, kind, len) = (be64(&hdr[0..8]), be32(&hdr[8..12]), be32(&hdr[12..16]), be32(&hdr[16..20]));
            if magic != OPT_REPLY_MAGIC || opt != OPT_GO {
                return protocol(format!("bad option reply (magic {magic:#x}, option {opt})"));
            }
            if len > MAX_OPTION_REPLY {
                return protocol(format!("an option reply of {len} bytes"));
            }
            let mut data = vec![0u8; len as usize];
            self.sock.read_exact(&mut data)?;
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

    /// Reads `buf.len()` bytes at `offset`. The range must respect `min_block` and
    /// `max_block` (see [`Client::read_at`] for any range).
    fn read_exact_block(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let len = u32::try_from(buf.len()).map_err(|_| NbdError::Protocol("read too large".into()))?;
        self.cookie = self.cookie.wrapping_add(1);
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
        req[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&len.to_be_bytes());
        self.sock.write_all(&req)?;
        let mut rep = [0u8; 16];
        self.sock.read_exact(&mut rep)?;
        if be32(&rep[0..4]) != SIMPLE_REPLY_MAGIC {
            return protocol(format!("bad reply magic {:#x}", be32(&rep[0..4])));
        }
        if be64(&rep[8..16]) != self.cookie {
            return protocol("a reply to a request we did not send");
        }
        let error = be32(&rep[4..8]);
        if error != 0 {
            return protocol(format!(
                "the server failed to read {len} bytes at {offset}: {}",
                io::Error::from_raw_os_error(error as i32)
            ));
        }
        self.sock.read_exact(buf)?;
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, widening to the server's alignment and
    /// splitting to its maximum as needed.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.size);
        let Some(end) = end else {
            return protocol(format!(
                "a read of {} bytes at {offset} is past the export's end ({})",
                buf.len(),
                self.size
            ));
        };
        let min = u64::from(self.min_block);
        // The largest aligned read we may send.
        let max = (u64::from(self.max_block) / min * min).clamp(min, 32 << 20);
        let mut at = offset;
        let mut scratch = Vec::new();
        while at < end {
            let a_start = at / min * min;
            let a_end = (a_start + max).min(end.div_ceil(min).saturating_mul(min)).min(self.size);
            let take_end = a_end.min(end);
            let dst = &mut buf[(at - offset) as usize..(take_end - offset) as usize];
            if a_start == at && a_end == take_end {
                self.read_exact_block(at, dst)?;
            } else {
                scratch.resize((a_end - a_start) as usize, 0);
                self.read_exact_block(a_start, &mut scratch)?;
                let from = (at - a_start) as usize;
                dst.copy_from_slice(&scratch[from..from + dst.len()]);
            }
            at = take_end;
        }
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // A polite goodbye; the socket is closed either way.
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        let _ = self.sock.write_all(&req);
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
        assert!(matches!(e, NbdError::Io(_)), "{e}");
    }
}
