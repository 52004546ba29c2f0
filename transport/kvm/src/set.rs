//! Channel sets: a primary channel and its sub-channels, each over its own ring pages in
//! guest memory and with its own doorbell (an ioeventfd on its own MMIO or PIO address,
//! an irqfd on its own GSI).
//!
//! A VMM describes each channel by a [`ChannelSetup`] and builds the host's endpoints with
//! [`host_channel_set`] (all at once) or [`host_sub_channels`] (sub-channels added to a
//! primary that is already open, as after a negotiation over it: see
//! [`sub_channel`](crate::sub_channel)). Before any endpoint is built the channels are
//! checked against each other ([`check_setups`]): no guest page in two channels' rings, no
//! two pages aliasing the same host memory, no doorbell address or GSI used twice. A broken
//! rule is a typed [`SetupError`] naming both channels.
//!
//! Each endpoint is independent: one that fails, or that either side closes, takes no
//! other down, and each can be served by a thread of its own
//! ([`ChannelSet::into_channels`]).

use std::borrow::Borrow;
use std::collections::HashMap;

use kvm_ioctls::IoEventAddress;
use vm_memory::bitmap::BitmapSlice;
use vmlink_channel::{ChannelError, ChannelSet, Config, Doorbell};

use crate::{HostChannel, KvmDoorbell, RingPages, host_channel};

/// The most channels (the primary included) a set holds, as in the memory header's
/// channel table.
pub const MAX_CHANNELS: usize = 64;

/// One channel of a set: its rings in guest memory and its doorbell.
///
/// `D` is what the endpoint holds as its doorbell: a [`KvmDoorbell`], or a reference to
/// one the VMM keeps (to register it, read its counters or [`close`](KvmDoorbell::close)
/// it while a thread serves the endpoint).
#[derive(Debug)]
pub struct ChannelSetup<'m, D, B = ()> {
    /// The channel's two rings, validated by [`RingPages::new`].
    pub rings: RingPages<'m, B>,
    /// The channel's doorbell.
    pub doorbell: D,
}

impl<'m, D, B> ChannelSetup<'m, D, B> {
    /// A channel over `rings`, signalled through `doorbell`.
    pub fn new(rings: RingPages<'m, B>, doorbell: D) -> Self {
        Self { rings, doorbell }
    }
}

/// The channels of a set cannot share what they were given. Nothing was built.
///
/// Channel numbers are positions in the set: 0 is the primary, `i` sub-channel `i`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// No channel at all: a set has at least its primary.
    #[error("a channel set needs at least its primary channel")]
    Empty,
    /// More channels than a set holds.
    #[error("{count} channels, more than a set holds ({MAX_CHANNELS})")]
    TooMany {
        /// Channels given.
        count: usize,
    },
    /// A guest page is in the rings of two channels.
    #[error("page {page:#x} is in the rings of channels {first} and {second}")]
    SharedPage {
        /// The page number.
        page: u64,
        /// The first channel holding it.
        first: usize,
        /// The second.
        second: usize,
    },
    /// Two channels' ring pages (different guest pages) alias the same host memory.
    #[error("ring pages of channels {first} and {second} alias the same host memory")]
    AliasedPage {
        /// The first channel.
        first: usize,
        /// The second.
        second: usize,
    },
    /// Two channels' doorbells are rung at the same address.
    #[error(
        "channels {first} and {second} both ring {} address {address:#x}",
        if *.pio { "port" } else { "MMIO" }
    )]
    SharedDoorbell {
        /// The address.
        address: u64,
        /// True for a port I/O address, false for MMIO.
        pio: bool,
        /// The first channel.
        first: usize,
        /// The second.
        second: usize,
    },
    /// Two channels' irqfds raise the same GSI.
    #[error("channels {first} and {second} both raise GSI {gsi}")]
    SharedGsi {
        /// The GSI.
        gsi: u32,
        /// The first channel.
        first: usize,
        /// The second.
        second: usize,
    },
    /// Building a channel's endpoint failed (its control pages are not what the guest
    /// should have initialised).
    #[error("channel {index}: {source}")]
    Channel {
        /// The channel.
        index: usize,
        /// Why.
        #[source]
        source: ChannelError,
    },
}

/// An ioeventfd address as `(address, is port I/O)`, comparable.
fn address_key(addr: IoEventAddress) -> (u64, bool) {
    match addr {
        IoEventAddress::Mmio(a) => (a, false),
        IoEventAddress::Pio(a) => (a, true),
    }
}

