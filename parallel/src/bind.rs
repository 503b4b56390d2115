//! Which local address a job's listening sockets (the rendezvous store, the TCP peers) bind
//! to: never every interface by default. A job whose master address is this host's loopback
//! binds to loopback; a multi-node job binds to the interface that reaches the master address;
//! `--bind ADDR` (MOERU_BIND) overrides both.
//!
//! Owns: that choice. Must not: open the listening sockets themselves.

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs, UdpSocket};

use crate::error::{CommError, Result};

/// The address to bind for a job whose rendezvous store is at `master_addr` (a host name or
/// IP, without port); `explicit` is `--bind` / MOERU_BIND when given.
pub fn bind_ip(master_addr: &str, explicit: Option<&str>) -> Result<IpAddr> {
    if let Some(text) = explicit.filter(|t| !t.is_empty()) {
        return text.parse().map_err(|_| {
            CommError::Rendezvous(format!(
                "--bind / MOERU_BIND {text:?} is not an IP address; give one of this host's addresses, e.g. 10.0.0.5"
            ))
        });
    }
    let master = (master_addr, 1)
        .to_socket_addrs()
        .map_err(|e| unreachable(master_addr, &e.to_string()))?
        .next()
        .ok_or_else(|| unreachable(master_addr, "it resolves to no address"))?;
    if master.ip().is_loopback() {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    // A connected UDP socket sends nothing; its local address is the interface the kernel
    // routes to the master through.
    let any: IpAddr = if master.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let probe = UdpSocket::bind((any, 0))
        .and_then(|s| s.connect(master).map(|()| s))
        .and_then(|s| s.local_addr())
        .map_err(|e| unreachable(master_addr, &e.to_string()))?;
    Ok(probe.ip())
}

fn unreachable(master_addr: &str, why: &str) -> CommError {
    CommError::Rendezvous(format!(
        "cannot find the interface that reaches the master address {master_addr:?} ({why}); check --master-addr (MASTER_ADDR) or name the address to listen on with --bind (MOERU_BIND)"
    ))
}

/// Byte equality whose time does not depend on where the inputs differ (only on the
/// length), for comparing job tokens.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_master_binds_loopback() {
        for master in ["127.0.0.1", "localhost", "127.0.0.2"] {
            assert_eq!(bind_ip(master, None).unwrap(), IpAddr::from([127, 0, 0, 1]));
        }
    }

    #[test]
    fn explicit_address_wins_and_bad_ones_are_named() {
        assert_eq!(
            bind_ip("127.0.0.1", Some("10.1.2.3")).unwrap(),
            IpAddr::from([10, 1, 2, 3])
        );
        let e = bind_ip("127.0.0.1", Some("eth0")).unwrap_err().to_string();
        assert!(e.contains("\"eth0\"") && e.contains("MOERU_BIND"), "{e}");
        let e = bind_ip("no-such-host.invalid", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no-such-host.invalid") && e.contains("--bind"),
            "{e}"
        );
    }

    #[test]
    fn remote_master_binds_a_routed_interface_not_every_one() {
        // Any routable address works for the probe (UDP connect sends nothing).
        if let Ok(ip) = bind_ip("192.0.2.1", None) {
            assert!(!ip.is_unspecified(), "{ip}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
