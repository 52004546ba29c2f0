//! The guest against a fake host that offers bad things.
use super::*;
use crate::error::RefusalCode;
use std::os::fd::BorrowedFd;
use std::thread;
use zerocopy::IntoBytes;

const T: Duration = Duration::from_secs(5);

fn memfd(len: u64, seals: std::ffi::c_int) -> OwnedFd {
    let fd = sys::memfd_create(c"test").unwrap();
    sys::ftruncate(fd.as_fd(), len).unwrap();
    if seals != 0 {
        sys::add_seals(fd.as_fd(), seals).unwrap();
    }
    fd
}

/// Writes `page` over the start of the file `fd`.
fn write_page(fd: BorrowedFd<'_>, page: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd.try_clone_to_owned().unwrap());
    file.write_all_at(page, 0).unwrap();
}

/// A sealed memfd of `layout`'s size with the memory header a host writes for it.
fn sound_memfd(layout: Layout) -> OwnedFd {
    let fd = memfd(layout.total_len(), sys::REQUIRED_SEALS);
    write_page(fd.as_fd(), &layout.area().unwrap().encode());
    fd
}

fn offer_body(layout: Layout, name: &str) -> Vec<u8> {
    let fixed = OfferBody {
        guest_to_host: layout.guest_to_host.into(),
        host_to_guest: layout.host_to_guest.into(),
        buffer: layout.buffer.into(),
        flags: 0.into(),
        service_len: (name.len() as u32).into(),
    };
    let mut body = fixed.as_bytes().to_vec();
    body.extend_from_slice(name.as_bytes());
    body
}

/// Runs a guest against `host`, which gets the host end after reading the hello, and
/// returns the guest's result and what the guest told the fake host afterwards.
fn against(
    host: impl FnOnce(&UnixStream) + Send,
) -> (Result<Endpoint, ShmError>, Option<ShmError>) {
    let (g, h) = UnixStream::pair().unwrap();
    thread::scope(|s| {
        let fake = s.spawn(move || {
            let hello = protocol::recv(&h, Deadline::after(T), "hello").unwrap();
            assert_eq!(hello.kind, protocol::HELLO);
            assert_eq!(hello.body, b"svc");
            host(&h);
            // What the guest answers (an error, or nothing before it hangs up).
            protocol::recv(&h, Deadline::after(T), "reply")
                .ok()
                .filter(|m| m.kind != protocol::READY)
                .map(|m| {
                    assert_eq!(m.kind, protocol::ERROR);
                    protocol::parse_error(&m.body)
                })
        });
        let result = Guest::new("svc")
            .with_handshake_timeout(T)
            .connect_stream(g);
        let reply = if result.is_err() {
            fake.join().unwrap()
        } else {
            None
        };
        (result, reply)
    })
}

fn offer_with(h: &UnixStream, layout: Layout, memfd: OwnedFd) {
    let (a, b) = (sys::eventfd().unwrap(), sys::eventfd().unwrap());
    protocol::send(
        h.as_fd(),
        protocol::OFFER,
        &offer_body(layout, "svc"),
        &[memfd.as_fd(), a.as_fd(), b.as_fd()],
        Deadline::after(T),
    )
    .unwrap();
}

fn refused_as_bad_offer(reply: Option<ShmError>) {
    match reply {
        Some(ShmError::Refused {
            code: RefusalCode::BadOffer,
            message,
        }) => assert!(!message.is_empty()),
        other => panic!("the host was not told: {other:?}"),
    }
}

#[test]
fn unsealed_memory_is_refused() {
    let layout = Layout::symmetric(4096, 0);
    let (r, reply) = against(|h| offer_with(h, layout, memfd(layout.total_len(), 0)));
    assert!(
        matches!(r, Err(ShmError::NotSealed { found: 0, .. })),
        "{r:?}"
    );
    refused_as_bad_offer(reply);
    // Sealed against shrinking only: still refused (growing and resealing stay open).
    let (r, _) = against(|h| {
        offer_with(
            h,
            layout,
            memfd(
                layout.total_len(),
                nix::fcntl::SealFlag::F_SEAL_SHRINK.bits(),
            ),
        )
    });
    assert!(matches!(r, Err(ShmError::NotSealed { .. })), "{r:?}");
}

