//! Cross-process proof: a ring in a sealed memfd carries packets from one process to another,
//! each process mapping the memory at its own address.
//!
//! The ring keeps no pointers in shared memory, only indices relative to the data area, so
//! it must work when the two sides see the same pages at different virtual addresses. Here
//! the test process (the parent, test `parent_reads_from_child_process`) creates a memfd
//! with `MFD_ALLOW_SEALING`, sizes it to one ring (4096-byte control page and a 16 KiB data
//! area), seals it against shrinking and growing (docs/ARCHITECTURE.md, "Rules for memory
//! the peer can write", rule 6), maps it `MAP_SHARED`, initialises the control page and attaches a
//! [`Reader`]. It then runs this same test binary again as a child process, which runs only
//! `child_writer`: the child finds the inherited fd in `VMLINK_RING_CHILD_FD`, checks the
//! seals and size, maps the fd itself (a separate `mmap` in another address space; if it
//! happens to land at the parent's address it maps again, so the addresses always differ),
//! attaches a [`Writer`] and writes `PACKETS` packets with payloads of 0 to 2000 bytes and
//! a byte pattern derived from the packet number. The parent checks every packet's
//! descriptor (in-band, no flags, transaction id = packet number, so none lost, repeated or
//! reordered), every payload byte and every padding byte (zero up to the next multiple of
//! 8), that the two mappings are at different addresses, and that the child exits
//! successfully. A watchdog kills the child and fails the test if the run does not finish
//! within 60 seconds.
//!
//! This crate has no doorbell that crosses processes (eventfds belong to the transports),
//! so both sides poll: the writer spins on [`Writer::free_space`] when the ring is full and
//! the reader on an empty ring, each with `spin_loop` and then `yield_now`. The signals
//! that commits return are ignored, since nobody sleeps.
//!
//! Without `VMLINK_RING_CHILD_FD`, `child_writer` returns at once: that is its role in a
//! normal run. The parent's role always runs.

// Not under Miri: the test needs FFI (memfd_create, fcntl, mmap) and spawns a process,
// none of which Miri can run. Linux only: memfd and its seals are Linux interfaces.
#![cfg(all(target_os = "linux", not(miri)))]

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::ptr::{self, NonNull};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use vmlink_ring::protocol::{CONTROL_PAGE_SIZE, PacketType, TRAILER_SIZE, packet_len};
use vmlink_ring::{OutgoingPacket, PacketInfo, PacketMeta, Payload, Reader, SliceMem, Writer};

/// The ring's data area: four pages.
const DATA_LEN: usize = 16 * 1024;

/// The memfd holds exactly one ring: control page, then data area.
const REGION_LEN: usize = CONTROL_PAGE_SIZE + DATA_LEN;

/// Packets the child writes.
const PACKETS: u64 = 200_000;

/// The largest payload.
const MAX_PAYLOAD: usize = 2000;

/// Seed of the packet contents.
const SEED: u64 = 0x766d_6c69_6e6b_0c70;

/// The parent kills the child and fails if the run has not finished by then.
const WATCHDOG: Duration = Duration::from_secs(60);

/// The child gives up on its own a little later, in case the parent died without killing it.
const CHILD_DEADLINE: Duration = Duration::from_secs(90);

/// Spins before an idle side starts yielding its core.
const SPINS: u32 = 64;

/// The inherited memfd's number, for the child.
const CHILD_FD_ENV: &str = "VMLINK_RING_CHILD_FD";

/// The parent's mapping address, so the child can make sure its own differs.
const PARENT_ADDR_ENV: &str = "VMLINK_RING_PARENT_ADDR";

/// The name of the test that is the child's role.
const CHILD_TEST: &str = "child_writer";

/// What the child prints, followed by its mapping address in hex.
const CHILD_ADDR_PREFIX: &str = "child mapping at ";

/// splitmix64's finaliser: unrelated outputs for nearby inputs.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Packet `n`'s payload length: 0 and 2000 regularly, anything in between otherwise.
fn payload_len_of(n: u64) -> usize {
    match n % 1000 {
        0 => 0,
        1 => MAX_PAYLOAD,
        _ => (mix(n ^ SEED) % (MAX_PAYLOAD as u64 + 1)) as usize,
    }
}

