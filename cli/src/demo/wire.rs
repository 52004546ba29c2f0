//! What the demo's host and guest say to each other on the control channel: packets of
//! little-endian 64-bit words, the first naming what the packet is.

/// Serve calls on a channel (word 1: its number, see
/// [`channel_no`](super::channel_no)) until an in-band packet whose first word is
/// [`END`](crate::pattern::END) arrives on it.
pub const OP_SERVE_CALLS: u64 = 1;
/// Echo fixed-size frames on the baseline socket until an END frame.
pub const OP_SERVE_SOCKET: u64 = 2;
/// Stream packets of word 1 bytes to the host over channel number word 3 (0: the control
/// channel) for word 2 microseconds, then an END packet `[END, packets, signals, cpu]`: the guest's doorbell
/// signals and the nanoseconds its thread ran (0 when unknown).
pub const OP_STREAM_CHANNEL: u64 = 3;
/// The same over the baseline socket (frames of word 1 bytes, then an END frame
/// `[END, frames, cpu]`), then a report on the control channel.
pub const OP_STREAM_SOCKET: u64 = 4;
/// Generate the demo file of word 1 bytes on disk and hash it.
pub const OP_MAKE_FILE: u64 = 5;
/// Send the demo file through the buffer area as GPA-direct packets.
pub const OP_FILE_CHANNEL: u64 = 6;
/// Send the demo file through the baseline socket.
pub const OP_FILE_SOCKET: u64 = 7;
/// Exit.
pub const OP_EXIT: u64 = 8;
/// Connect the secure comparison's two channels, the second through the secure handshake
/// with the keys in the demo's directory (word 1: 0 ChaCha20-Poly1305, 1 AES-256-GCM).
pub const OP_SECURE: u64 = 9;

/// `[REPORT, signals, packets, bytes, mismatches]`: the guest's account of a phase
/// (doorbell signals it sent, packets and bytes it checked, mismatches it found).
pub const REPORT: u64 = 0x7270_7274;
/// `[ACK, slot]`: the host has copied a file chunk out of the buffer slot.
pub const ACK: u64 = 0x61_636b;
/// `[FILE_DONE, length, hash]`: the guest has sent the whole file, which hashes to this.
pub const FILE_DONE: u64 = 0x6669_6c65;
/// `[HOST_HASH, length, hash]`: the file as the host wrote it.
pub const HOST_HASH: u64 = 0x6873_6873;

/// The words as packet bytes.
pub fn encode(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The words of a payload (a trailing partial word is ignored).
pub fn decode(payload: &[u8]) -> Vec<u64> {
    payload
        .as_chunks::<8>()
        .0
        .iter()
        .map(|b| u64::from_le_bytes(*b))
        .collect()
}

/// Word `i` of `words`, 0 when missing.
pub fn word(words: &[u64], i: usize) -> u64 {
    words.get(i).copied().unwrap_or(0)
}

/// Words of a packet at most shown by [`describe`].
const SHOWN_WORDS: usize = 8;

/// A packet's words for a message: "a packet of 2 words: 0x61636b 0x3" (the first
/// [`SHOWN_WORDS`] of them).
pub fn describe(words: &[u64]) -> String {
    if words.is_empty() {
        return "an empty packet".to_owned();
    }
    let shown: Vec<String> = words
        .iter()
        .take(SHOWN_WORDS)
        .map(|w| format!("{w:#x}"))
        .collect();
    let more = if words.len() > SHOWN_WORDS {
        " ..."
    } else {
        ""
    };
    let plural = if words.len() == 1 { "" } else { "s" };
    format!(
        "a packet of {} word{plural}: {}{more}",
        words.len(),
        shown.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_described_in_plain_hex() {
        assert_eq!(describe(&[]), "an empty packet");
        assert_eq!(describe(&[ACK]), "a packet of 1 word: 0x61636b");
        assert_eq!(describe(&[ACK, 3]), "a packet of 2 words: 0x61636b 0x3");
        assert_eq!(
            describe(&[1; 9]),
            "a packet of 9 words: 0x1 0x1 0x1 0x1 0x1 0x1 0x1 0x1 ..."
        );
    }
}
