//! Line framing for QMP and the guest agent.
//!
//! Both protocols send one JSON document per `\n`-terminated line. The guest agent also
//! sends a 0xFF sentinel byte before a `guest-sync-delimited` reply, so the host can find
//! the start of a fresh reply after garbage or a half-read line. Lines are bounded: the
//! guest is untrusted and must not make the harness allocate without limit.

use tokio::io::{AsyncRead, AsyncReadExt};

/// The guest agent's resync sentinel; never valid inside UTF-8 JSON.
pub const DELIMITER: u8 = 0xFF;

/// One unit read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line without its terminator (may still be non-JSON garbage).
    Line(Vec<u8>),
    /// A 0xFF sentinel byte. Any partial line before it was discarded.
    Delimiter,
    /// A line longer than the bound; its bytes were discarded up to the next newline.
    TooLong { len: usize },
}

/// Reads frames from a byte stream. Cancel-safe: all state lives in `self`, so a
/// `next_frame` future dropped by a timeout loses no bytes.
pub struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    max_line: usize,
    /// Set while discarding the rest of an over-long line; counts what was dropped.
    skipping: Option<usize>,
    /// How many bytes at the start of `buf` are known to hold no separator, so each byte is
    /// looked at once: scanning the whole buffer after every read made a long line cost
    /// time quadratic in its length (found by the fuzz test: minutes for a 16 MiB line).
    scanned: usize,
    eof: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max_line: usize) -> Self {
        Self { inner, buf: Vec::new(), max_line, skipping: None, scanned: 0, eof: false }
    }

    /// The next frame, or `None` at end of stream (a trailing partial line is dropped).
    pub async fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.take_buffered() {
                return Ok(Some(frame));
            }
            if self.eof {
                return Ok(None);
            }
            let mut chunk = [0u8; 8192];
            let n = self.inner.read(&mut chunk).await?;
            if n == 0 {
                self.eof = true;
            } else {
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
    }

    fn take_buffered(&mut self) -> Option<Frame> {
        loop {
            let pos =
                self.buf[self.scanned..].iter().position(|&b| b == b'\n' || b == DELIMITER).map(|i| self.scanned + i);
            // Every branch below but the last drains or clears the buffer.
            self.scanned = 0;
            if let Some(skipped) = self.skipping {
                match pos {
                    None => {
                        self.skipping = Some(skipped + self.buf.len());
                        self.buf.clear();
                        return None;
                    }
                    Some(i) => {
                        let sep = self.buf[i];
                        self.buf.drain(..=i);
                        self.skipping = None;
                        // A delimiter discards any partial line before it, however long.
                        return Some(if sep == DELIMITER {
                            Frame::Delimiter
                        } else {
                            Frame::TooLong { len: skipped + i }
                        });
                    }
                }
            }
            match pos {
                Some(i) if self.buf[i] == DELIMITER => {
                    self.buf.drain(..=i);
                    return Some(Frame::Delimiter);
                }
                Some(i) => {
                    if i > self.max_line {
                        self.buf.drain(..=i);
                        return Some(Frame::TooLong { len: i });
                    }
                    let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some(Frame::Line(line));
                }
                None if self.buf.len() > self.max_line => {
                    self.skipping = Some(self.buf.len());
                    self.buf.clear();
                    continue;
                }
                None => {
                    self.scanned = self.buf.len();
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8], max: usize) -> Vec<Frame> {
        let mut r = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(f) = r.next_frame().await.unwrap() {
            out.push(f);
        }
        out
    }

    fn line(s: &str) -> Frame {
        Frame::Line(s.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn splits_lines_and_skips_blank_ones() {
        let got = frames(b"{\"a\":1}\r\n\n  \n{\"b\":2}\n", 100).await;
        assert_eq!(got, vec![line("{\"a\":1}"), line("{\"b\":2}")]);
    }

    #[tokio::test]
    async fn delimiter_discards_partial_line() {
        let got = frames(b"{\"return\": garb\xff{\"return\": 7}\n", 100).await;
        assert_eq!(got, vec![Frame::Delimiter, line("{\"return\": 7}")]);
    }

    #[tokio::test]
    async fn repeated_delimiters_are_each_reported() {
        let got = frames(b"\xff\xff{}\n", 100).await;
        assert_eq!(got, vec![Frame::Delimiter, Frame::Delimiter, line("{}")]);
    }

    #[tokio::test]
    async fn over_long_line_is_dropped_and_reading_resumes() {
        let mut input = vec![b'x'; 1000];
        input.extend_from_slice(b"\n{\"ok\":true}\n");
        let got = frames(&input, 64).await;
        assert_eq!(got, vec![Frame::TooLong { len: 1000 }, line("{\"ok\":true}")]);
    }

    #[tokio::test]
    async fn delimiter_ends_an_over_long_partial_line() {
        let mut input = vec![b'y'; 300];
        input.extend_from_slice(b"\xff{}\n");
        let got = frames(&input, 64).await;
        assert_eq!(got, vec![Frame::Delimiter, line("{}")]);
    }

    #[tokio::test]
    async fn over_long_line_across_many_reads_is_bounded() {
        // A stream that never ends its line must not grow the buffer without limit.
        let (mut tx, rx) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for _ in 0..200 {
                tx.write_all(&[b'z'; 100]).await.unwrap();
            }
            tx.write_all(b"\n{}\n").await.unwrap();
        });
        let mut r = LineReader::new(rx, 256);
        assert_eq!(r.next_frame().await.unwrap(), Some(Frame::TooLong { len: 20000 }));
        assert!(r.buf.capacity() < 64 * 1024);
        assert_eq!(r.next_frame().await.unwrap(), Some(line("{}")));
        writer.await.unwrap();
    }

    #[test]
    fn a_long_line_is_scanned_once() {
        // What was scanned for a separator is not scanned again after the next read: a
        // 16 MiB line in 8 KiB reads took minutes when every read rescanned the buffer.
        let mut r = LineReader::new(&b""[..], 1 << 20);
        r.buf.extend_from_slice(&[b'a'; 1000]);
        assert_eq!(r.take_buffered(), None);
        assert_eq!(r.scanned, 1000);
        r.buf.extend_from_slice(b"bb\n{}\n");
        assert_eq!(r.take_buffered(), Some(Frame::Line([&[b'a'; 1000][..], b"bb"].concat())));
        assert_eq!(r.scanned, 0, "the rest of the buffer is new");
        assert_eq!(r.take_buffered(), Some(line("{}")));
    }

    #[tokio::test]
    async fn trailing_partial_line_is_dropped_at_eof() {
        assert_eq!(frames(b"{}\n{\"half", 100).await, vec![line("{}")]);
    }
}
