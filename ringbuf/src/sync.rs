//! The atomics the ring uses, swappable for loom's.
//!
//! Under `--cfg loom` the control words and fences come from loom, so the signalling
//! handshake is model-checked. Data words stay `core` atomics even then: loom runs its
//! threads one at a time, so they behave sequentially consistently, and exploring every
//! interleaving of every payload word would only multiply the state space without
//! reaching the handshake. Payload ordering is checked by Miri and the stress tests.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, fence};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicU32, fence};

pub(crate) use core::sync::atomic::{AtomicU64, Ordering};
