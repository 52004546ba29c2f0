//! `vmlink inspect` on hand-built ring images: a sound ring decoded packet by packet, a
//! ring with a corrupt descriptor reported with the exact rule it breaks, the two rings of
//! a vmlink-shm memory image without a header (with flags), memory that starts with a
//! memory header (decoded whole with no flags, or its broken rule named), and a live
//! `vmlink serve`'s memfd read with no flags.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmlink_ring::area::{AreaError, AreaLayout, Region, Version};
use vmlink_ring::protocol::{CONTROL_PAGE_SIZE, FLAG_COMPLETION_REQUESTED, PacketType};
use vmlink_ring::{HeapMem, OutgoingPacket, PacketMeta, Payload, RingError, Writer};

/// A ring with 16 KiB of data holding: in-band "hello" (32 bytes of ring at 0x0), a
/// request with transaction id 7 (at 0x20), and in-band "bye".
fn image() -> Vec<u8> {
    let mem = HeapMem::new(4 * 4096).unwrap();
    let mut w = Writer::new(&mem).unwrap();
    w.push(&OutgoingPacket::in_band_slice(b"hello")).unwrap();
    let request = OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::InBand,
            flags: FLAG_COMPLETION_REQUESTED,
            transaction_id: 7,
        },
        header: &[],
        payload: Payload::Bytes(b"ping1234"),
    };
    w.push(&request).unwrap();
    w.push(&OutgoingPacket::in_band_slice(b"bye")).unwrap();
    let _ = w.commit();
    mem.to_image()
}

