//! A channel set: a primary channel and its sub-channels, and how a sender picks one.
//!
//! VMBus devices that carry much traffic (storage, network) open sub-channels beside their
//! primary channel, one per virtual CPU, each with its own rings and interrupt, so CPUs
//! do not contend on one ring. Transports negotiate the set (the guest asks for sub-channels
//! over the primary, the host offers what it allows); this type holds what came of it and
//! picks a channel for a request: by the CPU the caller runs on, or by the caller's own
//! key (a flow, a file). Completions come back on the channel the request went out on, as
//! each request's transaction lives in its channel's endpoint.
//!
//! Channels are independent: one that fails or that either side closes takes no other
//! down. [`close`](ChannelSet::close) takes one out of the set, and picks skip it.

use alloc::vec::Vec;

/// A primary channel (index 0) and its sub-channels (1..), any of which may be closed.
#[derive(Debug)]
pub struct ChannelSet<C> {
    channels: Vec<Option<C>>,
}

impl<C> ChannelSet<C> {
    /// A set of `primary` and `subs` (sub-channel `i` gets index `i + 1`).
    pub fn new(primary: C, subs: impl IntoIterator<Item = C>) -> Self {
        let mut channels = Vec::from([Some(primary)]);
        channels.extend(subs.into_iter().map(Some));
        Self { channels }
    }

    /// Channels in the set, closed ones included: indices run below it.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// True when every channel is closed.
    pub fn is_empty(&self) -> bool {
        self.channels.iter().all(Option::is_none)
    }

    /// Channels still open.
    pub fn open(&self) -> usize {
        self.channels.iter().flatten().count()
    }

    /// Channel `index`, unless it is closed (or there is none).
    pub fn get(&self, index: usize) -> Option<&C> {
        self.channels.get(index)?.as_ref()
    }

    /// The primary channel, unless it is closed.
    pub fn primary(&self) -> Option<&C> {
        self.get(0)
    }

    /// Takes channel `index` out of the set (the caller drops it to close it); picks skip
    /// it from now on.
    pub fn close(&mut self, index: usize) -> Option<C> {
        self.channels.get_mut(index)?.take()
    }

    /// Takes every open channel out with its index, for code that serves each on a thread
    /// of its own.
    pub fn into_channels(self) -> impl Iterator<Item = (usize, C)> {
        self.channels
            .into_iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c?)))
    }

    /// The open channel for `key`: the same key always picks the same channel while the set
    /// does not change, and keys spread evenly over the open channels. `None` when every
    /// channel is closed.
    pub fn by_key(&self, key: u64) -> Option<(usize, &C)> {
        let open = self.open() as u64;
        if open == 0 {
            return None;
        }
        // A multiplicative hash, so consecutive keys do not all land in order.
        let spread = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        let nth = (spread % open) as usize;
        self.channels
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c.as_ref()?)))
            .nth(nth)
    }

    /// The open channel for CPU `cpu`: CPU `i` takes channel `i` while that is open, and
    /// otherwise one of the open channels by key, so each CPU keeps to one channel.
    pub fn by_cpu_index(&self, cpu: usize) -> Option<(usize, &C)> {
        match self.get(cpu) {
            Some(c) => Some((cpu, c)),
            None => self.by_key(cpu as u64),
        }
    }

    /// The open channel for the CPU the calling thread runs on now
    /// ([`by_cpu_index`](Self::by_cpu_index)); the primary's pick where the CPU cannot be
    /// learnt.
    #[cfg(all(feature = "fd", target_os = "linux"))]
    pub fn by_cpu(&self) -> Option<(usize, &C)> {
        let cpu = nix::sched::sched_getcpu().unwrap_or(0);
        self.by_cpu_index(cpu)
    }
}

#[cfg(all(feature = "fd", target_os = "linux"))]
impl<C: Send> ChannelSet<C> {
    /// Serves every open channel on a thread of its own and returns when all of them are
    /// done: `serve(index, channel)` runs on channel `index`'s thread. With `cpus`, the
    /// `k`-th open channel's thread is first pinned to CPU `cpus[k % cpus.len()]` (an empty
    /// list pins nothing), the way a device gives each queue a CPU of its own. Returns each
    /// channel's index with what `serve` returned, or with the pinning's error (then
    /// `serve` did not run for it: a thread on the wrong CPU is not what was asked for). A
    /// `serve` that panics panics this call once every thread has ended.
    pub fn serve_each<R: Send>(
        self,
        cpus: Option<&[usize]>,
        serve: impl Fn(usize, C) -> R + Sync,
    ) -> Vec<(usize, std::io::Result<R>)> {
        let cpus = cpus.filter(|c| !c.is_empty());
        let serve = &serve;
        std::thread::scope(|s| {
            let threads: Vec<_> = self
                .into_channels()
                .enumerate()
                .map(|(k, (index, channel))| {
                    let cpu = cpus.map(|c| c[k % c.len()]);
                    let thread = s.spawn(move || {
                        if let Some(cpu) = cpu {
                            pin_current_thread(cpu)?;
                        }
                        Ok(serve(index, channel))
                    });
                    (index, thread)
                })
                .collect();
            threads
                .into_iter()
                .map(|(index, thread)| match thread.join() {
                    Ok(result) => (index, result),
                    Err(panic) => std::panic::resume_unwind(panic),
                })
                .collect()
        })
    }
}

