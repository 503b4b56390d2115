//! A TCP key-value store for rendezvous (addresses of ranks, the NCCL unique id), as
//! torch's TCPStore: one server, every rank a client; `get` waits for the key. Clients must
//! present the job's token, so a stray process or another job on the same port is refused.
//! Before the token is checked a frame part may hold at most [`PRE_AUTH_MAX`] bytes, so a
//! stranger cannot make the store allocate; the token is compared in constant time and a
//! refused peer is logged once per address.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::bind::constant_time_eq;
use crate::error::{CommError, Result};

const MAGIC: &[u8; 8] = b"MOERUST1";
const SET: u8 = 1;
const GET: u8 = 2;
const ADD: u8 = 3;

/// The largest frame part read before the token is checked (the magic and the token).
pub const PRE_AUTH_MAX: usize = 4096;
/// The largest value an authenticated rank may set (a rendezvous value is bytes to KiB).
const VALUE_MAX: usize = 1 << 30;

fn err(msg: String) -> CommError {
    CommError::Rendezvous(msg)
}

fn write_frame(s: &mut impl Write, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for p in parts {
        buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
        buf.extend_from_slice(p);
    }
    s.write_all(&buf)
}

/// One length-prefixed part of at most `max` bytes; a longer one is refused before any
/// allocation.
fn read_part(s: &mut impl Read, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::other(format!(
            "store frame part of {len} bytes, over the {max} allowed"
        )));
    }
    let mut v = vec![0u8; len];
    s.read_exact(&mut v)?;
    Ok(v)
}

#[derive(Default)]
struct Shared {
    map: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    changed: Condvar,
    /// Peers already logged as refused (each is logged once).
    refused: Mutex<HashSet<IpAddr>>,
}

/// The store's server; it serves until the process exits.
pub struct StoreServer {
    addr: SocketAddr,
}

impl StoreServer {
    /// Listens on `addr` (port 0 picks one) for clients holding `token`.
    pub fn bind(addr: &str, token: &str) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            err(format!(
                "cannot listen on {addr}: {e}; pick a free --master-port (or MASTER_PORT)"
            ))
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| err(format!("listener on {addr}: {e}")))?;
        let shared = Arc::new(Shared::default());
        let token = token.as_bytes().to_vec();
        std::thread::Builder::new()
            .name("moeru-store".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let (shared, token) = (shared.clone(), token.clone());
                    let _ = std::thread::Builder::new()
                        .name("moeru-store-conn".into())
                        .spawn(move || serve(conn, &shared, &token));
                }
            })
            .map_err(|e| err(format!("store thread: {e}")))?;
        Ok(Self { addr: local })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Logs the first refusal of each peer address.
fn log_refusal(shared: &Shared, peer: Option<SocketAddr>, why: &str) {
    let Some(peer) = peer else { return };
    let mut seen = shared.refused.lock().unwrap_or_else(|e| e.into_inner());
    if seen.insert(peer.ip()) {
        eprintln!("warning: the rendezvous store refused a connection from {peer}: {why} (logged once per address)");
    }
}

fn serve(mut s: TcpStream, shared: &Shared, token: &[u8]) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let peer = s.peer_addr().ok();
    // A peer that never finishes its hello must not hold a thread forever.
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let hello = read_part(&mut s, PRE_AUTH_MAX).and_then(|magic| {
        let theirs = read_part(&mut s, PRE_AUTH_MAX)?;
        Ok(magic == MAGIC && constant_time_eq(&theirs, token))
    });
    match hello {
        Ok(true) => {}
        Ok(false) => {
            log_refusal(shared, peer, "wrong job token");
            write_frame(&mut s, &[b"bad token"])?;
            return Ok(());
        }
        Err(e) => {
            log_refusal(shared, peer, &e.to_string());
            return Ok(());
        }
    }
    s.set_read_timeout(None)?;
    write_frame(&mut s, &[b"ok"])?;
    loop {
        let cmd = read_part(&mut s, PRE_AUTH_MAX)?;
        let key = read_part(&mut s, PRE_AUTH_MAX)?;
        let arg = read_part(&mut s, VALUE_MAX)?;
        match cmd.first().copied() {
            Some(SET) => {
                let mut m = shared.map.lock().unwrap_or_else(|e| e.into_inner());
                m.insert(key, arg);
                shared.changed.notify_all();
                drop(m);
                write_frame(&mut s, &[b"ok", b""])?;
            }
            Some(GET) => {
                let ms = u64::from_le_bytes(arg.as_slice().try_into().unwrap_or([0; 8]));
                match wait_for(shared, &key, Duration::from_millis(ms), &s) {
                    Some(v) => write_frame(&mut s, &[b"ok", &v])?,
                    None => write_frame(&mut s, &[b"timeout", b""])?,
                }
            }
            Some(ADD) => {
                let delta = i64::from_le_bytes(arg.as_slice().try_into().unwrap_or([0; 8]));
                let mut m = shared.map.lock().unwrap_or_else(|e| e.into_inner());
                let old = m
                    .get(&key)
                    .and_then(|v| v.as_slice().try_into().ok())
                    .map_or(0, i64::from_le_bytes);
                // A sum past i64 leaves the value as it was and says so.
                let Some(new) = old.checked_add(delta) else {
                    drop(m);
                    write_frame(&mut s, &[b"overflow", b""])?;
                    continue;
                };
                m.insert(key, new.to_le_bytes().to_vec());
                shared.changed.notify_all();
                drop(m);
                write_frame(&mut s, &[b"ok", &new.to_le_bytes()])?;
            }
            _ => return Ok(()),
        }
    }
}

