//! TCP backend: ranks are processes (on one or many nodes) joined by a full mesh of sockets,
//! found through the rendezvous store. A reader thread per peer fills this rank's mailbox;
//! a closed connection marks the peer gone, so a killed rank fails its peers at once.

use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{CommError, Result};
use crate::group::ProcessGroup;
use crate::p2p::P2pComm;
use crate::store::StoreClient;
use crate::transport::{Channel, Mailbox, Message, OpCode, RecvError, Transport};

const HELLO: &[u8; 8] = b"MOERUTC1";
/// Op byte of the frame that carries an abort notice instead of data.
const ABORT: u8 = 0xff;

struct TcpTransport {
    rank: usize,
    size: usize,
    peers: Vec<Option<Mutex<TcpStream>>>,
    mailbox: Arc<Mailbox>,
}

fn header(channel: Channel, op: u8, seq: u64, len: usize) -> [u8; 29] {
    let mut h = [0u8; 29];
    h[0..8].copy_from_slice(&channel.group.to_le_bytes());
    h[8..12].copy_from_slice(&channel.tag.to_le_bytes());
    h[12] = op;
    h[13..21].copy_from_slice(&seq.to_le_bytes());
    h[21..29].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

/// One frame a peer sent: data for the mailbox, or an abort notice.
#[derive(Debug)]
pub enum Frame {
    Data(Channel, Message),
    Abort(String),
}

/// Payloads are read in chunks of at most this many bytes, so a corrupt length field
/// costs at most what the peer actually sends, not an allocation of the claimed size.
const READ_CHUNK: usize = 64 << 20;

/// Reads one frame (29-byte header, then the payload). `Err` says why the stream cannot go
/// on: it closed, or the frame is malformed.
pub fn read_frame(r: &mut impl Read) -> std::result::Result<Frame, String> {
    let mut h = [0u8; 29];
    if let Err(e) = r.read_exact(&mut h) {
        return Err(format!(
            "its connection closed ({e}): the process exited or was killed"
        ));
    }
    let le8 = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"));
    let channel = Channel {
        group: le8(0),
        tag: u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")),
    };
    let (seq, len) = (le8(13), le8(21));
    let mut payload = Vec::new();
    while (payload.len() as u64) < len {
        let have = payload.len();
        let want = (len - have as u64).min(READ_CHUNK as u64) as usize;
        payload.resize(have + want, 0);
        if let Err(e) = r.read_exact(&mut payload[have..]) {
            return Err(format!(
                "its connection closed mid-message ({e}; {have} of {len} payload bytes read)"
            ));
        }
    }
    if h[12] == ABORT {
        return Ok(Frame::Abort(String::from_utf8_lossy(&payload).into_owned()));
    }
    let Some(op) = OpCode::from_u8(h[12]) else {
        return Err(format!("it sent an unknown op code {}", h[12]));
    };
    Ok(Frame::Data(channel, Message { op, seq, payload }))
}

fn read_loop(peer: usize, stream: TcpStream, mailbox: &Mailbox) {
    let mut r = BufReader::with_capacity(1 << 20, stream);
    let reason = loop {
        match read_frame(&mut r) {
            Ok(Frame::Abort(reason)) => mailbox.abort(reason),
            Ok(Frame::Data(channel, msg)) => mailbox.deliver(peer, channel, msg),
            Err(reason) => break reason,
        }
    };
    mailbox.peer_gone(peer, format!("rank {peer}: {reason}"));
}

impl TcpTransport {
    fn write(&self, dst: usize, h: &[u8], payload: &[u8]) -> std::io::Result<()> {
        let Some(stream) = &self.peers[dst] else {
            return Err(std::io::Error::other("no connection to self"));
        };
        let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(h)?;
        s.write_all(payload)
    }
}

impl Drop for TcpTransport {
    /// Closes the connections (the reader threads hold duplicates that would keep them open),
    /// so peers see this rank leave.
    fn drop(&mut self) {
        for s in self.peers.iter().flatten() {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Transport for TcpTransport {
    fn world_rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn send(&self, dst: usize, channel: Channel, msg: Message) -> Result<(), RecvError> {
        if let Some(reason) = self.mailbox.aborted() {
            return Err(RecvError::Aborted(reason));
        }
        let h = header(channel, msg.op as u8, msg.seq, msg.payload.len());
        self.write(dst, &h, &msg.payload)
            .map_err(|e| RecvError::PeerGone(format!("rank {dst}: sending failed ({e})")))
    }

    fn recv(&self, src: usize, channel: Channel, deadline: Instant) -> Result<Message, RecvError> {
        self.mailbox.take(src, channel, deadline)
    }

    fn ready(&self, src: usize, channel: Channel) -> bool {
        self.mailbox.ready(src, channel)
    }

    fn abort(&self, reason: &str) {
        let reason = format!("rank {} failed: {reason}", self.rank);
        let ch = Channel { group: 0, tag: 0 };
        for dst in (0..self.size).filter(|&d| d != self.rank) {
            let _ = self.write(dst, &header(ch, ABORT, 0, reason.len()), reason.as_bytes());
        }
        self.mailbox.abort(reason);
    }
}

/// The hello a connecting rank sends (read by [`read_hello`]).
pub fn hello(token: &str, rank: usize) -> Vec<u8> {
    let mut v = HELLO.to_vec();
    v.extend_from_slice(&(rank as u64).to_le_bytes());
    v.extend_from_slice(&(token.len() as u32).to_le_bytes());
    v.extend_from_slice(token.as_bytes());
    v
}

/// Reads and checks a connecting peer's hello (magic, rank, token); returns its rank.
pub fn read_hello(s: &mut impl Read, token: &str) -> std::io::Result<usize> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head)?;
    let len = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
    if &head[0..8] != HELLO || len > 4096 {
        return Err(std::io::Error::other("not a moeru peer"));
    }
    let mut theirs = vec![0u8; len];
    s.read_exact(&mut theirs)?;
    if !crate::bind::constant_time_eq(&theirs, token.as_bytes()) {
        return Err(std::io::Error::other("wrong job token"));
    }
    let rank = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    usize::try_from(rank)
        .map_err(|_| std::io::Error::other(format!("peer rank {rank} out of range")))
}

/// Joins `size` processes as world rank `rank`: publishes this rank's listening address under
/// `prefix` in the store, connects to lower ranks and accepts higher ones. Collectives wait
/// at most `timeout`. The listener binds to `bind`, else to the interface that reaches the
/// store (loopback on one node), never to every interface.
pub fn tcp_world(
    store: &StoreClient,
    prefix: &str,
    rank: usize,
    size: usize,
    token: &str,
    timeout: Duration,
    bind: Option<IpAddr>,
) -> Result<ProcessGroup> {
    let fail = |what: String| CommError::Rendezvous(format!("rank {rank} of {size}: {what}"));
    let ip = bind
        .or_else(|| store.local_ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let listener = TcpListener::bind((ip, 0)).map_err(|e| {
        fail(format!(
            "cannot listen on {ip}: {e}; name a local address with --bind (MOERU_BIND)"
        ))
    })?;
    let port = listener
        .local_addr()
        .map_err(|e| fail(e.to_string()))?
        .port();
    store.set(
        &format!("{prefix}/addr/{rank}"),
        std::net::SocketAddr::new(ip, port).to_string().as_bytes(),
    )?;
    let mut peers: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
    for (j, slot) in peers.iter_mut().enumerate().take(rank) {
        let addr = String::from_utf8_lossy(&store.get(&format!("{prefix}/addr/{j}"))?).into_owned();
        let mut s = TcpStream::connect(&addr)
            .map_err(|e| fail(format!("cannot connect to rank {j} at {addr}: {e}")))?;
        s.write_all(&hello(token, rank))
            .map_err(|e| fail(format!("rank {j} at {addr}: {e}")))?;
        *slot = Some(s);
    }
    accept_higher_ranks(&listener, &mut peers, (rank, size), token, timeout).map_err(fail)?;
    let mailbox = Arc::new(Mailbox::default());
    let writers = start_readers(peers, &mailbox).map_err(fail)?;
    let t = TcpTransport {
        rank,
        size,
        peers: writers,
        mailbox,
    };
    Ok(ProcessGroup::new(Box::new(P2pComm::world(
        Arc::new(t),
        timeout,
    ))))
}

/// Accepts the connections of every rank above `rank` (each proves itself with the job
/// token in its hello) within `timeout`; strangers are dropped and logged once per address.
fn accept_higher_ranks(
    listener: &TcpListener,
    peers: &mut [Option<TcpStream>],
    (rank, size): (usize, usize),
    token: &str,
    timeout: Duration,
) -> std::result::Result<(), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    let mut accepted = 0;
    let mut refused = std::collections::HashSet::new();
    while accepted < size - rank - 1 {
        match listener.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(|e| e.to_string())?;
                match read_hello(&mut s, token) {
                    Ok(j) if j > rank && j < size && peers[j].is_none() => {
                        s.set_read_timeout(None).map_err(|e| e.to_string())?;
                        peers[j] = Some(s);
                        accepted += 1;
                    }
                    // A stray connection (port scanner, other job): ignore it, logged once.
                    _ if refused.insert(from.ip()) => eprintln!(
                        "warning: rank {rank} refused a connection from {from} (not this job's peer; logged once per address)"
                    ),
                    _ => {}
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> =
                        (rank + 1..size).filter(|&j| peers[j].is_none()).collect();
                    return Err(format!(
                        "ranks {missing:?} did not connect within {:.0}s",
                        timeout.as_secs_f64()
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    Ok(())
}

/// One reader thread per connected peer feeding `mailbox`; the streams' write halves.
fn start_readers(
    peers: Vec<Option<TcpStream>>,
    mailbox: &Arc<Mailbox>,
) -> std::result::Result<Vec<Option<Mutex<TcpStream>>>, String> {
    let mut writers = Vec::with_capacity(peers.len());
    for (j, s) in peers.into_iter().enumerate() {
        match s {
            None => writers.push(None),
            Some(s) => {
                let _ = s.set_nodelay(true);
                let reader = s.try_clone().map_err(|e| e.to_string())?;
                let mb = mailbox.clone();
                std::thread::Builder::new()
                    .name(format!("moeru-tcp-{j}"))
                    .spawn(move || read_loop(j, reader, &mb))
                    .map_err(|e| e.to_string())?;
                writers.push(Some(Mutex::new(s)));
            }
        }
    }
    Ok(writers)
}