/// Checks that channels share nothing: no guest page in two channels' rings, no two ring
/// pages aliasing the same host memory, no doorbell address and no GSI used twice. The
/// channels are numbered in the order given (0: the primary). Each channel's own page list
/// was checked by [`RingPages::new`].
pub fn check_setups<'a, 'm: 'a, B: BitmapSlice + 'a>(
    setups: impl IntoIterator<Item = (&'a RingPages<'m, B>, &'a KvmDoorbell)>,
) -> Result<(), SetupError> {
    let mut pages: HashMap<u64, usize> = HashMap::new();
    let mut hosts: HashMap<usize, usize> = HashMap::new();
    let mut addresses: HashMap<(u64, bool), usize> = HashMap::new();
    let mut gsis: HashMap<u32, usize> = HashMap::new();
    let mut count = 0usize;
    for (index, (rings, bell)) in setups.into_iter().enumerate() {
        count = index + 1;
        if count > MAX_CHANNELS {
            return Err(SetupError::TooMany { count });
        }
        for &page in rings.pages() {
            if let Some(&first) = pages.get(&page) {
                return Err(SetupError::SharedPage {
                    page,
                    first,
                    second: index,
                });
            }
            pages.insert(page, index);
        }
        for &host in rings.host_addresses() {
            if let Some(&first) = hosts.get(&host) {
                return Err(SetupError::AliasedPage {
                    first,
                    second: index,
                });
            }
            hosts.insert(host, index);
        }
        let (address, pio) = address_key(bell.address());
        if let Some(&first) = addresses.get(&(address, pio)) {
            return Err(SetupError::SharedDoorbell {
                address,
                pio,
                first,
                second: index,
            });
        }
        addresses.insert((address, pio), index);
        if let Some(&first) = gsis.get(&bell.gsi()) {
            return Err(SetupError::SharedGsi {
                gsi: bell.gsi(),
                first,
                second: index,
            });
        }
        gsis.insert(bell.gsi(), index);
    }
    if count == 0 {
        return Err(SetupError::Empty);
    }
    Ok(())
}

/// The host's endpoints of a whole set: `setups[0]` is the primary, `setups[i]`
/// sub-channel `i`. Everything is checked ([`check_setups`]) before any endpoint is built;
/// each endpoint then checks its control pages, which the guest initialised.
///
/// ```
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
/// use vmlink_channel::Config;
/// use vmlink_kvm::{ChannelSetup, KvmDoorbell, RingPages, SetupError, host_channel_set};
/// use vmlink_ring::init_control;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
/// let lists: [&[u64]; 2] = [&[0x20, 0x21, 0x22, 0x23], &[0x30, 0x31, 0x32, 0x33]];
/// let mut setups = Vec::new();
/// for (i, pages) in lists.into_iter().enumerate() {
///     // SAFETY: `mem` is an anonymous mapping kept until the rings are dropped; nothing
///     // else in this program touches the listed pages.
///     let rings = unsafe { RingPages::new(&mem, pages, 2) }?;
///     // What the guest does when it allocates the rings.
///     init_control(&rings.guest_to_host());
///     init_control(&rings.host_to_guest());
///     let bell = KvmDoorbell::new(0x3000_0000 + 0x1000 * i as u64, 5 + i as u32)?;
///     setups.push(ChannelSetup::new(rings, bell));
/// }
/// let set = host_channel_set(setups, Config::default())?;
/// assert_eq!(set.open(), 2);
///
/// // The same GSI twice is refused.
/// // SAFETY: as above.
/// let rings = unsafe { RingPages::new(&mem, &[0x40, 0x41, 0x42, 0x43], 2) }?;
/// // SAFETY: as above.
/// let other = unsafe { RingPages::new(&mem, &[0x50, 0x51, 0x52, 0x53], 2) }?;
/// let twice = vec![
///     ChannelSetup::new(rings, KvmDoorbell::new(0x3000_0000, 5)?),
///     ChannelSetup::new(other, KvmDoorbell::new(0x3000_1000, 5)?),
/// ];
/// assert_eq!(
///     host_channel_set(twice, Config::default()).unwrap_err(),
///     SetupError::SharedGsi { gsi: 5, first: 0, second: 1 }
/// );
/// # Ok(())
/// # }
/// ```
pub fn host_channel_set<'m, D, B>(
    setups: Vec<ChannelSetup<'m, D, B>>,
    config: Config,
) -> Result<ChannelSet<HostChannel<'m, D, B>>, SetupError>
where
    D: Doorbell + Borrow<KvmDoorbell>,
    B: BitmapSlice,
{
    check_setups(setups.iter().map(|s| (&s.rings, s.doorbell.borrow())))?;
    let mut channels = build(setups, 0, config)?.into_iter();
    let primary = channels.next().ok_or(SetupError::Empty)?;
    Ok(ChannelSet::new(primary, channels))
}

