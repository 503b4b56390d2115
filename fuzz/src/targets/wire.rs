//! Targets over the wire protocols: the rendezvous store (a live `StoreServer`, fuzzed over
//! TCP) and the peer protocol of the TCP backend (its hello and frame decoders, fed from
//! memory: they are the code a peer's bytes reach).

use std::io::{Cursor, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use moeru_parallel::tcp::{hello, read_frame, read_hello, Frame};
use moeru_parallel::transport::Mailbox;
use moeru_parallel::{StoreClient, StoreServer};

use super::target_of;
use crate::runner::{take_background_panics, Target};

const TOKEN: &str = "fuzz-token-0123456789abcdef";
const MAGIC: &[u8] = b"MOERUST1";

fn frame(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(&(p.len() as u32).to_le_bytes());
        v.extend_from_slice(p);
    }
    v
}

fn store_seeds() -> Vec<Vec<u8>> {
    let hello = frame(&[MAGIC, TOKEN.as_bytes()]);
    let with = |cmds: &[Vec<u8>]| {
        let mut v = hello.clone();
        cmds.iter().for_each(|c| v.extend_from_slice(c));
        v
    };
    let set = frame(&[&[1], b"job/addr/0", b"127.0.0.1:29500"]);
    let get = frame(&[&[2], b"job/addr/0", &50u64.to_le_bytes()]);
    let add = frame(&[&[3], b"job/count", &1i64.to_le_bytes()]);
    vec![
        hello.clone(),
        frame(&[MAGIC, b"wrong-token"]),
        with(std::slice::from_ref(&set)),
        with(&[set.clone(), get.clone()]),
        with(&[get]),
        with(&[add.clone(), add]),
        with(&[set, frame(&[&[9], b"", b""])]),
    ]
}

/// Sends `input` on a fresh connection, closes the sending side and reads the replies
/// (bounded in time and size).
fn exchange(addr: SocketAddr, input: &[u8]) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_millis(300))))
        .map_err(|e| e.to_string())?;
    let sent = s
        .write_all(input)
        .and_then(|()| s.shutdown(Shutdown::Write));
    let mut reply = Vec::new();
    let _ = Read::by_ref(&mut s).take(1 << 16).read_to_end(&mut reply);
    sent.map_err(|e| format!("the store closed the connection: {e}"))
}

/// `wire_store`: mutated hello and SET/GET/ADD frames sent to a live `StoreServer`; a panic
/// of a server thread is charged to the input that caused it, and a real `StoreClient`
/// must still connect and set/get after every 100 inputs.
pub fn store() -> Target {
    let server = StoreServer::bind("127.0.0.1:0", TOKEN).expect("store binds");
    let addr = server.addr();
    let run = move |input: &[u8], _scratch: &Path| -> Result<(), String> {
        let result = exchange(addr, input);
        let panics = take_background_panics();
        if !panics.is_empty() {
            panic!("store server thread panicked: {}", panics.join("; "));
        }
        result
    };
    let mut t = target_of("wire_store", store_seeds(), false, Box::new(run));
    t.max_len = 8192;
    t.check = Some(Box::new(move || {
        let c = StoreClient::connect(&addr.to_string(), TOKEN, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        c.set("fuzz/health", b"alive").map_err(|e| e.to_string())?;
        match c.get("fuzz/health").map_err(|e| e.to_string())? {
            v if v == b"alive" => Ok(()),
            v => Err(format!("store answered {v:?}")),
        }
    }));
    t._keep.push(Box::new(server));
    t
}

fn data_frame(group: u64, tag: u32, op: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&group.to_le_bytes());
    v.extend_from_slice(&tag.to_le_bytes());
    v.push(op);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// `wire_peer`: a peer's hello then its frames, through `read_hello` and `read_frame` of the
/// TCP backend, delivering into a real `Mailbox`.
pub fn peer() -> Target {
    let h = hello(TOKEN, 1);
    let seeds: Vec<Vec<u8>> = vec![
        h.clone(),
        [h.clone(), data_frame(0, u32::MAX, 1, 0, &[0u8; 16])].concat(),
        [
            h.clone(),
            data_frame(3, 7, 6, 0, b"payload"),
            data_frame(0, u32::MAX, 7, 1, b""),
        ]
        .concat(),
        [h.clone(), data_frame(0, 0, 0xff, 0, b"rank 1 failed: boom")].concat(),
        hello("other-token", 2),
    ];
    let run = |input: &[u8], _scratch: &Path| -> Result<(), String> {
        let mut r = Cursor::new(input);
        let rank = read_hello(&mut r, TOKEN).map_err(|e| format!("hello refused: {e}"))?;
        let mailbox = Mailbox::default();
        for _ in 0..64 {
            match read_frame(&mut r) {
                Ok(Frame::Data(ch, msg)) => mailbox.deliver(rank, ch, msg),
                Ok(Frame::Abort(why)) => mailbox.abort(why),
                Err(_) if r.position() as usize == input.len() => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    let mut t = target_of("wire_peer", seeds, false, Box::new(run));
    t.max_len = 4096;
    t
}