/// A path for an image in a directory of its own (removed by [`done`]).
fn temp(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("vmlink-cli-inspect-{}-{name}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    dir.join(name)
}

/// Removes the directory of an image from [`temp`].
fn done(path: &Path) {
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

fn inspect(path: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .arg("inspect")
        .arg(path)
        .args(extra)
        .output()
        .expect("run vmlink")
}

#[test]
fn a_sound_ring_is_decoded() {
    let path = temp("sound.ring");
    std::fs::write(&path, image()).unwrap();
    let out = inspect(&path, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("write_index        0x60"), "{text}");
    assert!(text.contains("@0x00000 in-band"), "{text}");
    assert!(text.contains("[68656c6c6f000000]"), "hello, padded: {text}");
    assert!(text.contains("flags 0x1 tid 0x7"), "{text}");
    assert!(text.contains("  ok"), "{text}");
    assert!(
        text.contains(
            "layout: one ring (--layout ring, the default): a 4096-byte control page, then \
             16384 data bytes"
        ),
        "{text}"
    );
    assert!(
        text.contains("decode it with --layout shm --ring-data BYTES, BYTES being"),
        "{text}"
    );

    let out = inspect(&path, &["--json"]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{json}");
    assert!(json.contains("\"write_index\":96"), "{json}");
    assert!(json.contains("\"transaction_id\":7"), "{json}");
    assert!(json.contains("\"ok\":true,\"error\":null"), "{json}");
    assert_eq!(json.matches("\"type\":\"in-band\"").count(), 3, "{json}");
    done(&path);
}

#[test]
fn a_corrupt_descriptor_is_named_exactly() {
    let mut bytes = image();
    // The second packet's descriptor starts 0x20 into the data area; its first two bytes
    // are the packet type.
    let at = CONTROL_PAGE_SIZE + 0x20;
    bytes[at..at + 2].copy_from_slice(&0x77u16.to_le_bytes());
    let path = temp("corrupt.ring");
    std::fs::write(&path, &bytes).unwrap();
    let rule = RingError::UnknownPacketType {
        offset: 0x20,
        packet_type: 0x77,
    }
    .to_string();

    let out = inspect(&path, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("@0x00000 in-band"),
        "the sound packet first: {text}"
    );
    assert!(
        text.contains(&format!("CORRUPT: {rule}")),
        "{rule} in {text}"
    );

    let out = inspect(&path, &["--json"]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert!(
        json.contains(&format!("\"ok\":false,\"error\":\"{rule}\"")),
        "{json}"
    );
    // The file was only read.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    done(&path);
}

#[test]
fn a_bad_index_and_a_short_file_are_reported() {
    let mut bytes = image();
    bytes[0..4].copy_from_slice(&13u32.to_le_bytes());
    let path = temp("misaligned.ring");
    std::fs::write(&path, &bytes).unwrap();
    let text = String::from_utf8_lossy(&inspect(&path, &[]).stdout).into_owned();
    assert!(
        text.contains("CORRUPT: the write index 0xd is not 8-byte aligned"),
        "{text}"
    );
    done(&path);

    let path = temp("short.ring");
    std::fs::write(&path, [0u8; 100]).unwrap();
    let out = inspect(&path, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("CORRUPT"));
    done(&path);
}

#[test]
fn an_shm_image_has_two_rings_and_a_buffer() {
    let ring = image();
    let empty = HeapMem::new(4 * 4096).unwrap().to_image();
    let mut bytes = ring.clone();
    bytes.extend_from_slice(&empty);
    bytes.extend_from_slice(&[0u8; 2 * 4096]);
    let path = temp("channel.shm");
    std::fs::write(&path, &bytes).unwrap();
    let out = inspect(&path, &["--layout", "shm", "--ring-data", "16384"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("guest_to_host: 16384 data bytes"), "{text}");
    assert!(text.contains("host_to_guest: 16384 data bytes"), "{text}");
    assert!(text.contains("(none)"), "{text}");
    assert!(text.contains("buffer area: 8192 bytes (2 pages)"), "{text}");
    done(&path);
}

#[test]
fn a_gpa_range_count_past_the_header_is_said_in_words() {
    // A GPA-direct header naming u32::MAX ranges, with room for one.
    let mut header = Vec::new();
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    header.extend_from_slice(&10u32.to_le_bytes()); // byte count
    header.extend_from_slice(&0u32.to_le_bytes()); // byte offset
    header.extend_from_slice(&1u64.to_le_bytes()); // its page
    let mem = HeapMem::new(4 * 4096).unwrap();
    let mut w = Writer::new(&mem).unwrap();
    let packet = OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::GpaDirect,
            flags: 0,
            transaction_id: 1,
        },
        header: &header,
        payload: Payload::Bytes(b"data"),
    };
    w.push(&packet).unwrap();
    let _ = w.commit();
    let path = temp("overflow.ring");
    std::fs::write(&path, mem.to_image()).unwrap();

    let out = inspect(&path, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "CORRUPT: packet at 0x0: GPA-direct header: it names 4294967295 ranges, more than \
             its 24 bytes hold"
        ),
        "{text}"
    );
    let out = inspect(&path, &["--json"]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.contains("it names 4294967295 ranges, more than its 24 bytes hold"),
        "{json}"
    );
    for debug in ["None", "Some("] {
        assert!(
            !text.contains(debug) && !json.contains(debug),
            "{text}\n{json}"
        );
    }
    done(&path);
}

#[test]
fn gpa_ranges_list_their_pages_plainly() {
    // One range of 5000 bytes at offset 100: two pages, 7 and 9.
    let mut header = Vec::new();
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&5000u32.to_le_bytes());
    header.extend_from_slice(&100u32.to_le_bytes());
    header.extend_from_slice(&7u64.to_le_bytes());
    header.extend_from_slice(&9u64.to_le_bytes());
    let mem = HeapMem::new(4 * 4096).unwrap();
    let mut w = Writer::new(&mem).unwrap();
    let packet = OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::GpaDirect,
            flags: 0,
            transaction_id: 1,
        },
        header: &header,
        payload: Payload::EMPTY,
    };
    w.push(&packet).unwrap();
    let _ = w.commit();
    let path = temp("gpa.ring");
    std::fs::write(&path, mem.to_image()).unwrap();
    let text = String::from_utf8_lossy(&inspect(&path, &[]).stdout).into_owned();
    assert!(
        text.contains("range: 5000 bytes at offset 100 of pages 7, 9"),
        "{text}"
    );
    let json = String::from_utf8_lossy(&inspect(&path, &["--json"]).stdout).into_owned();
    assert!(
        json.contains("{\"byte_offset\":100,\"byte_count\":5000,\"pages\":[7,9]}"),
        "{json}"
    );
    done(&path);
}

/// A `vmlink` process whose stdin stays open until dropped, so its channel stays up.
struct Live(Child);

impl Live {
    fn start(args: &[&str]) -> Self {
        Self(
            Command::new(env!("CARGO_BIN_EXE_vmlink"))
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("start vmlink"),
        )
    }

