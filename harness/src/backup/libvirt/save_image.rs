//! libvirt's save image (what `virsh save` and an external memory snapshot write): a
//! header, the domain's XML (and a cookie) that libvirt restores the domain from, then
//! QEMU's migration stream. A backup's state file is untrusted input: the header is read
//! with bounds, and each way it can be wrong is named.
//!
//! The layout (libvirt's `virQEMUSaveHeader`, host byte order; libvirt 9.0): 16 bytes of
//! magic, then 19 u32 (version, data length, was running, compressed, cookie offset, 14
//! unused), 92 bytes in all; then `data length` bytes holding the XML (NUL-ended), the
//! cookie from `cookie offset` (NUL-ended) and zero padding; then the stream.
//!
//! The restore writes a new image: the same header fields, another XML (the restored
//! domain's, see [`super::restore`]), the same cookie, and the stream copied unchanged
//! (QEMU's stream does not name the domain, its disks or its sockets).

use std::io::{Read, Write};
use std::path::Path;

/// What a finished save begins with.
pub const MAGIC: &[u8; 16] = b"LibvirtQemudSave";
/// What a save libvirt did not finish begins with.
pub const MAGIC_PARTIAL: &[u8; 16] = b"LibvirtQemudPart";
/// The header's length: the magic and 19 u32.
pub const HEADER_BYTES: usize = 16 + 19 * 4;
/// The versions libvirt writes (2 since libvirt 0.9: with a cookie).
const VERSIONS: std::ops::RangeInclusive<u32> = 1..=2;
/// More than any domain's XML with its padding (libvirt pads to 64 KiB).
pub const MAX_DATA_BYTES: u32 = 16 << 20;

/// Why a state file is not a libvirt save image quiesce can restore.
#[derive(Debug, thiserror::Error)]
pub enum SaveImageError {
    /// The file could not be read or written.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// Not a libvirt save image at all (another program's file, or a QEMU migration
    /// stream without libvirt's header).
    #[error("it is not a libvirt save image (no LibvirtQemudSave magic at its start)")]
    NotSaveImage,
    /// libvirt never finished writing it (its magic still says so): the save failed.
    #[error("libvirt did not finish this save image (its magic is LibvirtQemudPart)")]
    Unfinished,
    /// A header version this quiesce does not know (a newer libvirt, or another byte order).
    #[error("its header version is {0}; quiesce reads versions 1 and 2 (written on this byte order)")]
    Version(u32),
    /// The header's lengths or offsets do not fit the file (damaged or not libvirt's).
    #[error("its header is damaged: {0}")]
    Header(String),
    /// The XML is not UTF-8 text.
    #[error("its domain XML is not UTF-8 text")]
    NotText,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> SaveImageError + '_ {
    move |source| SaveImageError::Io { what: what.to_owned(), source }
}

/// A save image's header and texts.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveImage {
    pub version: u32,
    pub was_running: bool,
    /// libvirt's compression of the stream (0: none); kept as it is.
    pub compressed: u32,
    pub xml: String,
    pub cookie: Option<String>,
    unused: [u32; 14],
    /// Where the stream starts.
    pub stream_offset: u64,
}

fn u32_at(h: &[u8], i: usize) -> u32 {
    let at = 16 + 4 * i;
    u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

/// Text up to its first NUL.
fn text(bytes: &[u8]) -> Result<String, SaveImageError> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8(bytes[..end].to_vec()).map_err(|_| SaveImageError::NotText)
}

