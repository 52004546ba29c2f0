//! The endpoint is written once over the packet link traits: these tests run it over links
//! that are not a VMBus ring pair.
//!
//! - `Framed`: packets framed on a bounded byte pipe, as a stream transport does (no GPA).
//! - `Scramble<L>`: a layer over another link that rewrites every payload on the way out
//!   and back on the way in, as a secure layer does (and refuses GPA-direct packets).
//!
//! Over both, `call` with many callers in flight, late completions, flow control and the
//! failure of a malformed frame behave as over a ring.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::packet::GpaRange;
use vmlink_channel::{
    ChannelError, ChannelState, Config, Endpoint, FailureCause, InProcessDoorbell, OutgoingPacket,
    PacketMeta, PacketRx, PacketTx, PacketType, ProtocolError, Received, RingRx, RingTx,
    in_process_pair,
};
use vmlink_ring::protocol::{FLAG_COMPLETION_REQUESTED, packet_len};
use vmlink_ring::{HeapMem, Signal, WaitDecision};

/// type u16, flags u16, transaction id u64, header length u32, padded payload length
/// u32, 4 bytes of padding.
const FRAME_HEADER: usize = 24;

/// One direction of a byte stream with room for `capacity` bytes.
struct Pipe {
    bytes: Mutex<VecDeque<u8>>,
    capacity: usize,
}

/// The sending half of a framed stream: packets are encoded into `pending` and appended to
/// the pipe whole on commit.
struct FramedTx {
    pipe: Arc<Pipe>,
    pending: Vec<u8>,
}

/// The receiving half: the frame at the head, once it is whole in the pipe.
struct FramedRx {
    pipe: Arc<Pipe>,
    head: Option<(Received, Vec<u8>)>,
    consumed: bool,
    max_frame: usize,
}

fn framed_pair(capacity: usize) -> ((FramedTx, FramedRx), (FramedTx, FramedRx)) {
    let pipe = || {
        Arc::new(Pipe {
            bytes: Mutex::new(VecDeque::new()),
            capacity,
        })
    };
    let (ab, ba) = (pipe(), pipe());
    let tx = |p: &Arc<Pipe>| FramedTx {
        pipe: p.clone(),
        pending: Vec::new(),
    };
    let rx = |p: &Arc<Pipe>| FramedRx {
        pipe: p.clone(),
        head: None,
        consumed: false,
        max_frame: capacity,
    };
    ((tx(&ab), rx(&ba)), (tx(&ba), rx(&ab)))
}

fn frame_len(header: usize, payload: usize) -> usize {
    FRAME_HEADER + header + payload.next_multiple_of(8)
}

impl PacketTx for FramedTx {
    fn max_packet_len(&self) -> usize {
        self.pipe.capacity
    }

    fn push(&mut self, packet: &OutgoingPacket<'_>) -> Result<usize, ChannelError> {
        let len = frame_len(packet.header.len(), packet.payload.len());
        if len > self.pipe.capacity {
            return Err(ChannelError::TooLarge {
                len,
                max: self.pipe.capacity,
            });
        }
        let queued = self.pipe.bytes.lock().unwrap().len();
        if queued + self.pending.len() + len > self.pipe.capacity {
            return Err(ChannelError::Full);
        }
        let m = &packet.meta;
        self.pending
            .extend_from_slice(&m.packet_type.raw().to_le_bytes());
        self.pending.extend_from_slice(&m.flags.to_le_bytes());
        self.pending
            .extend_from_slice(&m.transaction_id.to_le_bytes());
        self.pending
            .extend_from_slice(&(packet.header.len() as u32).to_le_bytes());
        let padded = packet.payload.len().next_multiple_of(8);
        self.pending
            .extend_from_slice(&(padded as u32).to_le_bytes());
        self.pending.extend_from_slice(&[0; 4]);
        self.pending.extend_from_slice(packet.header);
        match packet.payload {
            vmlink_ring::Payload::Bytes(b) => self.pending.extend_from_slice(b),
            vmlink_ring::Payload::Gather(parts) => {
                for p in parts {
                    self.pending.extend_from_slice(p);
                }
            }
        }
        self.pending
            .resize(self.pending.len() + padded - packet.payload.len(), 0);
        Ok(len)
    }

    fn commit(&mut self) -> Signal {
        if self.pending.is_empty() {
            return Signal::NONE;
        }
        self.pipe
            .bytes
            .lock()
            .unwrap()
            .extend(self.pending.drain(..));
        Signal::NEEDED
    }

    fn rollback(&mut self) {
        self.pending.clear();
    }

