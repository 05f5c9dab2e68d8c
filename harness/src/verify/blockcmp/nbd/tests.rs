//! The client against scripted servers: the handshake, pipelined reads answered in any
//! order, and every way a server can misbehave.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use super::handshake::*;
use super::wire::*;
use super::*;

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
