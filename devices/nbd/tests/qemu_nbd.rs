//! The client against the real `qemu-nbd` (Debian's `qemu-utils`). A missing `qemu-nbd`
//! or `qemu-img` fails these tests: they never skip.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Rng, Scratch, assert_pattern, make_image};
use vmlink_nbd::{
    ConnectOptions, ImgBench, NbdClient, NbdError, QemuNbd, QemuNbdOptions, proto, qemu_img_bench,
};

const SIZE: u64 = 16 << 20;
const EXPORT: &str = "vmlink-test";

fn serve(tag: &str, options: &QemuNbdOptions) -> (Scratch, PathBuf, QemuNbd) {
    let scratch = Scratch::new(tag);
    let image = make_image(&scratch.path, "disk.img", SIZE);
    let server = QemuNbd::start(&image, EXPORT, options)
        .unwrap_or_else(|e| panic!("qemu-nbd must be installed and start: {e}"));
    (scratch, image, server)
}

fn connect(server: &QemuNbd) -> NbdClient {
    server
        .connect_with(&ConnectOptions {
            max_in_flight: 64,
            timeout: Some(Duration::from_secs(20)),
        })
        .expect("connect")
}

#[test]
fn version_is_reported() {
    let version = QemuNbd::version().expect("qemu-nbd --version");
    assert!(version.starts_with("qemu-nbd "), "{version}");
}

#[test]
fn handshake_reports_size_and_flags() {
    let (_scratch, _image, server) = serve("flags", &QemuNbdOptions::default());
    assert!(Path::new(&format!("/proc/{}", server.pid())).exists());
    let client = connect(&server);
    assert_eq!(client.size(), SIZE);
    assert!(!client.read_only());
    assert!(client.can_flush());
    assert!(client.can_trim());
    assert!(client.transmission_flags() & proto::FLAG_HAS_FLAGS != 0);
    assert_eq!(client.in_flight(), 0);
    assert_eq!(client.max_in_flight(), 64);
    client.disconnect().expect("disconnect");
}

#[test]
fn reads_at_assorted_offsets_and_lengths() {
    let (_scratch, _image, server) = serve("reads", &QemuNbdOptions::default());
    let mut client = connect(&server);
    let cases: &[(u64, usize)] = &[
        (0, 1),
        (0, 512),
        (0, 4096),
        (1, 7),
        (511, 1025),
        (4095, 2),
        (65_536 - 3, 65_536 + 6),
        ((1 << 20) + 3, 123_457),
        (SIZE - 4096, 4096),
        (SIZE - 1, 1),
        (0, SIZE as usize),
    ];
    for &(offset, len) in cases {
        let mut buf = vec![0u8; len];
        client.read_at(offset, &mut buf).expect("read");
        assert_pattern(offset, &buf);
    }
    // An empty read sends nothing and succeeds.
    client.read_at(SIZE + 100, &mut []).expect("empty read");
    client.disconnect().expect("disconnect");
}

#[test]
fn pipelined_reads_at_queue_depth_32() {
    let (_scratch, _image, server) = serve("qd32", &QemuNbdOptions::default());
    let mut client = connect(&server);
    const DEPTH: usize = 32;
    const MAX_LEN: u64 = 256 * 1024;
    let mut buffers = vec![vec![0u8; MAX_LEN as usize]; DEPTH];
    let mut expect = [(0u64, 0usize); DEPTH];
    let mut free: Vec<usize> = (0..DEPTH).collect();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (total, mut submitted, mut completed) = (2_000u64, 0u64, 0u64);
    let mut max_seen = 0;
    while completed < total {
        while submitted < total {
            let Some(slot) = free.pop() else { break };
            // Mostly small reads, some large, at any byte offset.
            let len = if rng.next().is_multiple_of(4) {
                rng.range(1, MAX_LEN)
            } else {
                rng.range(1, 8192)
            };
            let offset = rng.range(0, SIZE - len);
            // Handles far apart in the 64-bit space, the slot in the low byte.
            let handle = (submitted << 32) | 0x00ab_0000 | slot as u64;
            client
                .submit_read(handle, offset, len as u32)
                .expect("submit");
            expect[slot] = (offset, len as usize);
            submitted += 1;
        }
        max_seen = max_seen.max(client.in_flight());
        let reply = client
            .reap(|handle| Some(&mut buffers[(handle & 0xff) as usize][..]))
            .expect("reap");
        assert!(reply.is_ok(), "read failed: {reply:?}");
        let slot = (reply.handle & 0xff) as usize;
        let (offset, len) = expect[slot];
        assert_pattern(offset, &buffers[slot][..len]);
        free.push(slot);
        completed += 1;
    }
    assert_eq!(max_seen, DEPTH);
    assert!(matches!(
        client.reap(|_| None),
        Err(NbdError::NothingInFlight)
    ));
    client.disconnect().expect("disconnect");
}