    fn prepare_wait(
        &mut self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<(WaitDecision, Signal), ChannelError> {
        let signal = self.commit();
        let queued = self.pipe.bytes.lock().unwrap().len();
        let fits = queued + frame_len(header_len, payload_len) <= self.pipe.capacity;
        let decision = if fits {
            WaitDecision::Ready
        } else {
            WaitDecision::Sleep
        };
        Ok((decision, signal))
    }
}

/// A malformed frame breaks the stream: the endpoint fails with a protocol error.
fn bad_frame() -> ChannelError {
    ChannelError::Failed(FailureCause::Protocol(ProtocolError::UnknownTransaction {
        transaction_id: u64::MAX,
    }))
}

impl FramedRx {
    fn region(&self, header: bool, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        let (r, body) = self.head.as_ref().ok_or(ChannelError::OutOfBounds {
            offset,
            len: buf.len(),
            size: 0,
        })?;
        let (start, size) = if header {
            (0, r.header_len)
        } else {
            (r.header_len, r.payload_len)
        };
        if offset.checked_add(buf.len()).is_none_or(|end| end > size) {
            return Err(ChannelError::OutOfBounds {
                offset,
                len: buf.len(),
                size,
            });
        }
        buf.copy_from_slice(&body[start + offset..start + offset + buf.len()]);
        Ok(())
    }
}

impl PacketRx for FramedRx {
    fn peek(&mut self) -> Result<Option<Received>, ChannelError> {
        if let Some((r, _)) = &self.head {
            return Ok(Some(*r));
        }
        let mut bytes = self.pipe.bytes.lock().unwrap();
        if bytes.len() < FRAME_HEADER {
            return Ok(None);
        }
        let head: Vec<u8> = bytes.iter().take(FRAME_HEADER).copied().collect();
        let word = |at: usize, n: usize| {
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(&head[at..at + n]);
            u64::from_le_bytes(v)
        };
        let packet_type = PacketType::from_raw(word(0, 2) as u16).ok_or_else(bad_frame)?;
        let flags = word(2, 2) as u16;
        let (header_len, payload_len) = (word(12, 4) as usize, word(16, 4) as usize);
        let len = FRAME_HEADER + header_len + payload_len;
        // Validated before anything is sized by it: a frame longer than the stream's
        // bound, or a payload that is not padded, is garbage.
        if len > self.max_frame || !payload_len.is_multiple_of(8) {
            return Err(bad_frame());
        }
        if bytes.len() < len {
            return Ok(None);
        }
        let body: Vec<u8> = bytes.drain(..len).skip(FRAME_HEADER).collect();
        let r = Received {
            packet_type,
            transaction_id: word(4, 8),
            completion_requested: flags & FLAG_COMPLETION_REQUESTED != 0,
            header_len,
            payload_len,
        };
        self.head = Some((r, body));
        Ok(Some(r))
    }

    fn read_header(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.region(true, offset, buf)
    }

    fn read_payload(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.region(false, offset, buf)
    }

    fn consume(&mut self) {
        self.consumed |= self.head.take().is_some();
    }

    fn has_uncommitted(&self) -> bool {
        self.consumed
    }

    fn commit(&mut self) -> Signal {
        // Taking a frame out of the pipe made room: a writer waiting for it is woken.
        if std::mem::take(&mut self.consumed) {
            Signal::NEEDED
        } else {
            Signal::NONE
        }
    }

    fn known_available(&self) -> bool {
        self.head.is_some() || !self.pipe.bytes.lock().unwrap().is_empty()
    }

    fn poll_available(&mut self) -> bool {
        self.known_available()
    }

    fn mask_interrupts(&mut self) {}

    fn prepare_wait(&mut self) -> Result<(WaitDecision, Signal), ChannelError> {
        let signal = self.commit();
        let decision = if self.known_available() {
            WaitDecision::Ready
        } else {
            WaitDecision::Sleep
        };
        Ok((decision, signal))
    }
}

type FramedEndpoint = Endpoint<FramedTx, FramedRx, InProcessDoorbell>;

fn framed_endpoints(capacity: usize) -> (FramedEndpoint, FramedEndpoint) {
    let ((atx, arx), (btx, brx)) = framed_pair(capacity);
    let (da, db) = in_process_pair();
    (
        Endpoint::over(atx, arx, da, Config::default()),
        Endpoint::over(btx, brx, db, Config::default()),
    )
}

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(10))
}