/// The host's endpoints of sub-channels added to an open primary channel (whose rings
/// and doorbell are `primary`): `subs[i]` becomes sub-channel `i + 1`. Everything is
/// checked against the primary and against each other ([`check_setups`]) before any
/// endpoint is built. The caller makes the set with
/// [`ChannelSet::new(primary, subs)`](ChannelSet::new).
pub fn host_sub_channels<'m, D, B>(
    primary: (&RingPages<'m, B>, &KvmDoorbell),
    subs: Vec<ChannelSetup<'m, D, B>>,
    config: Config,
) -> Result<Vec<HostChannel<'m, D, B>>, SetupError>
where
    D: Doorbell + Borrow<KvmDoorbell>,
    B: BitmapSlice,
{
    check_setups(
        std::iter::once(primary).chain(subs.iter().map(|s| (&s.rings, s.doorbell.borrow()))),
    )?;
    build(subs, 1, config)
}

/// Endpoints over checked setups, numbered from `first`.
fn build<'m, D: Doorbell, B: BitmapSlice>(
    setups: Vec<ChannelSetup<'m, D, B>>,
    first: usize,
    config: Config,
) -> Result<Vec<HostChannel<'m, D, B>>, SetupError> {
    setups
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            host_channel(&s.rings, s.doorbell, config).map_err(|source| SetupError::Channel {
                index: first + i,
                source,
            })
        })
        .collect()
}

