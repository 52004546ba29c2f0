//! `vmlink inspect` on hand-built ring images: a sound ring decoded packet by packet, a
//! ring with a corrupt descriptor reported with the exact rule it breaks, and the two
//! rings of a vmlink-shm memory image.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