/// Pure: the header and texts of a save image, from its first bytes (`head`, at least the
/// header and its data) and the file's length.
pub fn parse(head: &[u8], file_len: u64) -> Result<SaveImage, SaveImageError> {
    if head.len() < HEADER_BYTES {
        return Err(if head.len() >= 16 && &head[..16] == MAGIC_PARTIAL {
            SaveImageError::Unfinished
        } else if head.len() >= 16 && &head[..16] != MAGIC {
            SaveImageError::NotSaveImage
        } else {
            SaveImageError::Header(format!("the file is {} bytes, shorter than its header", head.len()))
        });
    }
    match &head[..16] {
        m if m == MAGIC => {}
        m if m == MAGIC_PARTIAL => return Err(SaveImageError::Unfinished),
        _ => return Err(SaveImageError::NotSaveImage),
    }
    let version = u32_at(head, 0);
    if !VERSIONS.contains(&version) {
        return Err(SaveImageError::Version(version));
    }
    let data_len = u32_at(head, 1);
    let (was_running, compressed, cookie_offset) = (u32_at(head, 2), u32_at(head, 3), u32_at(head, 4));
    if data_len == 0 || data_len > MAX_DATA_BYTES {
        return Err(SaveImageError::Header(format!(
            "its XML length is {data_len} bytes (at most {MAX_DATA_BYTES} are read)"
        )));
    }
    let stream_offset = HEADER_BYTES as u64 + u64::from(data_len);
    if stream_offset > file_len {
        return Err(SaveImageError::Header(format!(
            "its XML would end at byte {stream_offset}, past the file's end ({file_len} bytes)"
        )));
    }
    let data = head
        .get(HEADER_BYTES..HEADER_BYTES + data_len as usize)
        .ok_or_else(|| SaveImageError::Header("its XML was not read whole".into()))?;
    let has_cookie = version >= 2 && cookie_offset != 0;
    if has_cookie && cookie_offset >= data_len {
        return Err(SaveImageError::Header(format!(
            "its cookie offset {cookie_offset} is past its XML's {data_len} bytes"
        )));
    }
    let xml_end = if has_cookie { cookie_offset as usize } else { data.len() };
    let xml = text(&data[..xml_end])?;
    if xml.trim().is_empty() {
        return Err(SaveImageError::Header("it holds no domain XML".into()));
    }
    let cookie = if has_cookie { Some(text(&data[cookie_offset as usize..])?) } else { None };
    let mut unused = [0u32; 14];
    for (i, u) in unused.iter_mut().enumerate() {
        *u = u32_at(head, 5 + i);
    }
    Ok(SaveImage { version, was_running: was_running != 0, compressed, xml, cookie, unused, stream_offset })
}

impl SaveImage {
    /// Pure: the header and data of a save image that holds `xml` instead, everything else
    /// (the cookie, the stream's compression) as in `self`.
    pub fn header_with(&self, xml: &str) -> Vec<u8> {
        let mut data = xml.as_bytes().to_vec();
        data.push(0);
        let cookie_offset = match &self.cookie {
            Some(c) => {
                let at = data.len() as u32;
                data.extend_from_slice(c.as_bytes());
                data.push(0);
                at
            }
            None => 0,
        };
        let mut out = Vec::with_capacity(HEADER_BYTES + data.len());
        out.extend_from_slice(MAGIC);
        for v in [self.version, data.len() as u32, u32::from(self.was_running), self.compressed, cookie_offset] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for u in self.unused {
            out.extend_from_slice(&u.to_le_bytes());
        }
        out.extend_from_slice(&data);
        out
    }
}

/// Reads the header of the save image at `path`.
pub fn read(path: &Path) -> Result<SaveImage, SaveImageError> {
    let f = std::fs::File::open(path).map_err(io("open the saved state"))?;
    let len = f.metadata().map_err(io("read the saved state's size"))?.len();
    let mut head = Vec::new();
    f.take((HEADER_BYTES as u64) + u64::from(MAX_DATA_BYTES))
        .read_to_end(&mut head)
        .map_err(io("read the saved state's header"))?;
    parse(&head, len)
}

