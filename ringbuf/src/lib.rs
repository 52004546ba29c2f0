//! VMBus-compatible single-producer / single-consumer ring buffers over shared memory.
//!
//! `vmlink-ring` is the `#![no_std]`, allocation-free core of vmlink. A ring is a 4096-byte
//! control page followed by a data area of whole 4096-byte pages, laid out exactly as
//! Hyper-V VMBus lays it out (Linux `struct hv_ring_buffer`), so a ring written here reads
//! correctly in other VMBus implementations and theirs read correctly here.
//!
//! - [`RingMem`] hides where the bytes live: [`HeapMem`] (feature `alloc`), [`SliceMem`]
//!   (contiguous, also over a mapped region), [`PageListMem`] (separate pages, as a guest
//!   describes a ring by page numbers).
//! - [`Writer`] and [`Reader`] are the two halves. Each commit says, by the VMBus rules,
//!   whether the peer must be signalled ([`Signal`]); [`Reader::prepare_wait`] and
//!   [`Writer::prepare_wait`] implement the interrupt-mask and pending-send-size
//!   handshakes that make sleeping safe.
//! - [`words`] holds the one copy between shared `AtomicU64` words and private bytes:
//!   relaxed, little-endian, range-checked in its public form.
//! - The peer is treated as hostile: every value it controls is read once, validated, and
//!   a violation yields a typed [`RingError`] rather than a panic, a hang or an
//!   out-of-bounds access.
//!
//! # Examples
//!
//! ```
//! use vmlink_ring::{HeapMem, OutgoingPacket, Reader, Writer};
//!
//! let ring = HeapMem::new(16 * 4096)?;
//! let mut writer = Writer::new(&ring)?;
//! let mut reader = Reader::new(&ring)?;
//!
//! // The ring was empty and the reader unmasked: the first commit asks for a signal.
//! let signal = writer.write(&OutgoingPacket::in_band(&[b"hello, ", b"guest"]))?;
//! assert!(signal.is_needed());
//!
//! let mut buf = [0u8; 64];
//! let (info, _signal) = reader.read_into(&mut buf)?.expect("a packet");
//! // Payloads are padded to 8 bytes; protocols carry exact lengths themselves.
//! assert_eq!(info.payload_len(), 16);
//! assert_eq!(&buf[..12], b"hello, guest");
//! assert!(reader.peek()?.is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Writing in place and reading in place, with several packets published by one commit:
//!
//! ```
//! use vmlink_ring::{HeapMem, PacketMeta, Reader, Writer};
//!
//! let ring = HeapMem::new(4 * 4096)?;
//! let (mut writer, mut reader) = (Writer::new(&ring)?, Reader::new(&ring)?);
//! for i in 0..3u8 {
//!     let mut slot = writer.reserve(PacketMeta::in_band(), 0, 1000)?;
//!     slot.write_payload(0, &[i; 1000])?;
//!     slot.finish();
//! }
//! let signal = writer.commit(); // one index store, at most one signal
//! assert!(signal.is_needed());
//!
//! let mut sum = 0u32;
//! while let Some(packet) = reader.peek()? {
//!     let mut first = [0u8; 1];
//!     packet.read_payload(999, &mut first)?;
//!     sum += u32::from(first[0]);
//!     packet.consume();
//! }
//! let _ = reader.commit();
//! assert_eq!(sum, 0 + 1 + 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![warn(
    clippy::std_instead_of_core,
    clippy::std_instead_of_alloc,
    clippy::alloc_instead_of_core
)]

#[cfg(not(target_endian = "little"))]
compile_error!("vmlink-ring supports little-endian targets only: VMBus rings are little-endian");

#[cfg(feature = "alloc")]
extern crate alloc;

// Unit tests use `std` for threads and collections.
#[cfg(test)]
extern crate std;

pub mod area;
mod error;
pub mod header;
mod mem;
pub mod protocol;
mod reader;
mod ring;
mod sync;
pub mod words;
mod writer;

pub use area::{AreaError, AreaLayout};
pub use error::{Index, LayoutError, ReadError, RingError, WriteError};
#[cfg(feature = "alloc")]
pub use mem::HeapMem;
pub use mem::{
    CONTROL_WORDS, ControlWord, ControlWords, DataPage, MAX_DATA_LEN, PAGE_WORDS, PageListMem,
    RingMem, SliceMem, check_data_len,
};
pub use reader::{IncomingPacket, PacketInfo, Reader};
pub use ring::{Signal, WaitDecision, init_control, reader_needs_signal, writer_needs_signal};
pub use writer::{OutgoingPacket, PacketMeta, Payload, RawPacket, WriteSlot, Writer};
