//! The fixed table of requests in flight, keyed by the caller's 64-bit handles, and the
//! ring of recently answered handles that tells a duplicate reply from an unknown one.
//! Both are allocated once, when the client is made; nothing here allocates afterwards.

/// What a request in flight was, as far as its reply is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A read of this many bytes: a successful reply carries them.
    Read(u32),
    /// A write, flush or trim: the reply carries no data.
    NoData,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    handle: u64,
    kind: Kind,
}

/// An open-addressing hash table (linear probing, deletion by backward shift, so no
/// tombstones) at most half full, holding up to `capacity` handles.
pub(crate) struct InFlight {
    slots: Box<[Option<Entry>]>,
    mask: usize,
    shift: u32,
    len: usize,
    capacity: usize,
}

impl InFlight {
    /// A table for up to `capacity` (at least 1) requests in flight.
    pub(crate) fn new(capacity: usize) -> InFlight {
        let size = (capacity.max(1) * 2).next_power_of_two().max(2);
        InFlight {
            slots: vec![None; size].into_boxed_slice(),
            mask: size - 1,
            shift: 64 - size.trailing_zeros(),
            len: 0,
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    fn home(&self, handle: u64) -> usize {
        // Fibonacci hashing: the top bits of the product spread consecutive handles.
        (handle.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    fn find(&self, handle: u64) -> Option<usize> {
        let mut i = self.home(handle);
        loop {
            match self.slots[i] {
                None => return None,
                Some(e) if e.handle == handle => return Some(i),
                Some(_) => i = (i + 1) & self.mask,
            }
        }
    }

    pub(crate) fn contains(&self, handle: u64) -> bool {
        self.find(handle).is_some()
    }

    /// Adds `handle`; the caller has checked that it is absent and that there is room.
    pub(crate) fn insert(&mut self, handle: u64, kind: Kind) {
        debug_assert!(self.len < self.capacity && !self.contains(handle));
        let mut i = self.home(handle);
        while self.slots[i].is_some() {
            i = (i + 1) & self.mask;
        }
        self.slots[i] = Some(Entry { handle, kind });
        self.len += 1;
    }

    /// Removes `handle`, giving what it was, or `None` if it was not in flight.
    pub(crate) fn remove(&mut self, handle: u64) -> Option<Kind> {
        let mut hole = self.find(handle)?;
        let kind = self.slots[hole].take().map(|e| e.kind);
        self.len -= 1;
        // Backward shift: move later entries of the probe run into the hole when their
        // home is not cyclically within (hole, j].
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let Some(e) = self.slots[j] else { break };
            let home = self.home(e.handle);
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.slots[hole] = self.slots[j].take();
                hole = j;
            }
        }
        kind
    }
}

/// The last `capacity` handles answered, oldest overwritten first.
pub(crate) struct Recent {
    ring: Box<[u64]>,
    len: usize,
    next: usize,
}

impl Recent {
    pub(crate) fn new(capacity: usize) -> Recent {
        Recent {
            ring: vec![0; capacity.max(1)].into_boxed_slice(),
            len: 0,
            next: 0,
        }
    }

    pub(crate) fn push(&mut self, handle: u64) {
        self.ring[self.next] = handle;
        self.next = (self.next + 1) % self.ring.len();
        self.len = (self.len + 1).min(self.ring.len());
    }

    /// Only on the error path: a linear scan.
    pub(crate) fn contains(&self, handle: u64) -> bool {
        self.ring[..self.len].contains(&handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn matches_a_hash_map_under_random_operations() {
        for capacity in [1usize, 2, 3, 7, 32, 256] {
            let mut table = InFlight::new(capacity);
            let mut model: HashMap<u64, Kind> = HashMap::new();
            let mut x: u64 = 0x1234_5678_9abc_def1 ^ capacity as u64;
            for step in 0..20_000u32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Handles from a small range so that removals and collisions are common,
                // with some from all over the 64-bit space.
                let handle = if x & 1 == 0 { (x >> 8) % 64 } else { x >> 3 };
                if x & 2 == 0 && model.len() < capacity && !model.contains_key(&handle) {
                    let kind = if step % 3 == 0 {
                        Kind::NoData
                    } else {
                        Kind::Read(step)
                    };
                    assert!(!table.contains(handle));
                    table.insert(handle, kind);
                    model.insert(handle, kind);
                } else {
                    assert_eq!(table.remove(handle), model.remove(&handle));
                }
                assert_eq!(table.len(), model.len());
                for h in model.keys() {
                    assert!(table.contains(*h), "lost handle {h:#x}");
                }
            }
        }
    }

    #[test]
    fn recent_remembers_the_last_capacity_handles() {
        let mut r = Recent::new(3);
        assert!(!r.contains(0));
        for h in 1..=5 {
            r.push(h);
        }
        assert!(!r.contains(1) && !r.contains(2));
        assert!(r.contains(3) && r.contains(4) && r.contains(5));
    }
}