#[test]
fn wrong_size_is_refused() {
    let layout = Layout::symmetric(4096, 0);
    let (r, reply) = against(|h| {
        offer_with(
            h,
            layout,
            memfd(layout.total_len() - 4096, sys::REQUIRED_SEALS),
        )
    });
    assert!(
        matches!(r, Err(ShmError::SizeMismatch { actual, expected }) if actual + 4096 == expected),
        "{r:?}"
    );
    refused_as_bad_offer(reply);
}

/// A memfd named `name` (for `/proc/self/maps`) of `len` bytes with `seals`.
fn named_memfd(name: &std::ffi::CStr, len: u64, seals: std::ffi::c_int) -> OwnedFd {
    let fd = sys::memfd_create(name).unwrap();
    sys::ftruncate(fd.as_fd(), len).unwrap();
    if seals != 0 {
        sys::add_seals(fd.as_fd(), seals).unwrap();
    }
    fd
}

/// Mappings of this process backed by a memfd named `name`.
fn mappings_of(name: &str) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let needle = format!("/memfd:{name} ");
    maps.lines().filter(|l| l.contains(&needle)).count()
}

/// A host that shrinks the memfd it offered and then seals it, right after the guest's
/// first question about the file: the guest's answer must not depend on what it
/// learnt before the seals held.
struct ShrinksAfterFirstLook<'a> {
    fd: BorrowedFd<'a>,
    acted: bool,
}

impl ShrinksAfterFirstLook<'_> {
    fn act_once(&mut self) {
        if !self.acted {
            self.acted = true;
            sys::ftruncate(self.fd, 0).unwrap();
            sys::add_seals(self.fd, sys::REQUIRED_SEALS).unwrap();
        }
    }
}

impl MemfdFacts for ShrinksAfterFirstLook<'_> {
    fn seals(&mut self) -> std::io::Result<std::ffi::c_int> {
        let answer = sys::get_seals(self.fd);
        self.act_once();
        answer
    }

    fn size(&mut self) -> std::io::Result<(u64, bool)> {
        let answer = sys::file_size(self.fd);
        self.act_once();
        answer
    }
}

#[test]
fn the_seals_are_checked_before_the_size() {
    let len = Layout::symmetric(4096, 0).total_len();
    let fd = memfd(len, 0);
    let mut hostile = ShrinksAfterFirstLook {
        fd: fd.as_fd(),
        acted: false,
    };
    let r = check_memory(&mut hostile, len);
    assert!(
        matches!(r, Err(ShmError::NotSealed { found: 0, .. })),
        "the guest trusted a size read before the seals: {r:?}"
    );
    // The host did shrink and seal it: the same file asked again is now short.
    assert!(hostile.acted);
    let r = check_memory(&mut fd.as_fd(), len);
    assert!(
        matches!(r, Err(ShmError::SizeMismatch { actual: 0, expected }) if expected == len),
        "{r:?}"
    );
    // Right size and sealed: accepted.
    let good = memfd(len, sys::REQUIRED_SEALS);
    check_memory(&mut good.as_fd(), len).unwrap();
}

#[test]
fn unsealed_and_short_memory_is_refused_as_unsealed_and_never_mapped() {
    let layout = Layout::symmetric(4096, 0);
    let name = "vmlink-test-unsealed-short";
    let (r, reply) = against(|h| {
        let fd = named_memfd(c"vmlink-test-unsealed-short", layout.total_len() - 4096, 0);
        offer_with(h, layout, fd)
    });
    assert!(
        matches!(r, Err(ShmError::NotSealed { found: 0, .. })),
        "an unsealed file's size means nothing: {r:?}"
    );
    refused_as_bad_offer(reply);
    assert_eq!(mappings_of(name), 0);
}

