//! KVM doorbells: guest→host by ioeventfd, host→guest by irqfd.
//!
//! Both are vmlink-channel's [`EventFd`], and waits use its poll loop, like every other
//! vmlink doorbell. kvm-ioctls 0.25 registers eventfds only as vmm-sys-util's `EventFd`
//! (`VmFd::register_ioevent`, `register_irqfd` and their `unregister_*` take
//! `&vmm_sys_util::eventfd::EventFd`), so [`KvmDoorbell::register`] hands KVM duplicates of
//! the same two eventfds in that type; nothing else uses it.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmlink_channel::fd::EventFd;
use vmlink_channel::{Doorbell, DoorbellError, Wake};

/// Registering or unregistering a doorbell's eventfds with KVM failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// `KVM_IOEVENTFD` failed.
    #[error("registering the ioeventfd failed: {0}")]
    IoEvent(#[source] kvm_ioctls::Error),
    /// `KVM_IRQFD` failed (a VM needs an in-kernel irqchip for irqfds).
    #[error("registering the irqfd failed: {0}")]
    IrqFd(#[source] kvm_ioctls::Error),
}

/// The host's end of a channel's doorbells in a KVM VM.
///
/// - Guest→host: the guest writes to an MMIO (or PIO) address; KVM turns the write into
///   an eventfd signal (ioeventfd) without an exit to userspace. [`Doorbell::wait`] blocks
///   on that eventfd; [`Doorbell::wake_local`] writes to it.
/// - Host→guest: [`Doorbell::signal`] writes the irqfd, which raises the GSI in the
///   in-kernel irqchip.
///
/// Create it, [`register`](Self::register) it on the VM, then hand it (or a reference) to
/// [`host_channel`](crate::host_channel).
#[derive(Debug)]
pub struct KvmDoorbell {
    ioevent: EventFd,
    irq: EventFd,
    addr: IoEventAddress,
    gsi: u32,
    closed: AtomicBool,
    signals: AtomicU64,
    wakes: AtomicU64,
    /// The same two eventfds as an `EventFdDoorbell`, for async waits on tokio.
    #[cfg(feature = "tokio")]
    async_bell: vmlink_channel::EventFdDoorbell,
}

/// vmm-sys-util's `EventFd` over a duplicate of `fd`, for kvm-ioctls' registration calls,
/// which take no other type.
// The one unsafe call of the module: vmm-sys-util 0.15 builds its `EventFd` from an fd
// only through `FromRawFd`.
#[allow(unsafe_code)]
fn for_kvm(fd: &EventFd) -> io::Result<vmm_sys_util::eventfd::EventFd> {
    let raw = OwnedFd::from(fd.try_clone()?).into_raw_fd();
    // SAFETY: `into_raw_fd` handed us sole ownership of a freshly duplicated, open eventfd;
    // the new `EventFd` owns it from here and closes it when dropped.
    Ok(unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(raw) })
}

impl KvmDoorbell {
    /// A doorbell whose guest→host side is an MMIO write to `mmio_addr` and whose
    /// host→guest side raises `gsi`.
    pub fn new(mmio_addr: u64, gsi: u32) -> io::Result<Self> {
        Self::with_address(IoEventAddress::Mmio(mmio_addr), gsi)
    }

    /// A doorbell on any ioeventfd address (MMIO or PIO).
    pub fn with_address(addr: IoEventAddress, gsi: u32) -> io::Result<Self> {
        let ioevent = EventFd::new()?;
        let irq = EventFd::new()?;
        Ok(Self {
            #[cfg(feature = "tokio")]
            async_bell: vmlink_channel::EventFdDoorbell::from_fds(
                ioevent.try_clone()?,
                irq.try_clone()?,
            ),
            ioevent,
            irq,
            addr,
            gsi,
            closed: AtomicBool::new(false),
            signals: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
        })
    }

    /// The guest→host eventfd (for a VMM's own event loop or an async reactor).
    pub fn ioevent_fd(&self) -> &EventFd {
        &self.ioevent
    }

    /// The host→guest eventfd.
    pub fn irq_fd(&self) -> &EventFd {
        &self.irq
    }

    /// The address whose writes ring this doorbell (the ioeventfd's).
    pub fn address(&self) -> IoEventAddress {
        self.addr
    }

    /// The GSI the irqfd raises.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Interrupts raised in the guest so far.
    pub fn signals_sent(&self) -> u64 {
        self.signals.load(Ordering::Relaxed)
    }