/// Writes at `to` a save image holding `xml` and the stream of the image at `from`.
pub fn rewrite(from: &Path, image: &SaveImage, xml: &str, to: &Path) -> Result<(), SaveImageError> {
    use std::io::{Seek, SeekFrom};
    if xml.len() >= MAX_DATA_BYTES as usize {
        return Err(SaveImageError::Header(format!("the new XML is {} bytes, too long", xml.len())));
    }
    let mut src = std::fs::File::open(from).map_err(io("open the saved state"))?;
    src.seek(SeekFrom::Start(image.stream_offset)).map_err(io("seek to the saved state's stream"))?;
    let mut dst = std::fs::File::create(to).map_err(io("create the restore's save image"))?;
    dst.write_all(&image.header_with(xml)).map_err(io("write the restore's save image"))?;
    std::io::copy(&mut src, &mut dst).map_err(io("copy the saved state's stream"))?;
    dst.sync_all().map_err(io("write the restore's save image"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As libvirt 9.0 writes one (the XML and cookie shortened, padded as libvirt pads).
    fn image(xml: &str, cookie: &str) -> Vec<u8> {
        let mut data = xml.as_bytes().to_vec();
        data.push(0);
        let at = data.len() as u32;
        data.extend_from_slice(cookie.as_bytes());
        data.push(0);
        data.resize(4096, 0);
        let mut out = MAGIC.to_vec();
        for v in [2u32, data.len() as u32, 1, 0, at] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&[0; 56]);
        out.extend_from_slice(&data);
        out.extend_from_slice(b"QEVM\0\0\0\x03stream");
        out
    }

    #[test]
    fn a_save_image_is_read_and_rewritten() {
        let bytes = image("<domain/>", "<cookie/>");
        let img = parse(&bytes, bytes.len() as u64).unwrap();
        assert_eq!((img.xml.as_str(), img.cookie.as_deref(), img.was_running), ("<domain/>", Some("<cookie/>"), true));
        assert_eq!(&bytes[img.stream_offset as usize..img.stream_offset as usize + 4], b"QEVM");
        let new = img.header_with("<domain><name>b</name></domain>");
        let again = parse(&new, new.len() as u64).unwrap();
        assert_eq!(again.xml, "<domain><name>b</name></domain>");
        assert_eq!(again.cookie, img.cookie);
        assert_eq!(again.stream_offset as usize, new.len());
    }

    #[test]
    fn a_bad_header_is_named() {
        let good = image("<domain/>", "<c/>");
        let len = good.len() as u64;
        assert!(matches!(
            parse(b"QEVM\0\0\0\x03 and a lot more bytes of a stream...", 100),
            Err(SaveImageError::NotSaveImage)
        ));
        let mut partial = good.clone();
        partial[..16].copy_from_slice(MAGIC_PARTIAL);
        assert!(matches!(parse(&partial, len), Err(SaveImageError::Unfinished)));
        assert!(matches!(parse(&good[..50], 50), Err(SaveImageError::Header(_))));
        let set = |i: usize, v: u32| {
            let mut b = good.clone();
            b[16 + 4 * i..20 + 4 * i].copy_from_slice(&v.to_le_bytes());
            b
        };
        assert!(matches!(parse(&set(0, 3), len), Err(SaveImageError::Version(3))));
        assert!(matches!(parse(&set(0, 2u32.swap_bytes()), len), Err(SaveImageError::Version(_))));
        assert!(matches!(parse(&set(1, 0), len), Err(SaveImageError::Header(_))));
        assert!(matches!(parse(&set(1, u32::MAX), len), Err(SaveImageError::Header(_))));
        // A data length past the file's end: the file was cut short.
        assert!(matches!(parse(&good[..200], 200), Err(SaveImageError::Header(_))));
        assert!(matches!(parse(&set(4, 5000), len), Err(SaveImageError::Header(_))));
        let mut bad_text = good.clone();
        bad_text[HEADER_BYTES] = 0xff;
        assert!(matches!(parse(&bad_text, len), Err(SaveImageError::NotText)));
    }
}