/// The value of `key`, waiting up to `wait` (any length: a deadline past what `Instant` can
/// hold waits until the key is set) for some client to set it. Stops early, with `None`,
/// once the client `s` has closed its connection, so a waiter that went away does not hold
/// a thread until its deadline.
fn wait_for(shared: &Shared, key: &[u8], wait: Duration, s: &TcpStream) -> Option<Vec<u8>> {
    let deadline = Instant::now().checked_add(wait);
    let mut m = shared.map.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(v) = m.get(key) {
            return Some(v.clone());
        }
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::MAX,
        };
        if left.is_zero() || peer_closed(s) {
            return None;
        }
        m = shared
            .changed
            .wait_timeout(m, left.min(Duration::from_secs(1)))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Whether the peer of `s` has closed its side (a non-blocking peek sees end of stream).
fn peer_closed(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let closed = match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    closed || s.set_nonblocking(false).is_err()
}

/// One rank's connection to the store.
pub struct StoreClient {
    stream: Mutex<TcpStream>,
    addr: String,
    timeout: Duration,
}

impl StoreClient {
    /// Connects to `addr` (retrying until `timeout`, as the server may start later) and
    /// presents `token`.
    pub fn connect(addr: &str, token: &str, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            let attempt = addr
                .to_socket_addrs()
                .map_err(|e| err(format!("cannot resolve the store address {addr}: {e}")))?
                .next()
                .ok_or_else(|| err(format!("the store address {addr} resolves to nothing")))
                .and_then(|a| {
                    TcpStream::connect_timeout(&a, Duration::from_secs(2))
                        .map_err(|e| err(e.to_string()))
                });
            match attempt {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(err(format!(
                        "no rendezvous store answered at {addr} within {:.0}s ({e}); check MASTER_ADDR/MASTER_PORT and that rank 0 or the launcher is running",
                        timeout.as_secs_f64()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let _ = stream.set_nodelay(true);
        let io = |e: std::io::Error| err(format!("store at {addr}: {e}"));
        write_frame(&mut stream, &[MAGIC, token.as_bytes()]).map_err(io)?;
        let reply = read_part(&mut stream, PRE_AUTH_MAX).map_err(io)?;
        if reply != b"ok" {
            return Err(err(format!(
                "the store at {addr} refused this job's token; another job is using the port, or the ranks were started with different MOERU_JOB_TOKEN values"
            )));
        }
        Ok(Self {
            stream: Mutex::new(stream),
            addr: addr.to_string(),
            timeout,
        })
    }

    /// The local address of the connection: the interface that reaches the store, which
    /// peers on other nodes can reach too.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        let s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        s.local_addr().ok().map(|a| a.ip())
    }

    fn call(&self, cmd: u8, key: &str, arg: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let io = |e: std::io::Error| err(format!("store at {}: {e}", self.addr));
        write_frame(&mut *s, &[&[cmd], key.as_bytes(), arg]).map_err(io)?;
        let status = read_part(&mut *s, PRE_AUTH_MAX).map_err(io)?;
        let value = read_part(&mut *s, VALUE_MAX).map_err(io)?;
        Ok((status, value))
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.call(SET, key, value).map(|_| ())
    }

    /// The value of `key`, waiting up to the client's timeout for some rank to set it.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let ms = self.timeout.as_millis() as u64;
        let (status, value) = self.call(GET, key, &ms.to_le_bytes())?;
        if status == b"ok" {
            Ok(value)
        } else {
            Err(err(format!(
                "waited {:.0}s at the store {} for `{key}`, which no rank set; a rank did not start or failed early",
                self.timeout.as_secs_f64(),
                self.addr
            )))
        }
    }

    /// Adds `delta` to the integer at `key` (0 when unset); returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let (status, value) = self.call(ADD, key, &delta.to_le_bytes())?;
        if status != b"ok" {
            return Err(err(format!(
                "the store {} refused adding {delta} to `{key}`: {} (the sum does not fit an i64)",
                self.addr,
                String::from_utf8_lossy(&status)
            )));
        }
        Ok(value.as_slice().try_into().map_or(0, i64::from_le_bytes))
    }
}
