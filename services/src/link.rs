//! What the services need of a channel: in-band packets with a transaction id, each way.
//!
//! Hyper-V's integration services send every message, request and answer alike, as an
//! in-band packet; an answer carries its request's transaction id (Linux's `hv_util`
//! answers with `vmbus_sendpacket(..., requestid, VM_PKT_DATA_INBAND, 0)`). [`IcLink`] is
//! that much of a channel, implemented for every vmlink [`Endpoint`].

use vmlink_channel::{
    ChannelError, Doorbell, Endpoint, OutgoingPacket, PacketMeta, PacketRx, PacketTx, PacketType,
    Wait,
};

/// A received packet: its type and transaction id, and how much of it was copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// The packet type.
    pub packet_type: PacketType,
    /// The transaction id.
    pub transaction_id: u64,
    /// The payload's length (padded to 8 bytes).
    pub len: usize,
    /// Bytes copied into the caller's buffer: `len`, or the buffer's length when the
    /// packet was longer (the packet is consumed either way).
    pub copied: usize,
}

impl Incoming {
    /// True when the whole payload was copied.
    pub fn whole(&self) -> bool {
        self.copied == self.len
    }
}

/// In-band packets each way with a transaction id.
pub trait IcLink {
    /// Receives the next packet, copying as much of its payload as fits in `buf`. A packet
    /// longer than `buf` is consumed, not left to block the channel.
    fn recv_message(&self, buf: &mut [u8], wait: Wait) -> Result<Incoming, ChannelError>;

    /// Sends `payload` in-band with `transaction_id`, asking for no completion.
    fn send_message(
        &self,
        transaction_id: u64,
        payload: &[u8],
        wait: Wait,
    ) -> Result<(), ChannelError>;
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> IcLink for Endpoint<T, R, D> {
    fn recv_message(&self, buf: &mut [u8], wait: Wait) -> Result<Incoming, ChannelError> {
        self.recv_with(wait, |p| {
            let meta = p.meta();
            let copied = meta.payload_len.min(buf.len());
            p.read_payload(0, &mut buf[..copied])?;
            Ok(Incoming {
                packet_type: meta.packet_type,
                transaction_id: meta.transaction_id,
                len: meta.payload_len,
                copied,
            })
        })?
    }

    fn send_message(
        &self,
        transaction_id: u64,
        payload: &[u8],
        wait: Wait,
    ) -> Result<(), ChannelError> {
        let mut packet = OutgoingPacket::in_band_slice(payload);
        packet.meta = PacketMeta {
            transaction_id,
            ..PacketMeta::in_band()
        };
        self.send_packet(&packet, wait)
    }
}
