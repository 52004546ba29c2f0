//! Transaction ids: a fixed table, no heap.
//!
//! Each slot is one atomic word: a 32-bit generation and a state. A transaction id is the
//! slot's generation in the high 32 bits and its index in the low 32, so a completion for
//! a slot that was freed and reused carries a stale generation and is recognised as not in
//! flight. Generations start at 1, so no id is 0 (the id of in-band packets that ask for
//! nothing).

// Without `alloc` no caller can wait for a stored completion, so the waiting states go unused.
#![cfg_attr(not(feature = "alloc"), allow(dead_code))]

use crate::sync::{AtomicU64, Ordering};

/// How many transactions may be in flight on one channel at once.
pub const MAX_TRANSACTIONS: usize = 64;

const FREE: u64 = 0;
/// The completion is handed to whoever receives from the channel.
const POLLED: u64 = 1;
/// A caller waits for the completion; the receive path stores it for that caller.
const WAITING: u64 = 2;
/// The completion arrived and is stored for the waiting caller.
const DONE: u64 = 3;
/// The caller gave up; the late completion will be discarded and counted.
const ABANDONED: u64 = 4;

const STATE_MASK: u64 = 0xFF;

fn word(generation: u32, state: u64) -> u64 {
    (u64::from(generation) << 32) | state
}

fn generation(word: u64) -> u32 {
    (word >> 32) as u32
}

fn state(word: u64) -> u64 {
    word & STATE_MASK
}

/// The table slot a transaction id names (its low 32 bits; below [`MAX_TRANSACTIONS`] for
/// every id this table handed out).
pub(crate) fn slot_index(tid: u64) -> usize {
    (tid & 0xFFFF_FFFF) as usize % MAX_TRANSACTIONS
}

/// How a transaction's completion is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Returned by the channel's receive calls like any packet.
    Polled,
    /// Stored for a caller blocked in (or polling) a call.
    Waiting,
}

/// What a completion's transaction id refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// A polled transaction: hand the completion to the receiver.
    Polled,
    /// A waiting caller in this slot.
    Waiting(usize),
    /// A caller that gave up: discard and count.
    Late(usize),
    /// Not in flight: a protocol violation.
    Unknown,
}

/// A transaction slot in a saved endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavedSlot {
    /// Nothing in flight.
    Free,
    /// A request started with `start_request`: its completion goes to a receiver.
    Polled,
    /// A completion may still come and will be discarded (its caller is gone).
    Abandoned,
}

/// The table of transaction slots.
#[derive(Debug)]
pub(crate) struct Transactions {
    slots: [AtomicU64; MAX_TRANSACTIONS],
}