/// Packet `n`'s payload bytes (as many as `buf` holds), different for every packet.
fn fill_payload(n: u64, buf: &mut [u8]) {
    let seed = mix(n.wrapping_add(SEED));
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = seed ^ (i as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
}

/// Waits a little: a few spins, then yields the core (two cores are shared here).
fn backoff(idle: &mut u32) {
    if *idle < SPINS {
        std::hint::spin_loop();
    } else {
        thread::yield_now();
    }
    *idle = idle.saturating_add(1);
}

/// A shared mapping of a whole memfd, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `file` read-write and shared, wherever the kernel chooses.
    fn new(file: &File, len: usize) -> io::Result<Self> {
        // SAFETY: with a null hint and no MAP_FIXED the kernel picks an unused range, so the
        // call replaces no existing mapping; the fd is open for the duration of the call.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(addr.cast::<u8>()).expect("mmap without a hint returned null");
        Ok(Self { ptr, len })
    }

    fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// The ring in the mapping, borrowing the mapping so it cannot be unmapped under it.
    fn ring(&self) -> SliceMem<'_> {
        // SAFETY: the range is one live mapping of `len` bytes, readable and writable, and it
        // stays mapped while the returned value borrows `self` (only `drop` unmaps it). This
        // process touches it only through the ring (atomics); the other process may write
        // it at any time, which `SliceMem` allows. The memfd is sealed against shrinking
        // (the parent seals it before mapping; the child checks the seal before mapping),
        // so no access can fault with SIGBUS.
        unsafe { vmlink_ring_mapping::slice_mem(self.ptr, self.len) }
            .expect("a page-aligned ring region")
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is exactly the mapping `new` made, and every `SliceMem`
        // built over it borrowed `self` and is gone, so nothing uses the range afterwards.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            eprintln!("munmap failed: {}", io::Error::last_os_error());
        }
    }
}

/// Creates the ring's memfd: sized to `REGION_LEN`, sealed against shrinking and growing,
/// and inheritable (no `MFD_CLOEXEC`) so the child gets it at the same number.
fn create_sealed_memfd() -> io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"vmlink-ring-cross-process".as_ptr(),
            libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned open by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(REGION_LEN as u64)?; // ftruncate
    // SAFETY: F_ADD_SEALS takes an int argument and touches no memory of ours.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// The seals on `file`.
fn seals(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory of ours.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(seals)
}

/// The child process, its output collected by two threads. Dropping it kills the child if it
/// is still running and prints what it wrote, so a failing parent shows the child's side.
struct ChildProcess {
    child: Child,
    exited: bool,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

/// Reads a pipe to its end on a thread, so a chatty child never blocks on a full pipe.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut out = Vec::new();
        let _ = pipe.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

impl ChildProcess {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child process");
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        Self {
            child,
            exited: false,
            stdout,
            stderr,
        }
    }

    /// Has the child exited? Reaps it if so.
    fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().expect("poll the child");
        self.exited |= status.is_some();
        status
    }

    /// Waits for the child until `deadline`; past it, fails (and `drop` kills the child).
    fn wait_until(&mut self, deadline: Instant) -> ExitStatus {
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "watchdog: the child did not exit within {WATCHDOG:?}"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// The child's stdout and stderr; call only once it has exited.
    fn output(&mut self) -> (String, String) {
        let join = |h: Option<JoinHandle<String>>| h.map(|h| h.join().unwrap()).unwrap_or_default();
        (join(self.stdout.take()), join(self.stderr.take()))
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            eprintln!("killed the child process");
        }
        let (stdout, stderr) = self.output();
        if !stdout.is_empty() || !stderr.is_empty() {
            eprintln!("--- child stdout ---\n{stdout}--- child stderr ---\n{stderr}");
        }
    }
}

/// Checks packet `n` as read: descriptor, payload bytes and zero padding.
fn check_packet(n: u64, info: &PacketInfo, buf: &[u8], expected: &mut [u8]) {
    let len = payload_len_of(n);
    assert_eq!(
        info.transaction_id(),
        n,
        "packet {n}: wrong transaction id (lost, repeated or reordered)"
    );
    assert_eq!(info.packet_type(), PacketType::InBand, "packet {n}: type");
    assert_eq!(info.flags(), 0, "packet {n}: flags");
    assert_eq!(info.header_len(), 0, "packet {n}: header length");
    assert_eq!(
        info.payload_len(),
        len.next_multiple_of(8),
        "packet {n}: padded payload length"
    );
    fill_payload(n, &mut expected[..len]);
    if buf[..len] != expected[..len] {
        let i = (0..len).find(|&i| buf[i] != expected[i]).unwrap();
        panic!(
            "packet {n} (length {len}): payload byte {i} is {:#04x}, expected {:#04x}",
            buf[i], expected[i]
        );
    }
    if let Some(i) = buf[len..info.payload_len()].iter().position(|&b| b != 0) {
        panic!(
            "packet {n} (length {len}): padding byte {} is {:#04x}, expected 0",
            len + i,
            buf[len + i]
        );
    }
}

