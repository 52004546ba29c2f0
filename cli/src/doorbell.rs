//! A doorbell between two threads: what an eventfd or an interrupt is between processes
//! or between a guest and its host.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

/// A one-bit doorbell: [`ring`](Self::ring) sets it and wakes the sleeper;
/// [`wait`](Self::wait) sleeps until it is set (or a timeout passes) and clears it.
///
/// Rings are not counted here: a wait consumes every ring before it, as an eventfd read
/// does. The ring protocol decides when to ring (a commit's `Signal`), so the sleeper must
/// always look at the ring again after waking.
#[derive(Debug, Default)]
pub struct Doorbell {
    /// Set by `ring`, cleared by `wait`.
    rung: Mutex<bool>,
    /// Wakes the side waiting for `rung`.
    wake: Condvar,
}

impl Doorbell {
    /// A doorbell that has not been rung.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rings the doorbell, waking the side that sleeps on it.
    pub fn ring(&self) {
        let mut rung = self.rung.lock().unwrap_or_else(PoisonError::into_inner);
        *rung = true;
        drop(rung);
        self.wake.notify_one();
    }

    /// Sleeps until the doorbell rings or `timeout` passes, and clears it. Returns true
    /// when it was rung.
    pub fn wait(&self, timeout: Duration) -> bool {
        let rung = self.rung.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut rung, _) = self
            .wake
            .wait_timeout_while(rung, timeout, |rung| !*rung)
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *rung, false)
    }
}
