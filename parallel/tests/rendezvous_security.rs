//! The rendezvous is closed to strangers: a one-node job's store and peer sockets listen on
//! 127.0.0.1 only (read back from the kernel's socket table), a pre-authentication frame
//! longer than `PRE_AUTH_MAX` is refused at once without allocating it, and a wrong token is
//! refused by the peers (the store's refusal: collectives.rs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use moeru_parallel::store::PRE_AUTH_MAX;
use moeru_parallel::{bind_ip, tcp_world, StoreClient, StoreServer};

/// Listening TCP sockets of this process, from /proc/self/net/tcp{,6} and its fds.
fn listening_sockets() -> Vec<SocketAddr> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut out = Vec::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode.
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                out.push(parse_proc_addr(f[1]));
            }
        }
    }
    out
}

/// `0100007F:1F90` (IPv4, host-order hex words) or the 32-hex-digit IPv6 form.
fn parse_proc_addr(text: &str) -> SocketAddr {
    let (ip, port) = text.split_once(':').unwrap();
    let port = u16::from_str_radix(port, 16).unwrap();
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).unwrap())
        .collect();
    let ip: std::net::IpAddr = if words.len() == 1 {
        std::net::Ipv4Addr::from(words[0].to_le_bytes()).into()
    } else {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap()).into()
    };
    SocketAddr::new(ip, port)
}

#[test]
fn a_one_node_job_listens_on_loopback_only() {
    let before = listening_sockets();
    let ip = bind_ip("127.0.0.1", None).unwrap();
    let server = StoreServer::bind(&SocketAddr::new(ip, 0).to_string(), "tok").unwrap();
    let addr = server.addr().to_string();
    let rank = |r: usize| {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let store = StoreClient::connect(&addr, "tok", Duration::from_secs(10)).unwrap();
            let timeout = Duration::from_secs(10);
            tcp_world(&store, "sec", r, 3, "tok", timeout, None).unwrap()
        })
    };
    // Ranks 0 and 1 listen until rank 2 connects: read the socket table while they wait.
    let (r0, r1) = (rank(0), rank(1));
    let store = StoreClient::connect(&addr, "tok", Duration::from_secs(10)).unwrap();
    let published: Vec<String> = (0..2)
        .map(|r| String::from_utf8(store.get(&format!("sec/addr/{r}")).unwrap()).unwrap())
        .collect();
    let new: Vec<SocketAddr> = listening_sockets()
        .into_iter()
        .filter(|a| !before.contains(a))
        .collect();
    let r2 = rank(2);
    for h in [r0, r1, r2] {
        h.join().unwrap();
    }
    assert!(new.contains(&server.addr()), "store not listening: {new:?}");
    for p in &published {
        assert!(p.starts_with("127.0.0.1:"), "published {p}");
        assert!(new.contains(&p.parse().unwrap()), "{p} not in {new:?}");
    }
    for a in &new {
        assert_eq!(a.ip(), std::net::IpAddr::from([127, 0, 0, 1]), "{new:?}");
    }
}

/// Sends `bytes` to `addr` and returns how long until the server closed the connection (or
/// `None` if it was still open after `wait`).
fn closed_within(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Duration> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(started.elapsed())
            }
            Err(_) => return None,
        }
    }
}

#[test]
fn an_oversized_pre_authentication_frame_is_refused_without_waiting_for_it() {
    let server = StoreServer::bind("127.0.0.1:0", "tok").unwrap();
    // A part claiming just under 1 GiB: the old limit let the store allocate it and wait.
    let mut frame = ((1u32 << 30) - 1).to_le_bytes().to_vec();
    frame.extend_from_slice(b"MOERUST1");
    let took = closed_within(server.addr(), &frame, Duration::from_secs(5));
    assert!(
        took.is_some(),
        "the store kept the connection open, waiting for 1 GiB"
    );
    // The largest allowed part is still read (and then refused as not the magic).
    let mut ok = (PRE_AUTH_MAX as u32).to_le_bytes().to_vec();
    ok.extend(vec![b'x'; PRE_AUTH_MAX]);
    ok.extend(0u32.to_le_bytes());
    assert!(closed_within(server.addr(), &ok, Duration::from_secs(5)).is_some());
    // The store still serves its job afterwards.
    let c = StoreClient::connect(&server.addr().to_string(), "tok", Duration::from_secs(5));
    c.unwrap().set("k", b"v").unwrap();
}

#[test]
fn a_wrong_token_is_refused_by_the_peers() {
    // The store's refusal is collectives.rs's `the_store_refuses_another_jobs_token`.
    let server = StoreServer::bind("127.0.0.1:0", "right").unwrap();
    let addr = server.addr().to_string();
    // A peer presenting another job's token is not taken as rank 1: rank 0 waits for the
    // real one and times out naming it.
    let store = StoreClient::connect(&addr, "right", Duration::from_secs(5)).unwrap();
    let rank0 = std::thread::spawn(move || {
        tcp_world(&store, "p", 0, 2, "right", Duration::from_secs(2), None).err()
    });
    let store1 = StoreClient::connect(&addr, "right", Duration::from_secs(5)).unwrap();
    let peer = String::from_utf8(store1.get("p/addr/0").unwrap()).unwrap();
    let mut s = TcpStream::connect(&peer).unwrap();
    let mut hello = b"MOERUTC1".to_vec();
    hello.extend(1u64.to_le_bytes());
    hello.extend(5u32.to_le_bytes());
    hello.extend(b"wrong");
    let _ = s.write_all(&hello);
    let e = rank0
        .join()
        .unwrap()
        .expect("rank 0 must not accept the stranger");
    assert!(e.to_string().contains("ranks [1] did not connect"), "{e}");
}
