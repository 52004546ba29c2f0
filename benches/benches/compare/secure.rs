//! The secure channel (vmlink-secure) beside the plain one it runs over: rows of `rtt_64`
//! (a polling call) and `bulk` (a stream one way), with ChaCha20-Poly1305 and AES-256-GCM.

use vmlink_channel::{
    ChannelError, Config, Doorbell, Endpoint, InProcessDoorbell, PacketRx, PacketTx, RingRx,
    RingTx, Wait, in_process_channel_pair,
};
use vmlink_secure::{Cipher, SecureConfig, SecureEndpoint, establish_pair};

use crate::harness::{BULK_STRIDE, Backoff, Check, Group, Peer, bench_pair, stamp, verify};

/// The two ciphers, with the names their rows carry.
pub const CIPHERS: [(Cipher, &str); 2] = [(Cipher::ChaChaPoly, "chacha"), (Cipher::AesGcm, "aes")];

type Ring = std::sync::Arc<vmlink_ring::HeapMem>;
type Secure = SecureEndpoint<RingTx<Ring>, RingRx<Ring>, InProcessDoorbell>;

/// A secure pair over in-process rings of `ring` bytes, after an `XX` handshake with
/// `cipher`.
pub fn pair(ring: usize, config: Config, cipher: Cipher) -> (Secure, Secure) {
    let (a, b) = in_process_channel_pair(ring, config).expect("channel pair");
    let secure = SecureConfig {
        cipher,
        ..SecureConfig::default()
    };
    let (a, b) = establish_pair(a, b, &secure).expect("handshake");
    (a.endpoint, b.endpoint)
}

/// `size`-byte packets streamed from `a` to `b` with `send` / `recv` (polling), every
/// packet stamped and checked.
pub fn stream<T, R, D>(
    g: &mut Group<'_>,
    name: String,
    size: usize,
    a: Endpoint<T, R, D>,
    b: Endpoint<T, R, D>,
) where
    T: PacketTx + Send + 'static,
    R: PacketRx + Send + 'static,
    D: Doorbell + Send + Sync + 'static,
{
    let check_name = name.clone();
    let peer = {
        let mut check = Check::new(BULK_STRIDE);
        let mut dst = vec![0u8; size];
        Peer::spawn("channel-stream-consumer", move |n| {
            let mut backoff = Backoff::default();
            let mut got = 0;
            while got < n {
                match b.recv(&mut dst, Wait::Now) {
                    Ok(r) => {
                        check.packet(r.payload(&dst));
                        got += 1;
                    }
                    Err(ChannelError::Empty) => backoff.snooze(),
                    Err(e) => panic!("recv: {e}"),
                }
            }
            check.round()
        })
    };
    let mut src = vec![0xa5u8; size];
    let mut seq = 0u64;
    bench_pair(
        g,
        name,
        peer,
        move |n| {
            let mut backoff = Backoff::default();
            for _ in 0..n {
                stamp(&mut src, seq, BULK_STRIDE, 0);
                loop {
                    match a.send(&src, Wait::Now) {
                        Ok(()) => break,
                        Err(ChannelError::Full) => backoff.snooze(),
                        Err(e) => panic!("send: {e}"),
                    }
                }
                seq += 1;
            }
            0
        },
        move |first, n, r| verify(&check_name, r.theirs, first, n, size / BULK_STRIDE),
    );
}