    /// Closes stdin: the outgoing direction ends.
    fn close(&mut self) {
        drop(self.0.stdin.take());
    }

    /// Waits (at most 10 s) for a successful exit.
    fn finish(mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                assert!(status.success(), "{status}");
                return;
            }
            assert!(Instant::now() < deadline, "vmlink did not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `/proc/PID/fd/N` of the process's vmlink-shm memfd, once it has one.
fn memfd_of(pid: u32) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
            let path = entry.unwrap().path();
            if let Ok(target) = std::fs::read_link(&path)
                && target.to_string_lossy().starts_with("/memfd:vmlink-shm")
            {
                return path;
            }
        }
        assert!(Instant::now() < deadline, "no memfd in process {pid}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_serve_memfd_is_read_from_its_header_with_no_flags() {
    let socket = temp("live.sock");
    let socket_arg = socket.to_str().unwrap();
    let server = Live::start(&["serve", "--socket", socket_arg]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the server never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    let client = Live::start(&["connect", "--socket", socket_arg]);
    let memfd = memfd_of(server.0.id());

    // No flags: the header page says it all. Rings of 1 MiB of data each after the header
    // page, no buffer area: 4096 + 2 * 1052672 bytes.
    let out = inspect(&memfd, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "layout: read from the memory's header (version 1.0): 1 channel, a buffer area \
             of 0 bytes, 2109440 bytes in all; --layout and --ring-data are only for files \
             without a header"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "  channel 0: guest_to_host at 0x1000 (1052672 bytes), host_to_guest at 0x102000 \
             (1052672 bytes)\n  buffer area at 0x203000 (0 bytes)\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("channel 0 guest_to_host: 1048576 data bytes"),
        "{text}"
    );
    assert!(
        text.contains("channel 0 host_to_guest: 1048576 data bytes"),
        "{text}"
    );
    assert_eq!(text.matches("\n  ok\n").count(), 2, "{text}");
    assert!(text.contains("feature_bits       0x1"), "{text}");
    assert!(
        text.contains("\nbuffer area: 0 bytes (0 pages) at offset 0x203000\n"),
        "{text}"
    );
    assert!(!text.contains("decode it with"), "{text}");
    assert!(!text.contains("CORRUPT"), "{text}");

    let out = inspect(&memfd, &["--json"]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{json}");
    assert!(
        json.contains("\"layout\":\"header\",\"layout_from_header\":true,\"ring_data\":null,"),
        "{json}"
    );
    assert!(
        json.contains(
            "\"header\":{\"version\":\"1.0\",\"area_len\":2109440,\"channels\":[{\"guest_to_host\":\
             {\"offset\":4096,\"len\":1052672},\"host_to_guest\":{\"offset\":1056768,\"len\":1052672}}],\
             \"buffer\":{\"offset\":2109440,\"len\":0}},\"header_error\":null,"
        ),
        "{json}"
    );
    assert!(
        json.contains("\"name\":\"channel 0 guest_to_host\",\"channel\":0,\"offset\":4096,"),
        "{json}"
    );
    assert!(
        json.contains("\"name\":\"channel 0 host_to_guest\",\"channel\":0,\"offset\":1056768,"),
        "{json}"
    );
    assert_eq!(json.matches("\"ok\":true").count(), 2, "{json}");
    assert!(json.contains("\"layout_hint\":null"), "{json}");

    // Flags meant for files without a header change nothing.
    let flagged = inspect(&memfd, &["--layout", "shm", "--ring-data", "4096"]);
    let flagged = String::from_utf8_lossy(&flagged.stdout);
    assert!(
        flagged.contains("layout: read from the memory's header"),
        "{flagged}"
    );
    assert!(
        flagged.contains("channel 0 host_to_guest: 1048576 data bytes"),
        "{flagged}"
    );

    let (mut client, mut server) = (client, server);
    client.close();
    server.close();
    client.finish();
    server.finish();
    done(&socket);
}

/// Memory with a header: two channels (channel 0's guest→host ring holding [`image`]'s
/// three packets, the other rings empty, each 4 data pages) and a buffer area of 2 pages,
/// the second with data. Offsets: rings at 0x1000, 0x6000, 0xB000, 0x10000; buffer at
/// 0x15000; 0x17000 bytes.
fn header_image() -> (AreaLayout, Vec<u8>) {
    let ring = (CONTROL_PAGE_SIZE + 4 * 4096) as u64;
    let area = AreaLayout::packed(&[(ring, ring), (ring, ring)], 2 * 4096).unwrap();
    let mut bytes = area.encode().to_vec();
    bytes.extend(image());
    let empty = HeapMem::new(4 * 4096).unwrap().to_image();
    for _ in 0..3 {
        bytes.extend(&empty);
    }
    bytes.extend([0u8; 4096]);
    bytes.extend([0xA5u8; 4096]);
    assert_eq!(bytes.len() as u64, area.len());
    (area, bytes)
}

#[test]
fn memory_with_a_header_is_decoded_whole_with_no_flags() {
    let (_, bytes) = header_image();
    let path = temp("header.shm");
    std::fs::write(&path, &bytes).unwrap();

    let out = inspect(&path, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "layout: read from the memory's header (version 1.0): 2 channels, a buffer area \
             of 8192 bytes, 94208 bytes in all;"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "  channel 0: guest_to_host at 0x1000 (20480 bytes), host_to_guest at 0x6000 \
             (20480 bytes)\n  channel 1: guest_to_host at 0xb000 (20480 bytes), host_to_guest \
             at 0x10000 (20480 bytes)\n  buffer area at 0x15000 (8192 bytes)\n"
        ),
        "{text}"
    );
    for ring in [
        "channel 0 guest_to_host",
        "channel 0 host_to_guest",
        "channel 1 guest_to_host",
        "channel 1 host_to_guest",
    ] {
        assert!(
            text.contains(&format!("\n{ring}: 16384 data bytes\n")),
            "{ring}: {text}"
        );
    }
    // Channel 0's guest→host ring holds the three packets; the others are empty.
    assert!(text.contains("[68656c6c6f000000]"), "{text}");
    assert!(text.contains("flags 0x1 tid 0x7"), "{text}");
    assert_eq!(text.matches("(none)").count(), 3, "{text}");
    assert_eq!(text.matches("\n  ok\n").count(), 4, "{text}");
    assert!(
        text.contains(
            "buffer area: 8192 bytes (2 pages) at offset 0x15000; 1 page holds data other \
             than zeros"
        ),
        "{text}"
    );

    let out = inspect(&path, &["--json"]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{json}");
    assert!(json.contains("\"layout_from_header\":true"), "{json}");
    assert!(
        json.contains("\"name\":\"channel 1 host_to_guest\",\"channel\":1,\"offset\":65536,"),
        "{json}"
    );
    assert_eq!(json.matches("\"type\":\"in-band\"").count(), 3, "{json}");
    assert!(
        json.contains("\"buffer_bytes\":8192,\"buffer_offset\":86016,\"buffer_used_pages\":1}"),
        "{json}"
    );
    // The file was only read.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    done(&path);
}

#[test]
fn a_corrupt_ring_under_a_sound_header_is_named() {
    let (area, mut bytes) = header_image();
    // Channel 1's host→guest ring: a write index that is not 8-byte aligned.
    let at = area.channels()[1].host_to_guest.offset as usize;
    bytes[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
    let path = temp("header-ring.shm");
    std::fs::write(&path, &bytes).unwrap();
    let out = inspect(&path, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("channel 1 host_to_guest: 16384 data bytes\n  write_index        0xd\n"),
        "{text}"
    );
    assert!(
        text.contains("CORRUPT: the write index 0xd is not 8-byte aligned"),
        "{text}"
    );
    assert_eq!(text.matches("CORRUPT").count(), 1, "{text}");
    done(&path);
}

/// A change that breaks a sound memory image.
type Corruption = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn a_corrupt_header_is_named_by_the_rule_it_breaks() {
    let (area, sound) = header_image();
    let g2h0 = Region::GuestToHost { channel: 0 };
    let h2g1 = Region::HostToGuest { channel: 1 };
    let put = |bytes: &mut Vec<u8>, at: usize, value: &[u8]| {
        bytes[at..at + value.len()].copy_from_slice(value);
    };
    let len = area.len();
    let cases: Vec<(&str, Corruption, AreaError)> = vec![
        (
            "version",
            Box::new(move |b| put(b, 0x08, &7u16.to_le_bytes())),
            AreaError::UnsupportedVersion {
                found: Version { major: 7, minor: 0 },
                supported: Version { major: 1, minor: 0 },
            },
        ),
        (
            "reserved",
            Box::new(move |b| put(b, 0x3F, &[9])),
            AreaError::ReservedNotZero {
                offset: 0x3F,
                value: 9,
            },
        ),
        (
            "truncated",
            Box::new(move |b| b.truncate(len as usize - 4096)),
            AreaError::LengthMismatch {
                header: len,
                actual: len - 4096,
            },
        ),
        (
            "count",
            Box::new(move |b| put(b, 0x18, &100u32.to_le_bytes())),
            AreaError::TooManyChannels {
                count: 100,
                max: 64,
            },
        ),
        (
            "aligned",
            Box::new(move |b| put(b, 0x40, &0x1200u64.to_le_bytes())),
            AreaError::Misaligned {
                region: g2h0,
                offset: 0x1200,
            },
        ),
        (
            "outside",
            Box::new(move |b| put(b, 0x70, &0x16000u64.to_le_bytes())),
            AreaError::OutsideArea {
                region: h2g1,
                offset: 0x16000,
                len: 20480,
                area_len: len,
            },
        ),
        (
            "overlap",
            Box::new(move |b| put(b, 0x70, &0x2000u64.to_le_bytes())),
            AreaError::Overlap {
                first: g2h0,
                second: h2g1,
            },
        ),
    ];
    for (name, corrupt, rule) in cases {
        let mut bytes = sound.clone();
        corrupt(&mut bytes);
        let path = temp(&format!("corrupt-header-{name}.shm"));
        std::fs::write(&path, &bytes).unwrap();
        let rule = rule.to_string();

        let out = inspect(&path, &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{name}: {text}");
        assert!(
            text.contains(
                "layout: read from the memory's header (the file starts with its magic \
                 \"VMLINKMA\"), which is corrupt, so nothing else was decoded\n"
            ),
            "{name}: {text}"
        );
        assert!(
            text.contains(&format!("  CORRUPT header: {rule}\n")),
            "{name}: {rule} in {text}"
        );
        assert!(!text.contains("data bytes"), "{name}: {text}");

        let out = inspect(&path, &["--json"]);
        let json = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{name}: {json}");
        assert!(
            json.contains(&format!(
                "\"header\":null,\"header_error\":\"{rule}\",\"rings\":[],"
            )),
            "{name}: {json}"
        );
        assert!(
            json.contains("\"layout_from_header\":true"),
            "{name}: {json}"
        );
        done(&path);
    }
}

#[test]
fn an_old_serve_image_without_a_header_gets_the_flags_to_use() {
    // The size of a vmlink serve/connect channel's memory from before the header: two
    // rings of 1 MiB of data.
    let path = temp("old-serve.shm");
    std::fs::write(&path, vec![0u8; 2 * (4096 + (1 << 20))]).unwrap();
    let text = String::from_utf8_lossy(&inspect(&path, &[]).stdout).into_owned();
    assert!(
        text.contains(
            "layout: one ring (--layout ring, the default): a 4096-byte control page, then \
             2101248 data bytes"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "this file has no memory header and the size of an older vmlink serve/connect \
             channel's memory, which holds two rings: decode it with --layout shm \
             --ring-data 1048576"
        ),
        "{text}"
    );
    let out = inspect(
        &path,
        &["--layout", "shm", "--ring-data", "1048576", "--json"],
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{json}");
    assert!(
        json.contains("\"layout\":\"shm\",\"layout_from_header\":false,\"ring_data\":1048576,"),
        "{json}"
    );
    assert!(
        json.contains("\"header\":null,\"header_error\":null"),
        "{json}"
    );
    assert_eq!(json.matches("\"ok\":true").count(), 2, "{json}");
    done(&path);
}

#[test]
fn inspect_help_says_how_to_read_a_channel() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(["inspect", "--help"])
        .output()
        .expect("run vmlink");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        help.contains("the output says which layout it assumed"),
        "{help}"
    );
    assert!(help.contains("describes itself"), "{help}");
    assert!(help.contains("with no flags"), "{help}");
    assert!(help.contains("--layout shm --ring-data BYTES"), "{help}");
}