#[test]
fn sealed_but_short_memory_is_refused_and_never_mapped() {
    let layout = Layout::symmetric(4096, 4096);
    let name = "vmlink-test-sealed-short";
    let (r, reply) = against(|h| {
        let fd = named_memfd(
            c"vmlink-test-sealed-short",
            layout.total_len() - 4096,
            sys::REQUIRED_SEALS,
        );
        offer_with(h, layout, fd)
    });
    assert!(
        matches!(r, Err(ShmError::SizeMismatch { actual, expected }) if actual + 4096 == expected),
        "{r:?}"
    );
    refused_as_bad_offer(reply);
    assert_eq!(mappings_of(name), 0);
    // The same offer at the right size is mapped (so the check above can see one).
    let (r, _) = against(|h| {
        let fd = named_memfd(
            c"vmlink-test-sealed-short",
            layout.total_len(),
            sys::REQUIRED_SEALS,
        );
        write_page(fd.as_fd(), &layout.area().unwrap().encode());
        offer_with(h, layout, fd)
    });
    let endpoint = r.unwrap();
    assert_eq!(mappings_of(name), 1);
    drop(endpoint);
    assert_eq!(mappings_of(name), 0);
}

#[test]
fn an_fd_that_cannot_carry_seals_is_not_a_memfd() {
    let layout = Layout::symmetric(4096, 0);
    let (r, reply) = against(|h| offer_with(h, layout, sys::eventfd().unwrap()));
    assert!(matches!(r, Err(ShmError::NotAMemfd)), "{r:?}");
    refused_as_bad_offer(reply);
}

#[test]
fn bad_layout_is_refused() {
    let layout = Layout::new(4096, 8192, 0);
    let (r, reply) = against(|h| offer_with(h, layout, memfd(12288, sys::REQUIRED_SEALS)));
    assert!(matches!(r, Err(ShmError::Layout(_))), "{r:?}");
    refused_as_bad_offer(reply);
}

#[test]
fn too_many_fds_are_refused_and_closed() {
    let layout = Layout::symmetric(4096, 0);
    let (r, reply) = against(|h| {
        let fd = memfd(layout.total_len(), sys::REQUIRED_SEALS);
        let extra: Vec<OwnedFd> = (0..3).map(|_| sys::eventfd().unwrap()).collect();
        // Four fds with an offer, which carries three.
        let fds = [
            fd.as_fd(),
            extra[0].as_fd(),
            extra[1].as_fd(),
            extra[2].as_fd(),
        ];
        let bytes = offer_message(layout);
        send_raw_with_fds(h, &bytes, &fds);
    });
    assert!(
        matches!(
            r,
            Err(ShmError::UnexpectedFds {
                expected: 3,
                received: 4
            })
        ),
        "{r:?}"
    );
    assert!(matches!(
        reply,
        Some(ShmError::Refused {
            code: RefusalCode::Malformed,
            ..
        })
    ));
}

/// `sys::send_with_fds` allows 3; this test needs 4.
/// A whole offer message for service "svc" with `layout`: header and body.
fn offer_message(layout: Layout) -> Vec<u8> {
    let body = offer_body(layout, "svc");
    let mut bytes = protocol::Header {
        magic: protocol::MAGIC,
        version: protocol::VERSION.into(),
        kind: protocol::OFFER.into(),
        body_len: (body.len() as u32).into(),
    }
    .as_bytes()
    .to_vec();
    bytes.extend(body);
    bytes
}