#[test]
fn writes_reach_the_file_and_flush() {
    let (_scratch, image, server) = serve("writes", &QemuNbdOptions::default());
    let mut client = connect(&server);
    let mut model = fs::read(&image).expect("read image");

    // Blocking writes.
    for &(offset, len, byte) in &[
        (0u64, 4096usize, 0x11u8),
        (12_345, 777, 0x22),
        (SIZE - 1, 1, 0x33),
    ] {
        client.write_at(offset, &vec![byte; len]).expect("write");
        model[offset as usize..offset as usize + len].fill(byte);
    }
    // Pipelined writes of distinct regions, 32 in flight, then a flush.
    let mut rng = Rng(0xdead_beef_0042);
    let payloads: Vec<(u64, Vec<u8>)> = (0..32u64)
        .map(|i| {
            let len = rng.range(1, 100_000) as usize;
            let offset = i * (SIZE / 32) + rng.range(0, 1000);
            let data = (0..len).map(|_| rng.next() as u8).collect();
            (offset, data)
        })
        .collect();
    for (i, (offset, data)) in payloads.iter().enumerate() {
        client
            .submit_write(1000 + i as u64, *offset, data)
            .expect("submit write");
        model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    let mut answered = vec![false; payloads.len()];
    while client.in_flight() > 0 {
        let reply = client.reap(|_| None).expect("reap");
        assert!(reply.is_ok(), "{reply:?}");
        answered[(reply.handle - 1000) as usize] = true;
    }
    assert!(answered.iter().all(|a| *a));
    client.flush().expect("flush");
    // A pipelined flush too.
    client.submit_flush(7).expect("submit flush");
    assert_eq!(client.reap(|_| None).expect("reap flush").error, 0);

    assert!(
        fs::read(&image).expect("read image") == model,
        "the file differs from the writes"
    );
    // And back through NBD.
    let mut back = vec![0u8; SIZE as usize];
    client.read_at(0, &mut back).expect("read back");
    assert!(back == model, "NBD reads differ from the writes");
    client.disconnect().expect("disconnect");
}

/// Trim with qemu-nbd's default `--discard=ignore` and with `--discard=unmap`: the
/// protocol promises nothing about the trimmed bytes until they are written again, so
/// only success, untouched neighbours, and a working overwrite are asserted.
#[test]
fn trim_succeeds_and_leaves_neighbours_alone() {
    for discard in [None, Some("unmap".to_string())] {
        let options = QemuNbdOptions {
            discard: discard.clone(),
            ..QemuNbdOptions::default()
        };
        let (_scratch, _image, server) = serve("trim", &options);
        let mut client = connect(&server);
        assert!(client.can_trim());
        let (offset, len) = (1u64 << 20, 256u32 * 1024);
        client.trim(offset, len).expect("trim");
        let mut around = vec![0u8; 4096];
        client
            .read_at(offset - 4096, &mut around)
            .expect("read before");
        assert_pattern(offset - 4096, &around);
        client
            .read_at(offset + u64::from(len), &mut around)
            .expect("read after");
        assert_pattern(offset + u64::from(len), &around);
        let mut trimmed = vec![0u8; len as usize];
        client.read_at(offset, &mut trimmed).expect("read trimmed");
        let zeroes = trimmed.iter().all(|b| *b == 0);
        eprintln!("discard={discard:?}: trimmed range reads back as zeroes: {zeroes}");
        client
            .write_at(offset, &vec![0x5a; len as usize])
            .expect("overwrite");
        client
            .read_at(offset, &mut trimmed)
            .expect("read overwritten");
        assert!(trimmed.iter().all(|b| *b == 0x5a));
        // Pipelined trim.
        client.submit_trim(9, 0, 4096).expect("submit trim");
        assert!(client.reap(|_| None).expect("reap trim").is_ok());
        client.disconnect().expect("disconnect");
    }
}

#[test]
fn read_past_the_end_is_an_error_reply_and_the_connection_survives() {
    let (_scratch, _image, server) = serve("eof", &QemuNbdOptions::default());
    let mut client = connect(&server);
    let mut buf = vec![0u8; 1024];
    for offset in [SIZE - 512, SIZE, SIZE + 4096] {
        match client.read_at(offset, &mut buf) {
            Err(NbdError::Server { errno, command, .. }) => {
                assert_eq!(errno, proto::EINVAL, "read at {offset}");
                assert_eq!(command, "read");
            }
            other => panic!("read past the end at {offset}: {other:?}"),
        }
        assert!(!client.is_broken());
    }
    // Pipelined: the failing read among good ones, whose buffer is left alone.
    let mut buffers = vec![vec![0xeeu8; 4096]; 3];
    client.submit_read(0, 0, 4096).expect("submit");
    client.submit_read(1, SIZE - 100, 4096).expect("submit");
    client.submit_read(2, 8192, 4096).expect("submit");
    for _ in 0..3 {
        let reply = client
            .reap(|h| Some(&mut buffers[h as usize][..]))
            .expect("reap");
        let expected = if reply.handle == 1 { proto::EINVAL } else { 0 };
        assert_eq!(reply.error, expected, "{reply:?}");
    }
    assert_pattern(0, &buffers[0]);
    assert!(buffers[1].iter().all(|b| *b == 0xee));
    assert_pattern(8192, &buffers[2]);
    // A write past the end: the protocol asks for ENOSPC; qemu-nbd 10.0 answers EINVAL.
    match client.write_at(SIZE - 2, &[7; 4]) {
        Err(NbdError::Server { errno, .. }) => {
            assert!(
                errno == proto::ENOSPC || errno == proto::EINVAL,
                "errno {errno}"
            );
        }
        other => panic!("write past the end: {other:?}"),
    }
    client.read_at(4096, &mut buf).expect("still usable");
    assert_pattern(4096, &buf);
    client.disconnect().expect("disconnect");
}

#[test]
fn read_only_export_refuses_writes() {
    let options = QemuNbdOptions {
        read_only: true,
        ..QemuNbdOptions::default()
    };
    let (_scratch, image, server) = serve("ro", &options);
    let mut client = connect(&server);
    assert!(client.read_only());
    assert!(!client.can_trim(), "a read-only export offers no trim");
    assert!(matches!(
        client.trim(0, 4096),
        Err(NbdError::Unsupported { command: "trim" })
    ));
    // The protocol says a server SHOULD answer EPERM; qemu-nbd 10.0 answers EINVAL (its
    // request checks' errors all go out as EINVAL), so either is accepted.
    match client.write_at(0, &[1, 2, 3, 4]) {
        Err(NbdError::Server { errno, command, .. }) => {
            assert!(
                errno == proto::EPERM || errno == proto::EINVAL,
                "errno {errno}"
            );
            assert_eq!(command, "write");
        }
        other => panic!("write to a read-only export: {other:?}"),
    }
    assert!(!client.is_broken());
    let mut buf = [0u8; 4];
    client.read_at(0, &mut buf).expect("reads still work");
    assert_pattern(0, &buf);
    assert_eq!(fs::read(&image).expect("image")[..4], buf);
    client.disconnect().expect("disconnect");
}

#[test]
fn unknown_export_is_refused_by_name() {
    let (_scratch, _image, server) = serve("unknown", &QemuNbdOptions::default());
    match NbdClient::connect_unix(server.socket_path(), "no-such-export") {
        Err(NbdError::OptionRefused { code, export, .. }) => {
            assert_eq!(code, proto::REP_ERR_UNKNOWN);
            assert_eq!(export, "no-such-export");
        }
        other => panic!("unknown export: {other:?}"),
    }
    // The server is still fine.
    connect(&server).disconnect().expect("disconnect");
}

#[test]
fn shared_server_takes_two_clients_at_once() {
    let options = QemuNbdOptions {
        shared: 2,
        ..QemuNbdOptions::default()
    };
    let (_scratch, _image, server) = serve("shared", &options);
    let mut a = connect(&server);
    let mut b = connect(&server);
    a.write_at(100, b"hello").expect("write a");
    a.flush().expect("flush a");
    let mut buf = [0u8; 5];
    b.read_at(100, &mut buf).expect("read b");
    assert_eq!(&buf, b"hello");
    a.disconnect().expect("disconnect a");
    b.disconnect().expect("disconnect b");
}

#[test]
fn drop_kills_the_server_and_removes_its_directory() {
    let (_scratch, _image, server) = serve("drop", &QemuNbdOptions::default());
    let pid = server.pid();
    let socket = server.socket_path().to_owned();
    let dir = socket.parent().expect("socket dir").to_owned();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&dir).expect("dir").permissions());
    assert_eq!(mode & 0o777, 0o700);
    assert!(server.command_line().contains("--persistent"));
    drop(server);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "qemu-nbd {pid} still there"
    );
}

