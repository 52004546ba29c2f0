//! Helpers the stream tests share.

/// `len` bytes that depend on their position and `seed` (a multiplicative hash of each).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i ^ seed << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

/// A raw packet payload: a pipe header (`pkt_type`, `data_size`) and `data`, whatever
/// they say of each other.
pub fn payload(pkt_type: u32, data_size: u32, data: &[u8]) -> Vec<u8> {
    let mut p = pkt_type.to_le_bytes().to_vec();
    p.extend(data_size.to_le_bytes());
    p.extend(data);
    p
}