impl Transactions {
    pub(crate) fn new() -> Self {
        Self {
            slots: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Reserves a slot; `None` when all are in flight.
    pub(crate) fn alloc(&self, mode: Mode) -> Option<u64> {
        let new_state = match mode {
            Mode::Polled => POLLED,
            Mode::Waiting => WAITING,
        };
        for (index, slot) in self.slots.iter().enumerate() {
            let cur = slot.load(Ordering::Acquire);
            if state(cur) != FREE {
                continue;
            }
            let next_gen = match generation(cur).wrapping_add(1) {
                0 => 1,
                g => g,
            };
            if slot
                .compare_exchange(
                    cur,
                    word(next_gen, new_state),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                return Some((u64::from(next_gen) << 32) | index as u64);
            }
        }
        None
    }

    fn slot_of(&self, tid: u64) -> Option<(usize, u64)> {
        let index = (tid & 0xFFFF_FFFF) as usize;
        let slot = self.slots.get(index)?;
        let cur = slot.load(Ordering::Acquire);
        (generation(cur) == (tid >> 32) as u32).then_some((index, cur))
    }

    /// Classifies a completion's transaction id without changing anything.
    pub(crate) fn route(&self, tid: u64) -> Route {
        match self.slot_of(tid) {
            Some((_, cur)) if state(cur) == POLLED => Route::Polled,
            Some((index, cur)) if state(cur) == WAITING => Route::Waiting(index),
            Some((index, cur)) if state(cur) == ABANDONED => Route::Late(index),
            _ => Route::Unknown,
        }
    }

    /// A polled transaction's completion was handed out: free the slot.
    pub(crate) fn release_polled(&self, tid: u64) {
        if let Some((index, cur)) = self.slot_of(tid)
            && state(cur) == POLLED
        {
            let _ = self.slots[index].compare_exchange(
                cur,
                word(generation(cur), FREE),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// The completion for a waiting slot is stored: mark it done. Returns false when the
    /// caller gave up meanwhile (the slot is then freed and the completion is late).
    pub(crate) fn mark_done(&self, index: usize) -> bool {
        let slot = &self.slots[index];
        self.leave_waiting(slot, slot.load(Ordering::Acquire), DONE)
    }

    /// Moves a slot from WAITING to `to`. Returns false, freeing the slot, when it was no
    /// longer waiting (the other party got there first: nothing more will happen to it).
    fn leave_waiting(&self, slot: &AtomicU64, cur: u64, to: u64) -> bool {
        let g = generation(cur);
        if state(cur) == WAITING
            && slot
                .compare_exchange(cur, word(g, to), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return true;
        }
        slot.store(word(g, FREE), Ordering::Release);
        false
    }

    /// Frees a slot whose late completion arrived.
    pub(crate) fn free_late(&self, index: usize) {
        let slot = &self.slots[index];
        let cur = slot.load(Ordering::Acquire);
        if state(cur) == ABANDONED {
            slot.store(word(generation(cur), FREE), Ordering::Release);
        }
    }

    /// True when the waiting slot's completion has arrived.
    pub(crate) fn is_done(&self, tid: u64) -> bool {
        self.slot_of(tid).is_some_and(|(_, cur)| state(cur) == DONE)
    }

    /// The caller took its completion (or its request was never sent): free the slot.
    pub(crate) fn free(&self, tid: u64) {
        if let Some((index, cur)) = self.slot_of(tid) {
            self.slots[index].store(word(generation(cur), FREE), Ordering::Release);
        }
    }

    /// The caller gives up: a completion still to come will be discarded. Returns true
    /// when the slot stays reserved for that late completion.
    pub(crate) fn abandon(&self, tid: u64) -> bool {
        let Some((index, cur)) = self.slot_of(tid) else {
            return false;
        };
        self.leave_waiting(&self.slots[index], cur, ABANDONED)
    }

    /// The table as a successor takes it over ([`Endpoint::save`](crate::Endpoint::save)):
    /// each slot's generation, and the ids still owed a completion. Polled transactions
    /// stay polled (their completions go to the successor's receivers); a caller waiting
    /// in this process cannot follow, so its id is kept reserved for the late completion;
    /// a completion that arrived for a caller here is this process's, and its slot is free.
    pub(crate) fn save(&self) -> [(u32, SavedSlot); MAX_TRANSACTIONS] {
        core::array::from_fn(|i| {
            let w = self.slots[i].load(Ordering::Acquire);
            let saved = match state(w) {
                POLLED => SavedSlot::Polled,
                WAITING | ABANDONED => SavedSlot::Abandoned,
                _ => SavedSlot::Free,
            };
            (generation(w), saved)
        })
    }

    /// A table as [`save`](Self::save) left it.
    pub(crate) fn restore(saved: &[(u32, SavedSlot); MAX_TRANSACTIONS]) -> Self {
        Self {
            slots: core::array::from_fn(|i| {
                let (g, s) = saved[i];
                let st = match s {
                    SavedSlot::Free => FREE,
                    SavedSlot::Polled => POLLED,
                    SavedSlot::Abandoned => ABANDONED,
                };
                AtomicU64::new(word(g, st))
            }),
        }
    }

    /// Slots not free (in flight, done, or reserved for a late completion).
    pub(crate) fn in_use(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| state(s.load(Ordering::Acquire)) != FREE)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_generations() {
        let t = Transactions::new();
        let a = t.alloc(Mode::Polled).unwrap();
        assert_ne!(a, 0);
        assert_eq!(t.route(a), Route::Polled);
        t.release_polled(a);
        assert_eq!(t.route(a), Route::Unknown, "a freed id is not in flight");
        let b = t.alloc(Mode::Waiting).unwrap();
        assert_eq!(b & 0xFFFF_FFFF, a & 0xFFFF_FFFF, "the slot is reused");
        assert_ne!(b, a, "with a new generation");
        assert_eq!(t.route(a), Route::Unknown);
        assert_eq!(t.route(b), Route::Waiting(0));
        assert_eq!(t.route(u64::MAX), Route::Unknown);
        assert_eq!(t.route(0), Route::Unknown);
    }

    #[test]
    fn exhaustion_and_late_completions() {
        let t = Transactions::new();
        let ids: std::vec::Vec<u64> = (0..MAX_TRANSACTIONS)
            .map(|_| t.alloc(Mode::Waiting).unwrap())
            .collect();
        assert_eq!(t.alloc(Mode::Waiting), None);
        assert_eq!(t.in_use(), MAX_TRANSACTIONS);
        // A caller gives up: its slot stays reserved until the late completion.
        assert!(t.abandon(ids[3]));
        assert_eq!(t.alloc(Mode::Polled), None);
        assert_eq!(t.route(ids[3]), Route::Late(3));
        t.free_late(3);
        assert!(t.alloc(Mode::Polled).is_some());
        // Completed, then taken.
        assert!(t.mark_done(5));
        assert!(t.is_done(ids[5]));
        t.free(ids[5]);
        assert_eq!(t.route(ids[5]), Route::Unknown);
        // Completed, then the caller gives up before taking it: nothing more will come.
        assert!(t.mark_done(6));
        assert!(!t.abandon(ids[6]));
        assert_eq!(t.route(ids[6]), Route::Unknown);
    }
}
