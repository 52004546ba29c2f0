//! `vmlink disk serve` and `vmlink disk bench` from outside: guests that come, vanish and
//! misbehave against a serving process, wrong flags, a duplicate server, and the
//! benchmark's smoke run with every case checked.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::private_dir;
use vmlink_channel::Wait;
use vmlink_disk::{DiskClient, DiskError, Status, config};
use vmlink_shm::Guest;

fn vmlink() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmlink"))
}

/// `vmlink disk serve IMAGE --socket SOCKET ARGS`, once its socket is there.
fn serve(image: &Path, socket: &Path, args: &[&str]) -> Child {
    let child = vmlink()
        .args(["disk", "serve"])
        .arg(image)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmlink disk serve");
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the server never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Stops a server and returns what it logged.
fn stop(mut child: Child) -> String {
    child.kill().unwrap();
    child.wait().unwrap();
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    log
}

fn client(socket: &Path) -> DiskClient {
    let (channel, memory) = Guest::new("disk")
        .with_config(config())
        .connect(socket)
        .unwrap()
        .into_parts();
    DiskClient::new(channel, memory.buffer()).unwrap()
}

/// Threads of process `pid` whose affinity is a single CPU.
fn pinned_threads(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .is_some_and(|cpus| cpus.trim().parse::<usize>().is_ok())
        })
        .count()
}

/// An image of 8 MiB of zeros in `dir`.
fn blank_image(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    image
}

/// A guest that writes `flushed` at sector 0 and flushes it, queues sixteen writes of
/// 64 KiB of `byte` behind it (sectors 4096 on), and vanishes with them in flight.
fn vanish_mid_request(socket: &Path, flushed: &[u8], byte: u8) {
    let mut guest = client(socket);
    guest.write(0, flushed).unwrap();
    guest.flush().unwrap();
    let b = guest.buffers();
    for i in 0..16 {
        let at = b.start + i * 65536;
        guest.area().write(at, &[byte; 65536]).unwrap();
        guest
            .submit_write(4096 + i as u64 * 128, at..at + 65536, false, Wait::Forever)
            .unwrap();
    }
}