#[test]
fn parent_reads_from_child_process() {
    let start = Instant::now();
    let deadline = start + WATCHDOG;

    let file = create_sealed_memfd().expect("create the sealed memfd");
    // The seals hold: nobody can change the size any more.
    assert!(file.set_len(REGION_LEN as u64 / 2).is_err(), "shrink seal");
    assert!(file.set_len(REGION_LEN as u64 * 2).is_err(), "grow seal");
    let mapping = Mapping::new(&file, REGION_LEN).expect("map the memfd");
    let ring = mapping.ring();
    vmlink_ring::init_control(&ring);
    let mut reader = Reader::new(ring).expect("attach the reader");

    let mut command = Command::new(std::env::current_exe().expect("current test binary"));
    command
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_FD_ENV, file.as_raw_fd().to_string())
        .env(PARENT_ADDR_ENV, format!("{:#x}", mapping.addr()));
    let mut child = ChildProcess::spawn(command);

    let mut buf = vec![0u8; MAX_PAYLOAD.next_multiple_of(8)];
    let mut expected = vec![0u8; MAX_PAYLOAD];
    let mut bytes = 0u64;
    let mut n = 0;
    let mut idle = 0;
    while n < PACKETS {
        match reader.read_into(&mut buf).expect("the ring stays valid") {
            Some((info, _signal)) => {
                check_packet(n, &info, &buf, &mut expected);
                bytes += info.payload_len() as u64;
                n += 1;
                idle = 0;
                if n % 4096 == 0 {
                    assert!(
                        Instant::now() < deadline,
                        "watchdog: {n} of {PACKETS} packets after {WATCHDOG:?}"
                    );
                }
            }
            None => {
                backoff(&mut idle);
                if idle % 1024 == 0 {
                    assert!(
                        Instant::now() < deadline,
                        "watchdog: {n} of {PACKETS} packets after {WATCHDOG:?}"
                    );
                    // A child that has exited and left the ring empty will send no more.
                    if let Some(status) = child.try_wait() {
                        let queued = reader.available().expect("the ring stays valid");
                        assert!(
                            queued > 0,
                            "the child exited ({status}) after {n} of {PACKETS} packets"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(
        reader.available().expect("the ring stays valid"),
        0,
        "data after the last packet"
    );

    let status = child.wait_until(deadline);
    let (stdout, stderr) = child.output();
    assert!(
        status.success(),
        "child failed: {status}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}"
    );
    let child_addr = stdout
        .lines()
        .find_map(|line| line.split_once(CHILD_ADDR_PREFIX).map(|(_, hex)| hex))
        .and_then(|hex| usize::from_str_radix(hex.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("the child did not report its mapping address:\n{stdout}"));
    assert_ne!(
        child_addr,
        mapping.addr(),
        "both sides mapped the ring at one address"
    );

    let took = start.elapsed();
    eprintln!(
        "{PACKETS} packets, {bytes} payload bytes from another process in {took:.2?} \
         ({:.0} MB/s); parent mapping {:#x}, child mapping {child_addr:#x}",
        bytes as f64 / took.as_secs_f64() / 1e6,
        mapping.addr()
    );
}

/// The child's role; returns at once unless the parent started this process for it.
#[test]
fn child_writer() {
    let Some(fd) = std::env::var_os(CHILD_FD_ENV) else {
        return; // Not the spawned child: the parent test drives this role.
    };
    let start = Instant::now();
    let fd: libc::c_int = fd
        .to_str()
        .and_then(|s| s.parse().ok())
        .expect("an fd number");
    let parent_addr = std::env::var(PARENT_ADDR_ENV)
        .ok()
        .and_then(|s| usize::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .expect("the parent's mapping address");

    // SAFETY: the parent left the memfd open and inheritable at this number for us, and
    // nothing else in this process owns it: the harness runs only this test, on one thread.
    let file = unsafe { File::from_raw_fd(fd) };
    // Rule 6: map only memory the peer cannot shrink under us.
    let seals = seals(&file).expect("read the memfd's seals");
    assert_ne!(
        seals & libc::F_SEAL_SHRINK,
        0,
        "the memfd is not sealed against shrinking"
    );
    let len = file.metadata().expect("stat the memfd").len();
    assert_eq!(len, REGION_LEN as u64, "memfd size");

    let mut mapping = Mapping::new(&file, REGION_LEN).expect("map the memfd");
    if mapping.addr() == parent_addr {
        // Same address by chance (no ASLR): map again while the first is still in place,
        // so the second mapping lands elsewhere, then drop the first.
        mapping = Mapping::new(&file, REGION_LEN).expect("map the memfd again");
    }
    assert_ne!(mapping.addr(), parent_addr);
    println!("{CHILD_ADDR_PREFIX}{:#x}", mapping.addr());

    let mut writer = Writer::new(mapping.ring()).expect("attach the writer");
    let mut payload = vec![0u8; MAX_PAYLOAD];
    for n in 0..PACKETS {
        let len = payload_len_of(n);
        fill_payload(n, &mut payload[..len]);
        // A write needs free space strictly greater than the packet and its trailer.
        let needed = packet_len(0, len).unwrap() + TRAILER_SIZE;
        let mut idle = 0;
        while writer.free_space().expect("the ring stays valid") <= needed {
            backoff(&mut idle);
            if idle % 1024 == 0 {
                assert!(
                    start.elapsed() < CHILD_DEADLINE,
                    "child: no space for packet {n} after {CHILD_DEADLINE:?}"
                );
            }
        }
        let meta = PacketMeta {
            packet_type: PacketType::InBand,
            flags: 0,
            transaction_id: n,
        };
        let _signal = writer
            .write(&OutgoingPacket {
                meta,
                header: &[],
                payload: Payload::Bytes(&payload[..len]),
            })
            .expect("write a packet into free space");
    }
    println!("child wrote {PACKETS} packets in {:.2?}", start.elapsed());
}