#[cfg(test)]
// The tests build rings with the `unsafe` `RingPages::new` over memory they own.
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmlink_channel::{ChannelState, Polled, Wait};
    use vmlink_ring::{RingMem, init_control};

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    /// Rings over `pages` (two per ring), initialised as the guest would.
    fn rings<'m>(mem: &'m GuestMemoryMmap<()>, pages: &[u64]) -> RingPages<'m> {
        // SAFETY: each test's `mem` is an anonymous mapping it owns and keeps until the
        // rings are gone; nothing touches ring pages except through the rings.
        let r = unsafe { RingPages::new(mem, pages, 2) }.unwrap();
        init_control(&r.guest_to_host());
        init_control(&r.host_to_guest());
        r
    }

    fn bell(addr: u64, gsi: u32) -> KvmDoorbell {
        KvmDoorbell::new(addr, gsi).unwrap()
    }

    #[test]
    fn builds_independent_channels() {
        let mem = mem();
        let bells = [
            bell(0x1000, 5),
            bell(0x2000, 6),
            KvmDoorbell::with_address(IoEventAddress::Pio(0x1000), 7).unwrap(),
        ];
        let setups = (0..3u64)
            .map(|i| {
                let base = 0x10 + 0x10 * i;
                ChannelSetup::new(
                    rings(&mem, &[base, base + 1, base + 2, base + 3]),
                    &bells[i as usize],
                )
            })
            .collect();
        let mut set = host_channel_set(setups, Config::default()).unwrap();
        assert_eq!((set.len(), set.open()), (3, 3));
        // Each endpoint writes its own rings: a packet on channel 1 lands only there.
        set.get(1).unwrap().send(b"one", Wait::Now).unwrap();
        // SAFETY: as in `rings`; a second view of channel 1's pages, read only.
        let view = unsafe { RingPages::new(&mem, &[0x20, 0x21, 0x22, 0x23], 2) }.unwrap();
        assert_ne!(
            view.host_to_guest()
                .load_control(vmlink_ring::ControlWord::WriteIndex),
            0
        );
        for i in [0, 2] {
            let c = set.get(i).unwrap();
            assert_eq!(c.counters().packets_sent, 0);
        }
        // Closing one leaves the others open.
        bells[2].close();
        let closed = set.close(2).unwrap();
        assert_eq!(
            closed.recv(&mut [0u8; 8], Wait::Now).polled().map(|_| ()),
            Err(ChannelError::Closed)
        );
        assert_eq!(set.get(0).unwrap().state(), ChannelState::Open);
        assert_eq!(set.open(), 2);
    }

    #[test]
    fn refuses_sharing() {
        let mem = mem();
        let a = [0x10, 0x11, 0x12, 0x13];
        let check = |lists: &[&[u64]], bells: &[KvmDoorbell]| {
            // SAFETY: as in `rings`.
            let r: Vec<_> = lists
                .iter()
                .map(|p| unsafe { RingPages::new(&mem, p, 2) }.unwrap())
                .collect();
            check_setups(r.iter().zip(bells))
        };
        assert_eq!(check(&[], &[]), Err(SetupError::Empty));
        assert_eq!(
            check(&[&a, &[0x20, 0x21, 0x13, 0x22]], &[bell(1, 1), bell(2, 2)]),
            Err(SetupError::SharedPage {
                page: 0x13,
                first: 0,
                second: 1
            })
        );
        assert_eq!(
            check(&[&a, &[0x20, 0x21, 0x22, 0x23]], &[bell(1, 1), bell(1, 2)]),
            Err(SetupError::SharedDoorbell {
                address: 1,
                pio: false,
                first: 0,
                second: 1
            })
        );
        // The same number as MMIO and as port I/O are different addresses.
        let pio = KvmDoorbell::with_address(IoEventAddress::Pio(1), 2).unwrap();
        assert_eq!(
            check(&[&a, &[0x20, 0x21, 0x22, 0x23]], &[bell(1, 1), pio]),
            Ok(())
        );
        assert_eq!(
            check(
                &[&a, &[0x20, 0x21, 0x22, 0x23], &[0x30, 0x31, 0x32, 0x33]],
                &[bell(1, 1), bell(2, 2), bell(3, 2)]
            ),
            Err(SetupError::SharedGsi {
                gsi: 2,
                first: 1,
                second: 2
            })
        );
        let many: Vec<Vec<u64>> = (0..65u64)
            .map(|i| (4 * i..4 * i + 4).map(|p| p + 0x40).collect())
            .collect();
        let lists: Vec<&[u64]> = many.iter().map(Vec::as_slice).collect();
        let bells: Vec<_> = (0..65u32).map(|i| bell(u64::from(i), i)).collect();
        assert_eq!(
            check(&lists, &bells),
            Err(SetupError::TooMany { count: 65 })
        );
    }

    #[test]
    fn adds_sub_channels_to_an_open_primary() {
        let mem = mem();
        let primary_rings = rings(&mem, &[0x10, 0x11, 0x12, 0x13]);
        let primary_bell = bell(0x1000, 5);
        let primary = host_channel(&primary_rings, &primary_bell, Config::default()).unwrap();
        let sub_bell = bell(0x2000, 6);
        let subs = host_sub_channels(
            (&primary_rings, &primary_bell),
            vec![ChannelSetup::new(
                rings(&mem, &[0x20, 0x21, 0x22, 0x23]),
                &sub_bell,
            )],
            Config::default(),
        )
        .unwrap();
        let set = ChannelSet::new(primary, subs);
        assert_eq!(set.open(), 2);
        // A sub-channel reusing the primary's doorbell is refused, naming the primary.
        let again = bell(0x1000, 7);
        assert_eq!(
            host_sub_channels(
                (&primary_rings, &primary_bell),
                vec![ChannelSetup::new(
                    rings(&mem, &[0x30, 0x31, 0x32, 0x33]),
                    &again
                )],
                Config::default(),
            )
            .unwrap_err(),
            SetupError::SharedDoorbell {
                address: 0x1000,
                pio: false,
                first: 0,
                second: 1
            }
        );
        // A control page whose write index is misaligned: the endpoint refuses it, naming
        // the channel.
        mem.write_obj(3u32, GuestAddress(0x40 * 4096)).unwrap();
        // SAFETY: as in `rings`.
        let raw = unsafe { RingPages::new(&mem, &[0x40, 0x41, 0x42, 0x43], 2) }.unwrap();
        let spare = bell(0x3000, 8);
        assert!(matches!(
            host_sub_channels(
                (&primary_rings, &primary_bell),
                vec![ChannelSetup::new(raw, &spare)],
                Config::default(),
            ),
            Err(SetupError::Channel { index: 1, .. })
        ));
    }
}
