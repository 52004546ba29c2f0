//! What vmlink-disk wrote, read back through qemu-nbd serving the same image, and what
//! qemu-nbd wrote read back through vmlink-disk: the two agree on every byte. Needs
//! qemu-nbd (Debian: qemu-utils; the test command installs it); a missing binary fails.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;

use vmlink_channel::Wait;
use vmlink_disk::{Disk, DiskClient, DiskOptions, config, serve, service};
use vmlink_nbd::{QemuNbd, QemuNbdOptions};
use vmlink_shm::Guest;

#[test]
fn vmlink_and_qemu_nbd_read_back_what_the_other_wrote() {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("vmlink-disk-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();

    // vmlink writes a pattern: 1 MiB pieces through the bounce buffer and queued 4 KiB
    // writes, 32 in flight, scattered over the disk.
    let (a, b) = UnixStream::pair().unwrap();
    let host_image = image.clone();
    let host = thread::spawn(move || {
        let disk = Disk::open(&host_image, DiskOptions::default()).unwrap();
        let endpoint = service("disk").serve_stream(a).unwrap();
        serve(&disk, endpoint.channel(), endpoint.buffer()).unwrap()
    });
    let (channel, memory) = Guest::new("disk")
        .with_config(config())
        .connect_stream(b)
        .unwrap()
        .into_parts();
    let mut disk = DiskClient::new(channel, memory.buffer()).unwrap();
    let mut model = vec![0u8; 16 << 20];
    for (i, b) in model[..4 << 20].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    disk.write(0, &model[..4 << 20]).unwrap();
    let slots = disk.buffers().start;
    for round in 0..4u64 {
        for i in 0..32u64 {
            let block = 1024 + (i * 97 + round * 31) % 3000;
            let at = slots + i as usize * 4096;
            let fill = [(round * 32 + i) as u8 ^ 0x5a; 4096];
            disk.area().write(at, &fill).unwrap();
            disk.submit_write(block * 8, at..at + 4096, false, Wait::Forever)
                .unwrap();
            model[block as usize * 4096..][..4096].copy_from_slice(&fill);
        }
        for _ in 0..32 {
            disk.reap(Wait::Forever).unwrap().result().unwrap();
        }
    }
    disk.flush().unwrap();

    // qemu-nbd reads every byte of it back.
    let server = QemuNbd::start(&image, "disk", &QemuNbdOptions::default())
        .expect("qemu-nbd (Debian: qemu-utils) must be installed");
    let mut nbd = server.connect().unwrap();
    assert_eq!(nbd.size(), 16 << 20);
    let mut back = vec![0u8; 16 << 20];
    nbd.read_at(0, &mut back).unwrap();
    assert!(
        back == model,
        "qemu-nbd read back something else than vmlink wrote"
    );

    // qemu-nbd writes; vmlink reads it back while qemu-nbd still serves the image.
    let theirs: Vec<u8> = (0..(2 << 20))
        .map(|i| (i as u32).wrapping_mul(40503) as u8)
        .collect();
    nbd.write_at(8 << 20, &theirs).unwrap();
    nbd.flush().unwrap();
    model[8 << 20..10 << 20].copy_from_slice(&theirs);
    let mut mine = vec![0u8; 16 << 20];
    disk.read(0, &mut mine).unwrap();
    assert!(
        mine == model,
        "vmlink read back something else than qemu-nbd wrote"
    );
    nbd.disconnect().unwrap();
    drop(server);
    drop(disk);
    let stats = host.join().unwrap();
    assert_eq!(stats.refused, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
