//! Two channels connected in one process: the in-process pair tests and demos use.

use std::sync::Arc;

use vmlink_ring::{HeapMem, LayoutError};

use crate::channel::{Channel, Config};
use crate::doorbell::{InProcessDoorbell, in_process_pair};
use crate::error::ChannelError;

/// A channel over heap rings shared with its peer in the same process.
pub type InProcessChannel = Channel<Arc<HeapMem>, InProcessDoorbell>;

/// Two connected channels, each ring `ring_data_len` bytes of data (a multiple of 4096).
/// The first is the "host" end, the second the "guest" end; they are symmetric.
pub fn in_process_channel_pair(
    ring_data_len: usize,
    config: Config,
) -> Result<(InProcessChannel, InProcessChannel), ChannelError> {
    let layout = |e: LayoutError| ChannelError::Failed(vmlink_ring::RingError::Layout(e).into());
    let a_to_b = Arc::new(HeapMem::new(ring_data_len).map_err(layout)?);
    let b_to_a = Arc::new(HeapMem::new(ring_data_len).map_err(layout)?);
    let (da, db) = in_process_pair();
    let a = Channel::new(a_to_b.clone(), b_to_a.clone(), da, config)?;
    let b = Channel::new(b_to_a, a_to_b, db, config)?;
    Ok((a, b))
}