#[test]
fn missing_program_is_a_clear_error() {
    let scratch = Scratch::new("missing");
    let image = make_image(&scratch.path, "disk.img", 4096);
    let options = QemuNbdOptions {
        program: "/nonexistent/qemu-nbd".into(),
        ..QemuNbdOptions::default()
    };
    let e = QemuNbd::start(&image, EXPORT, &options).expect_err("no such program");
    assert!(matches!(e, NbdError::QemuNbdMissing { .. }), "{e:?}");
    assert!(e.to_string().contains("qemu-utils"), "{e}");
    let bench = ImgBench {
        program: "/nonexistent/qemu-img".into(),
        ..ImgBench::default()
    };
    let e = qemu_img_bench(Path::new("/tmp/x.sock"), EXPORT, &bench).expect_err("no qemu-img");
    assert!(matches!(e, NbdError::QemuImgMissing { .. }), "{e:?}");
}

#[test]
fn qemu_nbd_exiting_early_reports_its_stderr() {
    let scratch = Scratch::new("badimage");
    let e = QemuNbd::start(
        &scratch.path.join("missing.img"),
        EXPORT,
        &QemuNbdOptions::default(),
    )
    .expect_err("no image");
    match &e {
        NbdError::QemuNbdExited { stderr, .. } => assert!(!stderr.is_empty(), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn qemu_img_bench_reports_a_rate() {
    let (_scratch, _image, server) = serve("bench", &QemuNbdOptions::default());
    for (write, depth) in [(false, 1), (false, 16), (true, 4)] {
        let bench = ImgBench {
            count: 5_000,
            depth,
            size: 4096,
            write,
            ..ImgBench::default()
        };
        let result = qemu_img_bench(server.socket_path(), server.export(), &bench)
            .unwrap_or_else(|e| panic!("qemu-img bench: {e}"));
        assert!(
            result.ops_per_sec > 0.0 && result.ops_per_sec.is_finite(),
            "{result:?}"
        );
        assert!(result.elapsed > Duration::ZERO);
        assert!(
            result.command.contains("nbd+unix:///"),
            "{}",
            result.command
        );
        eprintln!(
            "qemu-img bench write={write} depth={depth}: {:.0} ops/s ({:?})",
            result.ops_per_sec, result.elapsed
        );
    }
    // The write run wrote zeroes from offset 0 on.
    let mut client = connect(&server);
    let mut buf = vec![0xffu8; 4096];
    client.read_at(0, &mut buf).expect("read");
    assert!(buf.iter().all(|b| *b == 0));
    client.disconnect().expect("disconnect");
}