/// Pins the calling thread to `cpu`.
#[cfg(all(feature = "fd", target_os = "linux"))]
fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_keep_to_open_channels_and_spread_keys() {
        let mut set = ChannelSet::new("p", ["a", "b", "c"]);
        assert_eq!((set.len(), set.open()), (4, 4));
        assert_eq!(set.by_cpu_index(2), Some((2, &"b")));
        let mut counts = [0usize; 4];
        for key in 0..4000 {
            let (i, _) = set.by_key(key).unwrap();
            assert_eq!(set.by_key(key).unwrap().0, i, "a key keeps its channel");
            counts[i] += 1;
        }
        assert!(
            counts.iter().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
        // Closing one: nothing picks it, CPUs that had it move, the others stay.
        assert_eq!(set.close(2), Some("b"));
        assert_eq!(set.close(2), None);
        for key in 0..1000 {
            assert_ne!(set.by_key(key).unwrap().0, 2);
        }
        assert_ne!(set.by_cpu_index(2).unwrap().0, 2);
        assert_eq!(set.by_cpu_index(3), Some((3, &"c")));
        assert!(set.by_cpu_index(17).is_some());
        assert_eq!(set.primary(), Some(&"p"));
        let rest: Vec<_> = set.into_channels().collect();
        assert_eq!(rest, [(0, "p"), (1, "a"), (3, "c")]);
        // All closed: no pick.
        let mut one = ChannelSet::new(1, []);
        one.close(0);
        assert!(one.is_empty() && one.by_key(5).is_none() && one.by_cpu_index(0).is_none());
    }

    #[cfg(all(feature = "fd", target_os = "linux"))]
    #[test]
    // `sched_getcpu` is a system call Miri does not model.
    #[cfg_attr(miri, ignore)]
    fn by_cpu_picks_an_open_channel() {
        let set = ChannelSet::new(0, [1, 2]);
        let (i, c) = set.by_cpu().unwrap();
        assert_eq!(i, *c);
    }

    #[cfg(all(feature = "fd", target_os = "linux"))]
    #[test]
    // Affinity and `sched_getcpu` are system calls Miri does not model.
    #[cfg_attr(miri, ignore)]
    fn serve_each_runs_every_open_channel_on_its_own_thread_pinned_when_asked() {
        use std::sync::Mutex;
        let cpu = nix::sched::sched_getcpu().unwrap();
        let mut set = ChannelSet::new("p", ["a", "b", "c"]);
        set.close(2);
        let threads = Mutex::new(Vec::new());
        let done = set.serve_each(Some(&[cpu]), |i, c| {
            threads.lock().unwrap().push(std::thread::current().id());
            // Pinned: this thread may run on `cpu` only.
            let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
            let count = (0..nix::sched::CpuSet::count())
                .filter(|&c| allowed.is_set(c).unwrap())
                .count();
            assert!(allowed.is_set(cpu).unwrap() && count == 1);
            assert_eq!(nix::sched::sched_getcpu().unwrap(), cpu);
            format!("{i}{c}")
        });
        let done: Vec<_> = done.into_iter().map(|(i, r)| (i, r.unwrap())).collect();
        assert_eq!(done, [(0, "0p".into()), (1, "1a".into()), (3, "3c".into())]);
        let mut threads = threads.into_inner().unwrap();
        threads.sort_by_key(|t| format!("{t:?}"));
        threads.dedup();
        assert_eq!(threads.len(), 3, "a thread per channel");
        assert!(!threads.contains(&std::thread::current().id()));
        // Unpinned, and a CPU that does not exist: refused, `serve` not run.
        let set = ChannelSet::new(1, [2]);
        let sum: i32 = set
            .serve_each(None, |_, c| c)
            .into_iter()
            .map(|(_, r)| r.unwrap())
            .sum();
        assert_eq!(sum, 3);
        let set = ChannelSet::new(1, [2]);
        let ran = Mutex::new(0);
        let done = set.serve_each(Some(&[usize::MAX]), |_, _| *ran.lock().unwrap() += 1);
        assert!(done.iter().all(|(_, r)| r.is_err()), "{done:?}");
        assert_eq!(*ran.lock().unwrap(), 0);
    }
}