/// Answers every request with its payload reversed, until the peer leaves.
fn reverse_server<T: PacketTx, R: PacketRx>(ep: &Endpoint<T, R, InProcessDoorbell>) {
    let mut buf = vec![0u8; 4096];
    loop {
        match ep.recv(&mut buf, soon()) {
            Ok(r) if r.completion_requested => {
                let mut answer = r.payload(&buf).to_vec();
                answer.reverse();
                ep.complete(r.transaction_id, &answer, soon()).unwrap();
            }
            Ok(r) => panic!("unexpected packet {r:?}"),
            Err(ChannelError::Closed) => return,
            Err(e) => panic!("server: {e}"),
        }
    }
}

/// Eight threads with calls in flight at once over `client`, each checking its answers.
fn many_callers<T, R>(client: &Endpoint<T, R, InProcessDoorbell>)
where
    T: PacketTx + Send,
    R: PacketRx + Send,
{
    thread::scope(|s| {
        for t in 0..8u8 {
            s.spawn(move || {
                let mut response = [0u8; 64];
                for i in 0..200u32 {
                    let mut request = [t; 16];
                    request[..4].copy_from_slice(&i.to_le_bytes());
                    let len = client.call(&request, &mut response, soon()).unwrap();
                    let mut want = request;
                    want.reverse();
                    assert_eq!(&response[..len], &want, "caller {t}, call {i}");
                }
            });
        }
    });
    assert_eq!(client.transactions_in_flight(), 0);
}

#[test]
fn calls_run_over_a_framed_stream() {
    // A pipe of 512 bytes: callers meet flow control all the time.
    let (client, server) = framed_endpoints(512);
    thread::scope(|s| {
        s.spawn(|| reverse_server(&server));
        many_callers(&client);
        drop(client);
    });
    assert!(server.counters().packets_received >= 1600);
}

#[test]
fn a_framed_stream_refuses_gpa_direct_packets() {
    let (client, _server) = framed_endpoints(4096);
    let pages = [1u64];
    let ranges = [GpaRange {
        byte_offset: 0,
        byte_count: 16,
        pages: &pages,
    }];
    assert_eq!(
        client.send_gpa_direct(&ranges, b"x", PacketMeta::in_band(), Wait::Now),
        Err(ChannelError::Unsupported {
            what: "GPA-direct packets"
        })
    );
    assert_eq!(
        client.state(),
        ChannelState::Open,
        "a refusal fails nothing"
    );
    client.send(b"still open", Wait::Now).unwrap();
}