#[test]
fn a_served_image_outlives_guests_that_vanish_or_misbehave() {
    let dir = private_dir("disk-serve");
    let image = blank_image(&dir);
    let socket = dir.join("disk.sock");
    let server = serve(
        &image,
        &socket,
        &["--sub-channels", "2", "--pin", "--io-threads", "1"],
    );

    // A guest writes and flushes, then vanishes mid-request: its channel closes with
    // sixteen queued writes in flight.
    vanish_mid_request(&socket, &[0x11; 1 << 20], 0x22);

    // Garbage on the socket, and a client that connects and says nothing.
    let mut garbage = UnixStream::connect(&socket).unwrap();
    garbage.write_all(&[0xff; 64]).unwrap();
    let silent = UnixStream::connect(&socket).unwrap();

    // A later guest with sub-channels still finds the first guest's flushed data, and its
    // bad requests are refused while the server goes on.
    let mut endpoint = Guest::new("disk")
        .with_config(config())
        .with_sub_channels(2)
        .connect(&socket)
        .unwrap();
    let subs = endpoint.take_sub_channels();
    assert_eq!(subs.len(), 2, "the server offers two sub-channels");
    // `--pin`: each of the three channels is served on a thread allowed on one CPU only,
    // and so is each channel's I/O thread.
    let pinned = (0..100)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            pinned_threads(server.id())
        })
        .find(|&n| n >= 6);
    assert!(
        pinned.is_some(),
        "{} pinned threads",
        pinned_threads(server.id())
    );
    let (channel, memory) = endpoint.into_parts();
    let mut second = DiskClient::new(channel, memory.buffer()).unwrap();
    let mut back = vec![0u8; 1 << 20];
    second.read(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x11), "a flushed write was lost");
    let sectors = second.info().sectors;
    let err = second.read(sectors - 1, &mut [0u8; 1024]).unwrap_err();
    assert!(matches!(err, DiskError::OutOfRange { .. }), "{err}");
    let b = second.buffers();
    // The host half of the area: refused by the host, not the client.
    let host_page = vmlink_channel::packet::GpaRange {
        byte_offset: 0,
        byte_count: 4096,
        pages: &[0],
    };
    let header = vmlink_disk::proto::RequestHeader::new(vmlink_disk::proto::Op::Read, 0, 8);
    let id = second
        .channel()
        .start_gpa_request(&[host_page], &header.encode(), Wait::Forever)
        .unwrap();
    let done = second.reap(Wait::Forever).unwrap();
    assert_eq!((done.id, done.completion.status), (id, Status::BadBuffer));
    second.area().write(b.start, &[0x33; 4096]).unwrap();
    let id = second
        .submit_write(0, b.start..b.start + 4096, true, Wait::Forever)
        .unwrap();
    assert_eq!(second.reap(Wait::Forever).unwrap().id, id);
    drop((second, subs, garbage, silent));

    let log = stop(server);
    assert!(log.contains("refused a guest"), "{log}");
    assert!(log.contains("with 3 channel(s)"), "{log}");
    assert!(log.contains("channel 0 left"), "{log}");
    let image = std::fs::read(&image).unwrap();
    assert!(image[..4096].iter().all(|&b| b == 0x33));
    assert!(image[4096..1 << 20].iter().all(|&b| b == 0x11));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_server_with_io_uring_serves_keeps_flushed_data_and_outlives_a_guest_that_vanishes() {
    let dir = private_dir("disk-uring");
    let image = blank_image(&dir);
    let socket = dir.join("disk.sock");
    let server = serve(&image, &socket, &["--io-uring", "16"]);
    // Written and flushed, then sixteen writes in flight when the guest vanishes.
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
    vanish_mid_request(&socket, &data, 0x44);
    // The next guest reads back what was flushed, and what it writes with FUA is there.
    let mut second = client(&socket);
    let mut back = vec![0u8; 1 << 20];
    second.read(0, &mut back).unwrap();
    assert!(back == data, "a flushed write was lost or read wrong");
    let sectors = second.info().sectors;
    let err = second.read(sectors - 1, &mut [0u8; 1024]).unwrap_err();
    assert!(matches!(err, DiskError::OutOfRange { .. }), "{err}");
    let b = second.buffers();
    second.area().write(b.start, &[0x55; 8192]).unwrap();
    let id = second
        .submit_write(0, b.start..b.start + 8192, true, Wait::Forever)
        .unwrap();
    let done = second.reap(Wait::Forever).unwrap();
    assert_eq!(done.id, id);
    done.result().unwrap();
    drop(second);
    let log = stop(server);
    assert!(log.contains("channel 0 left"), "{log}");
    let image = std::fs::read(&image).unwrap();
    assert!(image[..8192].iter().all(|&b| b == 0x55));
    assert!(image[8192..1 << 20] == data[8192..]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_flags_missing_images_and_a_duplicate_server_are_refused() {
    let dir = private_dir("disk-flags");
    let socket = dir.join("disk.sock");
    let run = |args: &[&str]| {
        let out = vmlink().args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["disk", "serve", "--socket", socket.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("IMAGE"), "{err}");
    let missing = dir.join("missing.img");
    let (code, err) = run(&[
        "disk",
        "serve",
        missing.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("cannot open the disk image") && err.contains("missing.img"),
        "{err}"
    );
    let (code, err) = run(&["disk", "serve", "/", "--socket", socket.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (code, err) = run(&[
        "disk",
        "serve",
        image.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
        "--sub-channels",
        "64",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("64"), "{err}");
    let with = |flags: &[&str]| {
        let mut args = vec!["disk", "serve", image.to_str().unwrap()];
        args.extend(["--socket", socket.to_str().unwrap()]);
        args.extend(flags);
        run(&args)
    };
    let (code, err) = with(&["--io-threads", "65"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("65"), "{err}");
    // An io_uring replaces the I/O threads: both at once is refused, as is a depth
    // past the ring's bound.
    let (code, err) = with(&["--io-uring", "8", "--io-threads", "2"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, err) = with(&["--io-uring", "5000"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("5000"), "{err}");
    let (code, err) = run(&["disk", "bench", "--io-uring", "8", "--io-threads", "1"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = run(&["disk", "bench", "--case", "8k-random"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("4k-randread"), "{err}");
    let (code, _) = run(&["disk", "bench", "--depth", "7"]);
    assert_eq!(code, Some(2));
    // A mistyped --dir is refused, not made (and left behind).
    let nowhere = dir.join("no-such-dir");
    let (code, err) = run(&[
        "disk",
        "bench",
        "--smoke",
        "--dir",
        nowhere.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("no-such-dir") && err.contains("not a directory"),
        "{err}"
    );
    assert!(!nowhere.exists());
    let (code, err) = run(&["disk", "bench", "--smoke", "--dir", image.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a directory"), "{err}");
    // A second server on the same socket fails at once and leaves the first serving.
    let first = serve(&image, &socket, &["--io-threads", "2"]);
    let (code, err) = run(&[
        "disk",
        "serve",
        image.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("listening"), "{err}");
    // The first one serves, a whole-image write and read going through its workers.
    let mut disk = client(&socket);
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    disk.write(0, &data).unwrap();
    let mut back = vec![0u8; 1 << 20];
    disk.read(0, &mut back).unwrap();
    assert!(back == data, "the workers moved the data wrong");
    drop(disk);
    stop(first);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_benchmark_smoke_runs_every_case_and_checks_reads() {
    let out = vmlink()
        .args(["disk", "bench", "--smoke", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["qemu_nbd"].as_str().unwrap().contains("qemu-nbd"),
        "{report}"
    );
    assert_eq!(report["host_refused"], 0);
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        for key in [
            "vmlink_iops",
            "two_channels_iops",
            "nbd_iops",
            "qemu_img_iops",
            "floor_iops",
        ] {
            assert!(case[key].as_f64().unwrap() > 0.0, "{key} in {case}");
        }
        assert!(case["doorbells_per_request"].as_f64().unwrap() >= 0.0);
        // The floor's io_uring variant runs wherever requests are queued.
        let uring = &case["floor_io_uring_iops"];
        match case["depth"].as_u64().unwrap() {
            1 => assert!(uring.is_null(), "{case}"),
            _ => assert!(uring.as_f64().unwrap() > 0.0, "{case}"),
        }
        let read = case["case"].as_str().unwrap().contains("read");
        assert_eq!(case["checked"].as_u64().unwrap() > 0, read, "{case}");
    }
    // vmlink's host through an io_uring instead of positional I/O, every case.
    let out = vmlink()
        .args(["disk", "bench", "--smoke", "--json", "--system", "vmlink"])
        .args(["--io-uring", "8"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["io_uring"].as_u64(), report["io_threads"].as_u64()),
        (Some(8), Some(0))
    );
    assert_eq!(report["host_refused"], 0);
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        assert!(case["vmlink_iops"].as_f64().unwrap() > 0.0, "{case}");
        let read = case["case"].as_str().unwrap().contains("read");
        assert_eq!(case["checked"].as_u64().unwrap() > 0, read, "{case}");
    }
}
