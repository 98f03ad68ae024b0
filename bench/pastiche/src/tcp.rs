//! The baseline: a plain copy of a file over one TCP connection on loopback into a file, then an
//! fsync. The same disk work as a pastiche pull (read the file, write the file, fsync), none of
//! its protocol, hashing or journaling.
//!
//! Both ends use a read/write loop through a user-space buffer, as any program that looks at the
//! bytes must (`std::io::copy` would use `sendfile`/`splice` here, which pastiche cannot: it
//! hashes every byte).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::now;

/// Buffer of each end (the size of a pastiche gRPC chunk).
const BUF: usize = 1 << 20;

/// Copies `src` to `dst` over TCP on `127.0.0.1`; returns the time from the connect to the end of
/// the receiver's fsync, and the bytes received.
pub fn copy(src: &Path, dst: &Path) -> io::Result<(Duration, u64)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut input = File::open(src)?;
    let mut out = File::create(dst)?;
    let start = now();
    let sender = std::thread::spawn(move || -> io::Result<u64> {
        let mut sock = TcpStream::connect(addr)?;
        let mut buf = vec![0u8; BUF];
        let mut sent = 0u64;
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            sock.write_all(&buf[..n])?;
            sent += n as u64;
        }
        sock.shutdown(Shutdown::Write)?;
        Ok(sent)
    });
    let (mut sock, _) = listener.accept()?;
    let mut buf = vec![0u8; BUF];
    let mut got = 0u64;
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        got += n as u64;
    }
    out.sync_all()?;
    let took = now().duration_since(start);
    let sent = sender
        .join()
        .map_err(|_| io::Error::other("the sender thread panicked"))??;
    if sent != got {
        return Err(io::Error::other(format!(
            "sent {sent} bytes, received {got}"
        )));
    }
    Ok((took, got))
}