    /// Waits that ended because the guest (or [`wake_local`](Doorbell::wake_local)) rang.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// Marks the guest as gone (the VM stopped): waiters wake and see
    /// [`DoorbellError::PeerClosed`] once pending rings are consumed.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.ioevent.signal();
    }

    /// Registers the ioeventfd and the irqfd with `vm`. The returned registration
    /// unregisters both when dropped, so tearing a channel down while the guest keeps
    /// running leaves nothing behind.
    pub fn register<'v>(&self, vm: &'v VmFd) -> Result<DoorbellRegistration<'v>, RegisterError> {
        let ioevent = for_kvm(&self.ioevent).map_err(|e| RegisterError::IoEvent(e.into()))?;
        let irq = for_kvm(&self.irq).map_err(|e| RegisterError::IrqFd(e.into()))?;
        vm.register_ioevent(&ioevent, &self.addr, NoDatamatch)
            .map_err(RegisterError::IoEvent)?;
        if let Err(e) = vm.register_irqfd(&irq, self.gsi) {
            let _ = vm.unregister_ioevent(&ioevent, &self.addr, NoDatamatch);
            return Err(RegisterError::IrqFd(e));
        }
        Ok(DoorbellRegistration {
            vm,
            ioevent,
            irq,
            addr: self.addr,
            gsi: self.gsi,
            active: true,
        })
    }
}

impl Doorbell for KvmDoorbell {
    fn signal(&self) -> Result<(), DoorbellError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(DoorbellError::PeerClosed);
        }
        self.irq.signal()?;
        self.signals.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
        // A timeout too large to add to now is no timeout.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            if self.ioevent.drain()? {
                self.wakes.fetch_add(1, Ordering::Relaxed);
                return Ok(Wake::Signalled);
            }
            if self.closed.load(Ordering::SeqCst) {
                return Err(DoorbellError::PeerClosed);
            }
            if !self.ioevent.wait_readable(deadline)? {
                return Ok(Wake::TimedOut);
            }
        }
    }

    fn wake_local(&self) -> Result<(), DoorbellError> {
        self.ioevent.signal()
    }

    fn peer_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// With the `tokio` feature a [`KvmDoorbell`] is an
/// [`AsyncDoorbell`](vmlink_channel::AsyncDoorbell): its first async wait registers the
/// ioeventfd with the reactor of the tokio runtime it runs in (as
/// [`EventFdDoorbell`](vmlink_channel::EventFdDoorbell) does), so a task sleeps until the
/// guest's MMIO write. After [`close`](KvmDoorbell::close) a wait that finds no ring
/// reports [`DoorbellError::PeerClosed`]. Polled outside a tokio runtime it fails with
/// `DoorbellError::Os(ENOTSUP)`.
#[cfg(feature = "tokio")]
impl vmlink_channel::AsyncDoorbell for KvmDoorbell {
    fn poll_wait(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), DoorbellError>> {
        use std::task::Poll;
        match self.async_bell.poll_wait(cx) {
            Poll::Ready(Ok(())) => {
                self.wakes.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            // The waker is registered: a close after this look rings the eventfd.
            Poll::Pending if self.closed.load(Ordering::SeqCst) => {
                Poll::Ready(Err(DoorbellError::PeerClosed))
            }
            other => other,
        }
    }
}

/// A doorbell's eventfds registered with a VM; unregisters them when dropped.
#[derive(Debug)]
pub struct DoorbellRegistration<'v> {
    vm: &'v VmFd,
    ioevent: vmm_sys_util::eventfd::EventFd,
    irq: vmm_sys_util::eventfd::EventFd,
    addr: IoEventAddress,
    gsi: u32,
    active: bool,
}

impl DoorbellRegistration<'_> {
    /// Unregisters both eventfds now, reporting failures (dropping does the same silently).
    pub fn unregister(mut self) -> Result<(), RegisterError> {
        self.active = false;
        let a = self
            .vm
            .unregister_ioevent(&self.ioevent, &self.addr, NoDatamatch)
            .map_err(RegisterError::IoEvent);
        let b = self
            .vm
            .unregister_irqfd(&self.irq, self.gsi)
            .map_err(RegisterError::IrqFd);
        a.and(b)
    }
}

impl Drop for DoorbellRegistration<'_> {
    fn drop(&mut self) {
        if self.active {
            let _ = self
                .vm
                .unregister_ioevent(&self.ioevent, &self.addr, NoDatamatch);
            let _ = self.vm.unregister_irqfd(&self.irq, self.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_are_sticky_and_local_wakes_count() {
        let bell = KvmDoorbell::new(0x3000_0000, 5).unwrap();
        assert_eq!(bell.wait(Some(Duration::ZERO)), Ok(Wake::TimedOut));
        // What the guest's MMIO write does through KVM.
        bell.ioevent_fd().signal().unwrap();
        assert_eq!(bell.wait(None), Ok(Wake::Signalled));
        bell.wake_local().unwrap();
        assert_eq!(
            bell.wait(Some(Duration::from_millis(1))),
            Ok(Wake::Signalled)
        );
        assert_eq!(
            bell.wait(Some(Duration::from_millis(1))),
            Ok(Wake::TimedOut)
        );
        assert_eq!(bell.wakes(), 2);
        bell.signal().unwrap();
        assert_eq!(bell.irq_fd().drain(), Ok(true));
        assert_eq!(bell.signals_sent(), 1);
        bell.close();
        assert!(bell.peer_closed());
        assert_eq!(bell.wait(None), Ok(Wake::Signalled), "the close ring wakes");
        assert_eq!(bell.wait(None), Err(DoorbellError::PeerClosed));
        assert_eq!(bell.signal(), Err(DoorbellError::PeerClosed));
    }
}
