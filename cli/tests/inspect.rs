//! `vmlink inspect` on hand-built ring images: a sound ring decoded packet by packet, a
//! ring with a corrupt descriptor reported with the exact rule it breaks, and the two
//! rings of a vmlink-shm memory image.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmlink_ring::protocol::{CONTROL_PAGE_SIZE, FLAG_COMPLETION_REQUESTED, PacketType};
use vmlink_ring::{HeapMem, OutgoingPacket, PacketMeta, RingError, Writer};

/// A ring with 16 KiB of data holding: in-band "hello" (32 bytes of ring at 0x0), a
/// request with transaction id 7 (at 0x20), and in-band "bye".
fn image() -> Vec<u8> {
    let mem = HeapMem::new(4 * 4096).unwrap();
    let mut w = Writer::new(&mem).unwrap();
    w.push(&OutgoingPacket::in_band(&[b"hello"])).unwrap();
    let request = OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::InBand,
            flags: FLAG_COMPLETION_REQUESTED,
            transaction_id: 7,
        },
        header: &[],
        payload: &[b"ping1234"],
    };
    w.push(&request).unwrap();
    w.push(&OutgoingPacket::in_band(&[b"bye"])).unwrap();
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
        payload: &[b"data"],
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
        payload: &[],
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
fn a_serve_memfd_says_which_layout_it_was_read_with() {
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

    // Read as the default, one ring: it says so, and how to read it as what it is.
    let out = inspect(&memfd, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "layout: one ring (--layout ring, the default): a 4096-byte control page, then \
             2101248 data bytes"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "this file has the size of a vmlink serve/connect channel's memory, which holds \
             two rings: decode it with --layout shm --ring-data 1048576"
        ),
        "{text}"
    );
    let out = inspect(&memfd, &["--json"]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.contains("\"layout\":\"ring\",\"ring_data\":2101248,"),
        "{json}"
    );
    assert!(
        json.contains("\"layout_hint\":\"this file has the size of a vmlink serve/connect"),
        "{json}"
    );

    // As told: two sound rings, and no hint.
    let out = inspect(&memfd, &["--layout", "shm", "--ring-data", "1048576"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("layout: a vmlink-shm channel's memory (--layout shm --ring-data 1048576)"),
        "{text}"
    );
    assert!(text.contains("guest_to_host: 1048576 data bytes"), "{text}");
    assert!(text.contains("host_to_guest: 1048576 data bytes"), "{text}");
    assert_eq!(text.matches("\n  ok\n").count(), 2, "{text}");
    assert!(!text.contains("decode it with"), "{text}");
    let out = inspect(
        &memfd,
        &["--layout", "shm", "--ring-data", "1048576", "--json"],
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.contains("\"layout\":\"shm\",\"ring_data\":1048576,"),
        "{json}"
    );
    assert!(json.contains("\"layout_hint\":null"), "{json}");

    let (mut client, mut server) = (client, server);
    client.close();
    server.close();
    client.finish();
    server.finish();
    done(&socket);
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
    assert!(help.contains("--layout shm --ring-data BYTES"), "{help}");
    assert!(
        help.contains("1048576 for `vmlink serve` and `vmlink connect`"),
        "{help}"
    );
}
