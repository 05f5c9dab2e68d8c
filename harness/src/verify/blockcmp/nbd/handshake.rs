//! Opening an export: the fixed newstyle handshake and `NBD_OPT_GO`, asking for the
//! export's size and block sizes. Every option reply is bounded and checked.

use std::time::Instant;

use super::wire::{be32, be64};
use super::{io_err, protocol, Client, NbdError};

pub(super) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub(super) const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub(super) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(super) const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub(super) const FLAG_NO_ZEROES: u16 = 2;
pub(super) const OPT_GO: u32 = 7;
pub(super) const REP_ACK: u32 = 1;
pub(super) const REP_INFO: u32 = 3;
pub(super) const REP_ERROR_BIT: u32 = 1 << 31;
pub(super) const INFO_EXPORT: u16 = 0;
pub(super) const INFO_BLOCK_SIZE: u16 = 3;
/// Option replies longer than this are not from a server we talk to.
pub(super) const MAX_OPTION_REPLY: u32 = 64 << 10;

impl Client {
    pub(super) fn handshake(&mut self, export: &str, deadline: Instant) -> Result<(), NbdError> {
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
}
