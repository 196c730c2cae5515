//! Loopback ports for child processes (etcd, kube-apiserver) that take their address on the
//! command line, for the benchmark and the tests.
//!
//! A port found by binding port 0 is an ephemeral one: between that check and the child's
//! bind, an outgoing connection may take it as its source port, and the child fails with
//! "address already in use". These ports come from below the kernel's ephemeral range
//! (32768 and up by default), which outgoing connections never use.

use std::{
    io,
    net::TcpListener,
    sync::atomic::{AtomicU32, Ordering},
};

/// The first port handed out, and how many follow it.
const BASE: u32 = 20_000;
const SPAN: u32 = 12_000;

/// A loopback port nothing listens on. A counter per process, offset by the process id, keeps
/// two calls (or two processes) from trying the same ports in the same order.
pub fn free_port() -> io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id().wrapping_mul(7919);
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = candidate(offset, n);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free loopback port between {BASE} and {}", BASE + SPAN),
    ))
}

/// The `n`th port tried by a process whose offset is `offset`.
fn candidate(offset: u32, n: u32) -> u16 {
    let port = BASE + offset.wrapping_add(n) % SPAN;
    u16::try_from(port).expect("BASE + SPAN is below 65536")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Every candidate lies below the ephemeral range, and one process tries each port
        /// once before it tries any twice.
        #[test]
        fn candidates_stay_below_the_ephemeral_range_and_cycle(offset: u32, start in 0u32..1_000_000) {
            let port = candidate(offset, start);
            prop_assert!((20_000..32_000).contains(&port));
            prop_assert_ne!(port, candidate(offset, start + 1));
            prop_assert_eq!(port, candidate(offset, start + SPAN));
        }
    }

    #[test]
    fn a_free_port_can_be_bound_and_the_next_differs() {
        let first = free_port().unwrap();
        let second = free_port().unwrap();
        assert_ne!(first, second);
        TcpListener::bind(("127.0.0.1", first)).unwrap();
    }
}
