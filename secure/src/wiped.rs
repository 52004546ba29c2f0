//! Keyed cipher objects in memory that is zeroed when they go.

use core::mem::MaybeUninit;

use zeroize::Zeroize;

/// A slot for one value, inline (so filling it allocates nothing), whose bytes are
/// overwritten with zeros (volatile writes the compiler keeps) when the value is cleared or
/// the slot drops: for the keyed cipher objects of a crate that does not zeroize its own
/// (ring's AES key schedule and ChaCha20 key).
///
/// Only the value's own bytes are wiped, so a `T` must keep its secrets inline, as ring's
/// keys do (arrays, nothing on the heap). A copy a move left behind is out of reach, as with
/// any zeroizing in Rust: the layer clears a slot before it moves the key state holding it.
pub(crate) struct Wiped<T> {
    slot: MaybeUninit<T>,
    /// Whether `slot` holds a value.
    live: bool,
}

impl<T> Wiped<T> {
    /// An empty slot.
    pub(crate) fn empty() -> Self {
        Self {
            slot: MaybeUninit::zeroed(),
            live: false,
        }
    }

    /// The value, made with `make` first if the slot is empty.
    pub(crate) fn get_or_insert_with(&mut self, make: impl FnOnce() -> T) -> &T {
        if !self.live {
            self.slot.write(make());
            self.live = true;
        }
        // SAFETY: `live` is set only right after `slot` was written, and cleared before
        // the value in it is dropped, so the slot holds a value here.
        unsafe { self.slot.assume_init_ref() }
    }

    /// Drops the value, if any, and zeroes its bytes.
    pub(crate) fn clear(&mut self) {
        if self.live {
            self.live = false;
            // SAFETY: `live` said the slot holds a value; it is dropped this once, since
            // `live` is already false (even if its drop panics).
            unsafe { self.slot.assume_init_drop() };
        }
        self.slot.zeroize();
    }

    /// The slot's bytes, for the tests: all initialized once it was zeroed.
    #[cfg(test)]
    fn bytes(&self) -> &[MaybeUninit<u8>] {
        // SAFETY: the slot is `size_of::<T>()` bytes inside `self`, borrowed for as long
        // as `self`; `MaybeUninit<u8>` may hold any byte, initialized or not.
        unsafe {
            core::slice::from_raw_parts(
                self.slot.as_ptr().cast::<MaybeUninit<u8>>(),
                size_of::<T>(),
            )
        }
    }
}

impl<T> Drop for Wiped<T> {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn a_cleared_slot_holds_only_zeros_and_refills() {
        let mut slot = Wiped::<[u64; 8]>::empty();
        assert_eq!(
            *slot.get_or_insert_with(|| [0x5a5a_5a5a_5a5a_5a5a; 8]),
            [0x5a5a_5a5a_5a5a_5a5a; 8]
        );
        // A second fill keeps the first value.
        assert_eq!(slot.get_or_insert_with(|| [1; 8])[0], 0x5a5a_5a5a_5a5a_5a5a);
        slot.clear();
        let bytes: Vec<u8> = slot
            .bytes()
            .iter()
            .map(|b| {
                // SAFETY: every byte was just zeroed, so each is initialized.
                unsafe { b.assume_init() }
            })
            .collect();
        assert_eq!(bytes, [0u8; 64]);
        assert_eq!(*slot.get_or_insert_with(|| [3; 8]), [3; 8]);
    }

    #[test]
    fn a_value_is_dropped_exactly_once() {
        use std::rc::Rc;
        let counted = Rc::new(());
        let mut slot = Wiped::empty();
        slot.get_or_insert_with(|| Rc::clone(&counted));
        assert_eq!(Rc::strong_count(&counted), 2);
        slot.clear();
        assert_eq!(Rc::strong_count(&counted), 1);
        slot.clear();
        slot.get_or_insert_with(|| Rc::clone(&counted));
        drop(slot);
        assert_eq!(Rc::strong_count(&counted), 1);
    }
}