#[test]
fn a_garbage_frame_fails_the_receiver_and_delivers_nothing() {
    let ((_atx, arx), (_btx, _brx)) = framed_pair(4096);
    // A frame claiming a payload far past the stream's bound.
    let mut garbage = vec![0u8; FRAME_HEADER];
    garbage[0] = PacketType::InBand.raw() as u8;
    garbage[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    arx.pipe.bytes.lock().unwrap().extend(garbage);
    let (da, _db) = in_process_pair();
    let (atx, _) = framed_pair(4096).0;
    let ep = Endpoint::over(atx, arx, da, Config::default());
    let mut buf = [0u8; 64];
    assert_eq!(ep.recv(&mut buf, Wait::Now).polled(), Err(bad_frame()));
    assert!(matches!(ep.state(), ChannelState::Failed(_)));
    assert_eq!(ep.counters().packets_received, 0);
}

/// A layer over another link that XORs every payload byte with a key on the way out and
/// again on the way in: the transaction layer above it never sees the difference, the
/// link below never sees the plain bytes. GPA-direct packets are refused (the default).
struct Scramble<L> {
    inner: L,
    key: u8,
    scratch: Vec<u8>,
}

impl<L> Scramble<L> {
    fn new(inner: L, key: u8, max_payload: usize) -> Self {
        Self {
            inner,
            key,
            // Sized once by the configured bound, never by the peer.
            scratch: vec![0; max_payload],
        }
    }
}

impl<L: PacketTx> PacketTx for Scramble<L> {
    fn max_packet_len(&self) -> usize {
        self.inner.max_packet_len()
    }

    fn push(&mut self, packet: &OutgoingPacket<'_>) -> Result<usize, ChannelError> {
        let (len, max) = (packet.payload.len(), self.scratch.len());
        let out = self
            .scratch
            .get_mut(..len)
            .ok_or(ChannelError::TooLarge { len, max })?;
        let mut at = 0;
        let parts: &[&[u8]] = match &packet.payload {
            vmlink_ring::Payload::Bytes(b) => std::slice::from_ref(b),
            vmlink_ring::Payload::Gather(parts) => parts,
        };
        for part in parts {
            for (o, b) in out[at..at + part.len()].iter_mut().zip(part.iter()) {
                *o = b ^ self.key;
            }
            at += part.len();
        }
        self.inner.push(&OutgoingPacket {
            meta: packet.meta,
            header: packet.header,
            payload: vmlink_ring::Payload::Bytes(out),
        })
    }

    fn commit(&mut self) -> Signal {
        self.inner.commit()
    }

    fn rollback(&mut self) {
        self.inner.rollback();
    }

    fn prepare_wait(
        &mut self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<(WaitDecision, Signal), ChannelError> {
        self.inner.prepare_wait(header_len, payload_len)
    }
}

impl<L: PacketRx> PacketRx for Scramble<L> {
    fn peek(&mut self) -> Result<Option<Received>, ChannelError> {
        self.inner.peek()
    }

    fn read_header(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.inner.read_header(offset, buf)
    }

    fn read_payload(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.inner.read_payload(offset, buf)?;
        for b in buf {
            *b ^= self.key;
        }
        Ok(())
    }

    fn consume(&mut self) {
        self.inner.consume();
    }

    fn has_uncommitted(&self) -> bool {
        self.inner.has_uncommitted()
    }

    fn commit(&mut self) -> Signal {
        self.inner.commit()
    }

    fn known_available(&self) -> bool {
        self.inner.known_available()
    }

    fn poll_available(&mut self) -> bool {
        self.inner.poll_available()
    }

    fn mask_interrupts(&mut self) {
        self.inner.mask_interrupts();
    }

    fn prepare_wait(&mut self) -> Result<(WaitDecision, Signal), ChannelError> {
        self.inner.prepare_wait()
    }
}

type Layered =
    Endpoint<Scramble<RingTx<Arc<HeapMem>>>, Scramble<RingRx<Arc<HeapMem>>>, InProcessDoorbell>;

/// Two rings of `data` bytes each and an endpoint on each side, the layer on both.
fn layered_pair(data: usize) -> (Layered, Layered, Arc<HeapMem>) {
    let ab = Arc::new(HeapMem::new(data).unwrap());
    let ba = Arc::new(HeapMem::new(data).unwrap());
    let (da, db) = in_process_pair();
    let side = |out: &Arc<HeapMem>, inc: &Arc<HeapMem>, d| {
        Endpoint::over(
            Scramble::new(RingTx::new(out.clone()).unwrap(), 0x5A, data),
            Scramble::new(RingRx::new(inc.clone()).unwrap(), 0x5A, data),
            d,
            Config::default(),
        )
    };
    let a = side(&ab, &ba, da);
    let b = side(&ba, &ab, db);
    (a, b, ab)
}

#[test]
fn calls_run_through_a_layer_that_rewrites_payloads() {
    let (client, server, _) = layered_pair(8192);
    thread::scope(|s| {
        s.spawn(|| reverse_server(&server));
        many_callers(&client);
        drop(client);
    });
}

#[test]
fn the_ring_under_a_layer_carries_only_rewritten_bytes() {
    let (a, _b, a_to_b) = layered_pair(4096);
    a.send(b"plain text", Wait::Now).unwrap();
    // Read the ring under the layer without it: the payload is scrambled.
    let mut raw = RingRx::new(a_to_b).unwrap();
    let r = raw.peek().unwrap().expect("the packet");
    assert_eq!(r.len(), packet_len(0, 10).unwrap() - 16);
    let mut payload = [0u8; 10];
    raw.read_payload(0, &mut payload).unwrap();
    assert_ne!(&payload, b"plain text");
    let unscrambled: Vec<u8> = payload.iter().map(|b| b ^ 0x5A).collect();
    assert_eq!(&unscrambled, b"plain text");
}

#[test]
fn a_layer_refuses_gpa_direct_packets_the_ring_below_would_carry() {
    let (a, _b, _) = layered_pair(4096);
    let pages = [1u64];
    let ranges = [GpaRange {
        byte_offset: 0,
        byte_count: 16,
        pages: &pages,
    }];
    assert_eq!(
        a.send_gpa_direct(&ranges, b"x", PacketMeta::in_band(), Wait::Now),
        Err(ChannelError::Unsupported {
            what: "GPA-direct packets"
        })
    );
    // The same ring without the layer carries it.
    let mem = Arc::new(HeapMem::new(4096).unwrap());
    let mut ring = RingTx::new(mem).unwrap();
    assert!(
        ring.push_gpa_direct(&ranges, b"x", PacketMeta::in_band(), None)
            .is_ok()
    );
}