fn send_raw_with_fds(h: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    use std::os::fd::AsRawFd;
    let raw: Vec<_> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let n = sendmsg::<UnixAddr>(
        h.as_raw_fd(),
        &[std::io::IoSlice::new(bytes)],
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .unwrap();
    assert_eq!(n, bytes.len());
}

#[test]
fn more_fds_than_any_message_carries_are_refused_as_truncated() {
    let layout = Layout::symmetric(4096, 0);
    let (r, _) = against(|h| {
        let fd = memfd(layout.total_len(), sys::REQUIRED_SEALS);
        let extra: Vec<OwnedFd> = (0..sys::MAX_FDS).map(|_| sys::eventfd().unwrap()).collect();
        // One more than the most any message carries (an offer of 63 sub-channels).
        let mut fds = vec![fd.as_fd()];
        fds.extend(extra.iter().map(|e| e.as_fd()));
        let bytes = offer_message(layout);
        send_raw_with_fds(h, &bytes, &fds);
    });
    assert!(matches!(r, Err(ShmError::ControlTruncated)), "{r:?}");
}

#[test]
fn a_host_speaking_another_version_is_refused() {
    let (r, reply) = against(|h| {
        let header = protocol::Header {
            magic: protocol::MAGIC,
            version: 2.into(),
            kind: protocol::OFFER.into(),
            body_len: 0.into(),
        };
        std::io::Write::write_all(&mut &*h, header.as_bytes()).unwrap();
    });
    assert!(
        matches!(r, Err(ShmError::UnsupportedVersion { peer: 2, ours: 1 })),
        "{r:?}"
    );
    assert!(matches!(
        reply,
        Some(ShmError::Refused {
            code: RefusalCode::UnsupportedVersion,
            ..
        })
    ));
}

#[test]
fn a_host_refusal_is_reported() {
    let (r, _) = against(|h| {
        protocol::send_error(
            h.as_fd(),
            RefusalCode::NotAllowed,
            "go away",
            Deadline::after(T),
        )
    });
    match r {
        Err(ShmError::Refused {
            code: RefusalCode::NotAllowed,
            message,
        }) => assert_eq!(message, "go away"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn received_fds_are_close_on_exec_and_memory_is_sealed() {
    let layout = Layout::symmetric(4096, 8192);
    let (r, _) = against(|h| offer_with(h, layout, sound_memfd(layout)));
    let ep = r.unwrap();
    let mut fds = vec![ep.memory().mapping().memfd()];
    fds.push(ep.channel().doorbell().wait_fd());
    fds.push(ep.channel().doorbell().signal_fd());
    fds.push(ep.channel().doorbell().hangup_fd().unwrap());
    for fd in fds {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        let flags = FdFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFD).unwrap());
        assert!(flags.contains(FdFlag::FD_CLOEXEC), "fd {fd:?} inherits");
    }
    assert_eq!(ep.buffer().pages(), 2);
    assert_eq!(ep.channel().config().gpa_page_limit, Some(2));
}
/// A host whose memory header is hostile: each test breaks one rule of a sound header
/// (or writes a sound header that disagrees with the offer) and expects the guest to
/// refuse the offer with exactly that rule, tell the host, and leave the memory unmapped.
mod header {
    use super::*;
    use std::ffi::CString;
    use vmlink_ring::area::{AreaError, ChannelRings, Region, Span, Version};

    /// Two rings of 1 data page each and 4 buffer pages: the header page, guest→host
    /// at 0x1000, host→guest at 0x3000, the buffer at 0x5000; 0x9000 bytes in all.
    const LAYOUT: Layout = Layout::new(8192, 8192, 4 * 4096);

    const G2H: Region = Region::GuestToHost { channel: 0 };
    const H2G: Region = Region::HostToGuest { channel: 0 };

    fn sound_page() -> [u8; 4096] {
        LAYOUT.area().unwrap().encode()
    }

    /// The sound page with `bytes` written at `at`.
    fn with(at: usize, bytes: &[u8]) -> [u8; 4096] {
        let mut page = sound_page();
        page[at..at + bytes.len()].copy_from_slice(bytes);
        page
    }

    /// Offers [`LAYOUT`] in a memfd named `name` whose first page is `page`; returns
    /// what the guest made of it.
    fn offer_page(name: &str, page: [u8; 4096]) -> (Result<Endpoint, ShmError>, Option<ShmError>) {
        let cname = CString::new(name).unwrap();
        against(move |h| {
            let fd = named_memfd(&cname, LAYOUT.total_len(), sys::REQUIRED_SEALS);
            write_page(fd.as_fd(), &page);
            offer_with(h, LAYOUT, fd)
        })
    }

    /// The guest's error for a refused page, after checking the host was told and the
    /// memory is no longer mapped.
    fn refused(name: &str, page: [u8; 4096]) -> ShmError {
        let (r, reply) = offer_page(name, page);
        let e = r.expect_err("the guest accepted a bad header");
        refused_as_bad_offer(reply);
        assert_eq!(mappings_of(name), 0, "the refused memory stayed mapped");
        e
    }

    /// The rule a refused page broke.
    fn rule(name: &str, page: [u8; 4096]) -> AreaError {
        match refused(name, page) {
            ShmError::BadHeader(e) => e,
            other => panic!("not a header rule: {other}"),
        }
    }

    #[test]
    fn a_sound_header_is_accepted() {
        let (r, _) = offer_page("vmlink-test-header-sound", sound_page());
        let ep = r.unwrap();
        let read = ep.memory().header().unwrap();
        assert_eq!(read.layout, LAYOUT.area().unwrap());
        assert_eq!(ep.memory().layout(), LAYOUT);
        assert_eq!(ep.buffer().pages(), 4);
        // Mapped once, so the refusals' count of 0 means unmapped, not never mapped.
        assert_eq!(mappings_of("vmlink-test-header-sound"), 1);
    }

    #[test]
    fn a_newer_minor_version_with_more_fields_is_accepted() {
        // Version 1.3: 32 more bytes of fixed fields (the table moves after them) and
        // bytes after the table, all unknown to this guest.
        let sound = sound_page();
        let mut page = [0xEEu8; 4096];
        page[..64].copy_from_slice(&sound[..64]);
        page[0x0A..0x0C].copy_from_slice(&3u16.to_le_bytes());
        page[0x0C..0x10].copy_from_slice(&96u32.to_le_bytes());
        page[64..96].fill(0xAA);
        page[96..128].copy_from_slice(&sound[64..96]);
        let (r, _) = offer_page("vmlink-test-header-minor", page);
        let ep = r.unwrap();
        assert_eq!(
            ep.memory().header().unwrap().version,
            Version { major: 1, minor: 3 }
        );
    }

    #[test]
    fn no_header_is_refused() {
        assert_eq!(
            rule("vmlink-test-header-none", [0; 4096]),
            AreaError::BadMagic { found: [0; 8] }
        );
    }

    #[test]
    fn another_major_version_is_refused() {
        assert_eq!(
            rule("vmlink-test-header-major", with(0x08, &2u16.to_le_bytes())),
            AreaError::UnsupportedVersion {
                found: Version { major: 2, minor: 0 },
                supported: Version { major: 1, minor: 0 },
            }
        );
    }

    #[test]
    fn a_bad_header_length_is_refused() {
        assert_eq!(
            rule("vmlink-test-header-hlen", with(0x0C, &60u32.to_le_bytes())),
            AreaError::BadHeaderLen { len: 60 }
        );
    }

    #[test]
    fn a_bad_entry_length_is_refused() {
        assert_eq!(
            rule("vmlink-test-header-elen", with(0x1C, &36u32.to_le_bytes())),
            AreaError::BadEntryLen { len: 36 }
        );
    }

    #[test]
    fn a_reserved_byte_set_is_refused() {
        assert_eq!(
            rule("vmlink-test-header-reserved", with(0x38, &[1])),
            AreaError::ReservedNotZero {
                offset: 0x38,
                value: 1
            }
        );
    }

    #[test]
    fn an_area_length_of_part_pages_is_refused() {
        assert_eq!(
            rule(
                "vmlink-test-header-alen",
                with(0x10, &0x9001u64.to_le_bytes())
            ),
            AreaError::BadAreaLen { len: 0x9001 }
        );
    }

    #[test]
    fn an_area_length_other_than_the_memory_is_refused() {
        assert_eq!(
            rule(
                "vmlink-test-header-amem",
                with(0x10, &0xA000u64.to_le_bytes())
            ),
            AreaError::LengthMismatch {
                header: 0xA000,
                actual: 0x9000
            }
        );
    }

    #[test]
    fn too_many_channels_are_refused() {
        assert_eq!(
            rule("vmlink-test-header-count", with(0x18, &65u32.to_le_bytes())),
            AreaError::TooManyChannels { count: 65, max: 64 }
        );
    }

    #[test]
    fn a_table_past_the_page_is_refused() {
        let mut page = with(0x18, &64u32.to_le_bytes());
        page[0x1C..0x20].copy_from_slice(&64u32.to_le_bytes());
        assert_eq!(
            rule("vmlink-test-header-table", page),
            AreaError::TablePastPage { end: 4160 }
        );
    }

    #[test]
    fn a_misaligned_ring_is_refused() {
        assert_eq!(
            rule(
                "vmlink-test-header-align",
                with(0x40, &0x1008u64.to_le_bytes())
            ),
            AreaError::Misaligned {
                region: G2H,
                offset: 0x1008
            }
        );
    }

    #[test]
    fn a_ring_without_data_pages_is_refused() {
        assert_eq!(
            rule(
                "vmlink-test-header-ring",
                with(0x58, &4096u64.to_le_bytes())
            ),
            AreaError::BadRingLen {
                region: H2G,
                len: 4096
            }
        );
    }

    #[test]
    fn a_buffer_of_part_pages_is_refused() {
        assert_eq!(
            rule(
                "vmlink-test-header-buffer",
                with(0x28, &0x1800u64.to_le_bytes())
            ),
            AreaError::BadBufferLen { len: 0x1800 }
        );
    }

    #[test]
    fn a_region_past_the_memory_is_refused() {
        assert_eq!(
            rule(
                "vmlink-test-header-outside",
                with(0x28, &0x5000u64.to_le_bytes())
            ),
            AreaError::OutsideArea {
                region: Region::Buffer,
                offset: 0x5000,
                len: 0x5000,
                area_len: 0x9000
            }
        );
    }

    #[test]
    fn overlapping_regions_are_refused() {
        assert_eq!(
            rule(
                "vmlink-test-header-overlap",
                with(0x50, &0x2000u64.to_le_bytes())
            ),
            AreaError::Overlap {
                first: G2H,
                second: H2G
            }
        );
    }

    /// A sound header for another arrangement of the same 0x9000 bytes.
    fn other(channels: &[ChannelRings], buffer: Span) -> [u8; 4096] {
        AreaLayout::new(0x9000, channels, buffer).unwrap().encode()
    }

    fn ring(offset: u64) -> Span {
        Span::new(offset, 8192)
    }

    #[test]
    fn a_header_with_two_channels_is_refused() {
        let ch = |at| ChannelRings {
            guest_to_host: ring(at),
            host_to_guest: ring(at + 8192),
        };
        let page = other(&[ch(0x1000), ch(0x5000)], Span::new(0x9000, 0));
        let e = refused("vmlink-test-header-two", page);
        assert!(
            matches!(
                e,
                ShmError::HeaderMismatch {
                    what: "the number of channels",
                    header: 2,
                    offer: 1
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_header_with_the_rings_swapped_is_refused() {
        let swapped = ChannelRings {
            guest_to_host: ring(0x3000),
            host_to_guest: ring(0x1000),
        };
        let page = other(&[swapped], Span::new(0x5000, 0x4000));
        let e = refused("vmlink-test-header-swapped", page);
        assert_eq!(
            e.to_string(),
            "the shared memory's header disagrees with the offer: the guest-to-host \
             ring's offset is 12288 in the header and 4096 in the offer"
        );
    }

    #[test]
    fn a_header_with_a_shorter_buffer_is_refused() {
        let ch = ChannelRings {
            guest_to_host: ring(0x1000),
            host_to_guest: ring(0x3000),
        };
        let page = other(&[ch], Span::new(0x5000, 0x2000));
        let e = refused("vmlink-test-header-shorter", page);
        assert!(
            matches!(
                e,
                ShmError::HeaderMismatch {
                    what: "the buffer area's length",
                    header: 0x2000,
                    offer: 0x4000
                }
            ),
            "{e}"
        );
    }
}

/// Runs a guest asking for `asked` sub-channels against a fake host that answers with a
/// set offer of `offered` sub-channels and `fds`; returns the guest's result and its reply.
fn against_set(
    asked: u32,
    offered: u32,
    fds: impl FnOnce(Layout) -> Vec<OwnedFd> + Send,
) -> (Result<Endpoint, ShmError>, Option<ShmError>) {
    let (g, h) = UnixStream::pair().unwrap();
    let layout = Layout::symmetric(4096, 0);
    thread::scope(|s| {
        let fake = s.spawn(move || {
            let hello = protocol::recv(&h, Deadline::after(T), "hello").unwrap();
            assert_eq!(hello.kind, protocol::HELLO_SET);
            assert_eq!(&hello.body[..2], (asked as u16).to_le_bytes());
            assert_eq!(&hello.body[8..], b"svc");
            let mut body = offer_body(layout, "svc");
            body[24..28].copy_from_slice(&offered.to_le_bytes());
            let fds = fds(layout);
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            let sent = protocol::send(
                h.as_fd(),
                protocol::OFFER_SET,
                &body,
                &borrowed,
                Deadline::after(T),
            );
            sent.unwrap();
            protocol::recv(&h, Deadline::after(T), "reply")
                .ok()
                .map(|m| protocol::parse_error(&m.body))
        });
        let guest = Guest::new("svc").with_sub_channels(asked).connect_stream(g);
        (guest, fake.join().unwrap())
    })
}

#[test]
fn a_set_offer_of_more_sub_channels_than_asked_is_refused() {
    let (r, reply) = against_set(1, 3, |_| Vec::new());
    assert!(
        matches!(
            r,
            Err(ShmError::TooManySubChannels {
                asked: 1,
                offered: 3
            })
        ),
        "{r:?}"
    );
    assert!(matches!(
        reply,
        Some(ShmError::Refused {
            code: RefusalCode::BadOffer,
            ..
        })
    ));
}

#[test]
fn a_set_offer_without_every_channels_fds_is_refused_and_they_are_closed() {
    // One sub-channel needs 6 fds; the host sends the primary's 3 only.
    let (r, reply) = against_set(2, 1, |layout| {
        vec![
            sound_memfd(layout),
            sys::eventfd().unwrap(),
            sys::eventfd().unwrap(),
        ]
    });
    assert!(
        matches!(
            r,
            Err(ShmError::UnexpectedFds {
                expected: 6,
                received: 3
            })
        ),
        "{r:?}"
    );
    assert!(reply.is_some());
    // A sub-channel "socket" that is an eventfd is no socket.
    let (r, _) = against_set(1, 1, |layout| {
        let mut fds = vec![memfd(
            Layout::symmetric(4096, 0).validate_set(1).unwrap(),
            sys::REQUIRED_SEALS,
        )];
        write_page(fds[0].as_fd(), &layout.area_for(1).unwrap().encode());
        fds.extend((0..5).map(|_| sys::eventfd().unwrap()));
        fds
    });
    assert!(
        matches!(r, Err(ShmError::Malformed(m)) if m.contains("stream")),
        "{r:?}"
    );
}
