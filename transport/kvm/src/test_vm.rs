//! The bare-metal test guest's VM setup, shared by the real-KVM tests and the `kvm_demo`
//! example (feature `test-utils`; not part of the transport's API).
//!
//! Probes KVM, builds `transport/kvm/guest` with a nested cargo, loads its ELF, and sets
//! up one vCPU in identity-mapped long mode at CPL3 (see docs/ARCHITECTURE.md, "Guest memory under KVM").
#![allow(unsafe_code)]

pub mod moving;
pub mod stream;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::packet::parse_gpa_header;
use vmlink_channel::{ChannelError, Config, Doorbell, PacketType};
use vmlink_ring::WaitDecision;

use crate::{HostChannel, KvmDoorbell, RingPages, host_channel, read_gpa_range};

use kvm_bindings::{KVM_IRQCHIP_PIC_MASTER, kvm_irqchip, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::NewBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmlink_channel::Polled;
use vmlink_channel::Wait;

/// Guest RAM size (one region at GPA 0).
pub const MEM_SIZE: usize = 4 << 20;
/// The guest's MMIO doorbell (an ioeventfd).
pub const DOORBELL: u64 = 0x3000_0000;
/// The guest's MMIO control register (exits to userspace).
pub const CONTROL: u64 = 0x3000_1000;
/// Where the guest publishes its ring page list.
pub const MAILBOX: u64 = 0x20_0000;
/// The word the host sets before boot to pick the guest's mode (0: traffic; 1..=6 hostile).
pub const MODE: u64 = MAILBOX + 0x800;
/// The word the host sets to let a hostile guest finish.
pub const ACK: u64 = MAILBOX + 0x808;
/// The word the host sets to end the guest's heartbeat phase.
pub const IC_STOP: u64 = MAILBOX + 0x810;
/// Where the guest leaves the heartbeat-phase messages it answered.
pub const IC_ANSWERED: u64 = MAILBOX + 0x818;
/// Where the guest leaves the heartbeat-phase messages it refused (answered with
/// `HV_E_FAIL`, or ignored).
pub const IC_REFUSED: u64 = MAILBOX + 0x820;
/// The traffic mode's packet count, when the host writes one (0: [`PACKETS`]); the guest
/// reads it as it goes, so a migration test streams with [`STREAMING`] and settles it
/// after its last migration.
pub const LIMIT: u64 = MAILBOX + 0x830;
/// A packet count the traffic never reaches before the host settles it.
pub const STREAMING: u32 = 0x7fff_fff8;
/// Good packets a hostile guest sends before corrupting its ring.
pub const HOSTILE_GOOD: u32 = 4;
/// The mailbox's first word.
pub const MAILBOX_MAGIC: u64 = 0x766d_6c69_6e6b_2121;
/// Control value: the guest is done.
pub const DONE: u64 = 0xD0E;
/// Control value: the guest panicked.
pub const PANIC: u64 = 0xBAD;
/// Data packets each way in the traffic mode.
pub const PACKETS: u32 = 50_000;
/// The GPA-direct range's offset into its first page.
pub const GPA_OFFSET: usize = 100;
/// The GPA-direct range's length.
pub const GPA_LEN: usize = 3 * 4096 - 200;
/// Message kind: data.
pub const KIND_DATA: u32 = 1;
/// Message kind: end of the host's data.
pub const KIND_END: u32 = 2;
/// Message kind: the guest's summary.
pub const KIND_SUMMARY: u64 = 3;
/// Message kind: a completion.
pub const KIND_COMPLETION: u32 = 4;
/// The GSI of the host→guest irqfd.
pub const GSI: u32 = 5;

/// Byte `i` of data packet `seq` (the GPA-direct range uses `seq = 0xFFFF`).
pub fn pattern(seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(7) as usize).wrapping_add(i.wrapping_mul(13)) as u8
}

/// Opens KVM and makes a VM, or says why it cannot.
pub fn probe() -> Result<(Kvm, VmFd), String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    if kvm.get_api_version() != 12 {
        return Err(format!("KVM API version {}", kvm.get_api_version()));
    }
    for (cap, name) in [
        (Cap::UserMemory, "user memory"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Irqchip, "irqchip"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(format!("KVM lacks {name}"));
        }
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("cannot create a VM: {e}"))?;
    Ok((kvm, vm))
}

/// Probes KVM; `None` (after printing `SKIPPED: <reason>`) when a test should skip, a
/// panic instead when `VMLINK_REQUIRE_KVM=1`.
pub fn kvm_or_skip() -> Option<(Kvm, VmFd)> {
    match probe() {
        Ok(k) => Some(k),
        Err(reason) => {
            if std::env::var("VMLINK_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("KVM is required (VMLINK_REQUIRE_KVM=1) but unusable: {reason}");
            }
            println!("SKIPPED: {reason}");
            None
        }
    }
}

/// Builds the test guest with a nested cargo, isolated from this build's flags; returns
/// the ELF's path.
pub fn build_guest() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guest = manifest.join("guest");
    let target_dir = manifest.join("../../target/kvm-guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let flags = format!(
        "-Crelocation-model=static\x1f-Clink-arg=-T{}",
        guest.join("link.ld").display()
    );
    let status = Command::new(cargo)
        .current_dir(&guest)
        .args(["build", "--release", "--target", "x86_64-unknown-none"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .status()
        .expect("run cargo for the guest");
    assert!(status.success(), "building the test guest failed");
    target_dir.join("x86_64-unknown-none/release/vmlink-kvm-test-guest")
}

/// Loads an ELF64's PT_LOAD segments into guest memory; returns the entry point.
pub fn load_elf<M: GuestMemory>(mem: &M, image: &[u8]) -> u64 {
    let u16_at = |at: usize| u16::from_le_bytes(image[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(image[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
    assert_eq!(&image[..4], b"\x7fELF", "not an ELF");
    assert_eq!(image[4], 2, "not ELF64");
    let entry = u64_at(0x18);
    let phoff = u64_at(0x20) as usize;
    let phentsize = u16_at(0x36) as usize;
    for i in 0..u16_at(0x38) as usize {
        let ph = phoff + i * phentsize;
        if u32_at(ph) != 1 {
            continue;
        }
        let (offset, paddr) = (u64_at(ph + 8) as usize, u64_at(ph + 24));
        let (filesz, memsz) = (u64_at(ph + 32) as usize, u64_at(ph + 40) as usize);
        mem.write_slice(&image[offset..offset + filesz], GuestAddress(paddr))
            .expect("segment inside guest memory");
        let zeros = vec![0u8; memsz - filesz];
        mem.write_slice(&zeros, GuestAddress(paddr + filesz as u64))
            .expect("bss inside guest memory");
    }
    entry
}

/// Identity-mapped long mode, CPL3 (see KVM-NOTES).
fn setup_vcpu<M: GuestMemory>(vcpu: &VcpuFd, mem: &M, entry: u64) {
    // PML4 @0x1000 -> PDPT @0x2000 -> PD @0x3000 with 2 MiB pages covering 1 GiB; the U
    // bit at every level so CPL3 reaches everything (the MMIO doorbells included).
    mem.write_obj(0x2000u64 | 0x7, GuestAddress(0x1000))
        .unwrap();
    mem.write_obj(0x3000u64 | 0x7, GuestAddress(0x2000))
        .unwrap();
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x87, GuestAddress(0x3000 + i * 8))
            .unwrap();
    }
    let mut sregs = vcpu.get_sregs().unwrap();
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x33,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x2b,
        type_: 3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    (sregs.ss, sregs.ds, sregs.es, sregs.fs, sregs.gs) = (data, data, data, data, data);
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = 0x1000;
    sregs.cr4 = 0x620;
    sregs.efer = 0x501;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: entry,
        rsp: MEM_SIZE as u64 - 0x1000 - 8,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
}

/// A VM with the test guest loaded and one vCPU ready at its entry.
///
/// The fields are private so the VM (and its vCPU) are dropped before the guest memory
/// they map.
#[derive(Debug)]
pub struct TestVm<B: NewBitmap = ()> {
    vcpu: VcpuFd,
    vm: VmFd,
    mem: GuestMemoryMmap<B>,
    _kvm: Kvm,
}

impl TestVm {
    /// Makes the VM from a probed `(kvm, vm)`: an in-kernel irqchip, `MEM_SIZE` of RAM at
    /// GPA 0, the guest `elf` loaded, `mode` written at [`MODE`], one vCPU set up.
    pub fn new(kvm: Kvm, vm: VmFd, elf: &[u8], mode: u64) -> Self {
        Self::with_bitmap(kvm, vm, elf, mode)
    }
}

impl<B: NewBitmap> TestVm<B> {
    /// [`TestVm::new`] with guest memory that tracks the host's writes in a bitmap `B`
    /// (vm-memory's `AtomicBitmap`, for migration).
    pub fn with_bitmap(kvm: Kvm, vm: VmFd, elf: &[u8], mode: u64) -> Self {
        Self::with_memory(kvm, vm, elf, mode, MEM_SIZE)
    }

    /// [`with_bitmap`](Self::with_bitmap) with `size` bytes of RAM (at least `MEM_SIZE`,
    /// whole pages; the guest uses its first `MEM_SIZE`, the rest is there to be moved).
    pub fn with_memory(kvm: Kvm, vm: VmFd, elf: &[u8], mode: u64, size: usize) -> Self {
        assert!(
            size >= MEM_SIZE && size.is_multiple_of(4096),
            "guest memory size {size}"
        );
        vm.create_irq_chip().expect("in-kernel irqchip");
        let mem = GuestMemoryMmap::<B>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `size` bytes owned by `mem`, which the
        // returned `TestVm` owns and drops after the VM and its vCPU (field order), so the
        // guest never runs on unmapped memory.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        let entry = load_elf(&mem, elf);
        mem.write_obj(mode, GuestAddress(MODE)).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        setup_vcpu(&vcpu, &mem, entry);
        Self {
            vcpu,
            vm,
            mem,
            _kvm: kvm,
        }
    }

    /// The guest's memory.
    pub fn mem(&self) -> &GuestMemoryMmap<B> {
        &self.mem
    }

    /// The VM.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Makes the traffic mode stream until the host settles its count ([`STREAMING`] at
    /// [`LIMIT`]): for runs whose migrations must all happen mid-stream, however fast the
    /// guest runs meanwhile.
    pub fn stream_until_told(&self) {
        self.mem
            .write_obj(STREAMING, GuestAddress(LIMIT))
            .expect("the limit word inside guest memory");
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self._kvm
    }

    /// The vCPU (to run it), the VM and the memory at once.
    pub fn split(&mut self) -> (&mut VcpuFd, &VmFd, &GuestMemoryMmap<B>) {
        (&mut self.vcpu, &self.vm, &self.mem)
    }
}

/// Kills the process if the returned sender is not used (or dropped) within `limit`: a
/// vCPU stuck in `KVM_RUN` cannot be joined.
pub fn watchdog(limit: Duration) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: the KVM guest did not finish in {limit:?}");
            std::process::exit(101);
        }
    });
    tx
}

/// The master PIC's interrupt request register (the irqfd's GSI shows up there).
pub fn pic_irr(vm: &VmFd) -> u8 {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: for the PIC chip ids the kernel fills the union's `pic` member.
    unsafe { chip.chip.pic.irr }
}

/// What the host saw in the traffic mode.
#[derive(Debug, Default)]
pub struct HostStats {
    /// The packets each side sends (the traffic's count as the host settled it).
    pub limit: u32,
    /// Guest data packets the host checked.
    pub data_ok: u64,
    /// Guest requests the host completed.
    pub requests_completed: u64,
    /// Data packets the host sent.
    pub sent: u64,
    /// The GPA-direct packet was read from guest memory and checked.
    pub gpa_ok: bool,
    /// The guest's summary: [kind, sent, requests, completions ok, host packets ok, end seen, errors, first error, doorbells rung, packets sent, packets received, gpa sent].
    pub summary: Vec<u64>,
    /// The irqfd raised the GSI in the PIC.
    pub irq_raised: bool,
    /// Host waits the ioeventfd ended.
    pub eventfd_wakes: u64,
    /// irqfd signals the host sent.
    pub irqfd_signals: u64,
    /// Doorbells the host channel counted.
    pub rx_signals: u64,
    /// Bytes the host's packets took in the host→guest ring (descriptors included).
    pub ring_bytes_sent: u64,
    /// Bytes the guest's packets took in the guest→host ring (descriptors included).
    pub ring_bytes_received: u64,
}

/// The guest's ring pages as its mailbox lists them: the guest→host ring's page count and
/// the page list.
fn mailbox_pages<M: GuestMemory>(mem: &M) -> (usize, Vec<u64>) {
    let magic: u64 = mem.read_obj(GuestAddress(MAILBOX)).unwrap();
    assert_eq!(magic, MAILBOX_MAGIC);
    let g2h: u64 = mem.read_obj(GuestAddress(MAILBOX + 8)).unwrap();
    let total: u64 = mem.read_obj(GuestAddress(MAILBOX + 16)).unwrap();
    let pages = (0..total.min(64))
        .map(|i| mem.read_obj(GuestAddress(MAILBOX + 24 + 8 * i)).unwrap())
        .collect();
    (g2h as usize, pages)
}

/// The host's side of the traffic, on its own thread; `ready` gives the mailbox address once
/// the guest published its page list.
pub fn host_side(
    mem: &GuestMemoryMmap,
    vm: &VmFd,
    bell: &KvmDoorbell,
    ready: mpsc::Receiver<u64>,
) -> HostStats {
    host_side_with(mem, &|| pic_irr(vm), bell, ready, None)
}

/// [`host_side`], reading the PIC's request register with `irr` (the VM the guest runs in
/// now, which may change), and counting the guest's data packets it checked into
/// `checked`.
pub fn host_side_with(
    mem: &GuestMemoryMmap,
    irr: &(dyn Fn() -> u8 + Sync),
    bell: &KvmDoorbell,
    ready: mpsc::Receiver<u64>,
    checked: Option<&std::sync::atomic::AtomicU64>,
) -> HostStats {
    let mailbox = ready.recv().expect("the guest's mailbox");
    assert_eq!(mailbox, MAILBOX);
    let (g2h, pages) = mailbox_pages(mem);
    assert!(
        pages.windows(2).any(|w| w[1] != w[0] + 1),
        "the ring pages are scattered"
    );
    // SAFETY: `mem` is the `TestVm`'s anonymous mapping, which outlives this function
    // (the VM and its vCPU are dropped first); this host side touches the ring pages only
    // through the rings, and reads only the mailbox and GPA-direct pages through
    // vm-memory.
    let rings = unsafe { RingPages::new(mem, &pages, g2h) }.expect("valid page list");
    let channel = host_channel(&rings, bell, Config::default()).expect("host channel");

    let mut app = HostApp::new();
    let mut idle = 0u32;
    loop {
        let progress = app.step(&channel, mem, checked);
        if app.done() {
            break;
        }
        if progress {
            idle = 0;
        } else if idle < 2000 {
            // Poll a little before unmasking: each sleep costs the guest a doorbell.
            idle += 1;
            std::hint::spin_loop();
        } else {
            idle = 0;
            // Sleep until the guest rings (or a short timeout: its ring may have room by then).
            if channel.prepare_recv_wait().unwrap() == WaitDecision::Sleep {
                let _ = bell.wait(Some(Duration::from_millis(1)));
            }
        }
    }
    app.finish(&channel, bell, irr)
}

/// The host's own state in the traffic mode, apart from its channel: what the host has
/// sent, checked and still owes the guest. A migration carries it beside the channel's
/// saved state.
#[derive(Debug)]
pub struct HostApp {
    /// What the host saw so far.
    pub stats: HostStats,
    rng: u64,
    next_guest: u32,
    completions: std::collections::VecDeque<(u64, u32)>,
    end_sent: bool,
    pending_len: usize,
    /// The packets each side sends.
    limit: u32,
    /// The count was settled after a streaming run.
    settled: bool,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Default for HostApp {
    fn default() -> Self {
        Self::new()
    }
}

impl HostApp {
    /// The state before the first packet.
    pub fn new() -> Self {
        Self {
            stats: HostStats::default(),
            rng: 0x9e37_79b9_7f4a_7c15,
            next_guest: 0,
            completions: Default::default(),
            end_sent: false,
            pending_len: 0,
            limit: PACKETS,
            settled: false,
            buf: vec![0u8; 8192],
            out: vec![0u8; 2048],
        }
    }

    /// The state as bytes, for a migration stream (fields little-endian, in declaration
    /// order; read back by [`from_bytes`](Self::from_bytes)).
    pub fn to_bytes(&self) -> Vec<u8> {
        let st = &self.stats;
        let mut out = Vec::new();
        for w in [st.data_ok, st.requests_completed, st.sent] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.push(u8::from(st.gpa_ok));
        out.extend_from_slice(&(st.summary.len() as u32).to_le_bytes());
        for w in &st.summary {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.push(u8::from(st.irq_raised));
        for w in [
            self.rng,
            u64::from(self.next_guest),
            self.pending_len as u64,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.push(u8::from(self.end_sent));
        out.extend_from_slice(&self.limit.to_le_bytes());
        out.push(u8::from(self.settled));
        out.extend_from_slice(&(self.completions.len() as u32).to_le_bytes());
        for &(tid, seq) in &self.completions {
            out.extend_from_slice(&tid.to_le_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
        }
        out
    }

    /// The state from [`to_bytes`](Self::to_bytes)'s form; anything else is an error
    /// naming what did not parse.
    pub fn from_bytes(mut bytes: &[u8]) -> Result<Self, stream::StreamError> {
        use stream::{StreamError, take_bytes, take_u32, take_u64};
        let b = &mut bytes;
        let flag = |b: &mut &[u8], what| match take_bytes(b, 1, what)? {
            [0] => Ok(false),
            [1] => Ok(true),
            _ => Err(StreamError::Malformed(what)),
        };
        let mut app = Self::new();
        app.stats.data_ok = take_u64(b, "the host's packet count")?;
        app.stats.requests_completed = take_u64(b, "the host's completion count")?;
        app.stats.sent = take_u64(b, "the host's sent count")?;
        app.stats.gpa_ok = flag(b, "the host's GPA-direct flag")?;
        let n = take_u32(b, "the guest summary's length")? as usize;
        if n > 64 {
            return Err(StreamError::Malformed("a guest summary past 64 words"));
        }
        for _ in 0..n {
            app.stats.summary.push(take_u64(b, "the guest summary")?);
        }
        app.stats.irq_raised = flag(b, "the host's irqfd flag")?;
        app.rng = take_u64(b, "the host's generator")?;
        app.next_guest = u32::try_from(take_u64(b, "the next guest packet")?)
            .map_err(|_| StreamError::Malformed("the next guest packet"))?;
        let pending = take_u64(b, "the pending packet's length")?;
        if pending > app.out.len() as u64 {
            return Err(StreamError::Malformed(
                "a pending packet longer than the host's buffer",
            ));
        }
        app.pending_len = pending as usize;
        app.end_sent = flag(b, "the host's end flag")?;
        app.limit = take_u32(b, "the packet count")?;
        app.settled = flag(b, "the settled flag")?;
        let n = take_u32(b, "the completions owed")? as usize;
        if n > 4096 {
            return Err(StreamError::Malformed("more than 4096 completions owed"));
        }
        for _ in 0..n {
            let tid = take_u64(b, "a completion's transaction id")?;
            let seq = take_u32(b, "a completion's sequence number")?;
            app.completions.push_back((tid, seq));
        }
        if !b.is_empty() {
            return Err(StreamError::Malformed("bytes after the host's state"));
        }
        Ok(app)
    }

    /// Starts from the count the host wrote at [`LIMIT`] in `mem` (0: [`PACKETS`]).
    pub fn with_limit_of(mut self, mem: &impl GuestMemory) -> Self {
        let word: u32 = mem.read_obj(GuestAddress(LIMIT)).unwrap_or(0);
        self.limit = if word == 0 { PACKETS } else { word };
        self
    }

    /// Ends a streaming run: a count a little past what either side has sent (the guest
    /// is at most a ring ahead of what the host has checked) and past [`PACKETS`], a
    /// multiple of 8 so every eighth packet is a request, written at [`LIMIT`] for the
    /// guest. Once.
    pub fn settle(&mut self, mem: &impl GuestMemory) {
        if self.settled || self.limit != STREAMING {
            return;
        }
        // Never below `PACKETS`: the guest sends its GPA-direct packet half way there.
        let past = self
            .stats
            .sent
            .max(self.stats.data_ok)
            .max(u64::from(PACKETS))
            + 4096;
        let limit = u32::try_from(past.div_ceil(8) * 8).unwrap_or(STREAMING);
        self.limit = limit;
        self.settled = true;
        mem.write_obj(limit, GuestAddress(LIMIT))
            .expect("the limit word inside guest memory");
    }

    /// Whether the guest's summary arrived (the traffic is over).
    pub fn done(&self) -> bool {
        !self.stats.summary.is_empty()
    }

    /// One pass over `channel`: completions owed, then data (and the end marker), then
    /// everything the guest sent, checked in order (GPA-direct data read from `mem`); the
    /// guest's data packets checked so far go to `checked`. Returns whether anything
    /// moved.
    pub fn step<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        channel: &HostChannel<'_, &KvmDoorbell, B>,
        mem: &impl GuestMemory,
        checked: Option<&std::sync::atomic::AtomicU64>,
    ) -> bool {
        let Self {
            stats,
            rng,
            next_guest,
            completions,
            end_sent,
            pending_len,
            limit,
            buf,
            out,
            ..
        } = self;
        let mut progress = false;
        // Completions first, then data.
        while let Some(&(tid, seq)) = completions.front() {
            let mut c = [0u8; 12];
            c[0..4].copy_from_slice(&KIND_COMPLETION.to_le_bytes());
            c[4..8].copy_from_slice(&seq.to_le_bytes());
            c[8..12].copy_from_slice(&12u32.to_le_bytes());
            match channel.complete(tid, &c, Wait::Now) {
                Ok(()) => {
                    completions.pop_front();
                    stats.requests_completed += 1;
                    progress = true;
                }
                Err(ChannelError::Full) => break,
                Err(e) => panic!("completing: {e}"),
            }
        }
        while !*end_sent {
            // Streaming, the host keeps pace with the guest rather than running ahead, so
            // the count it settles on later is near both sides.
            if *limit == STREAMING && stats.sent >= stats.data_ok + 2048 {
                break;
            }
            let seq = stats.sent as u32;
            let len = if seq == *limit {
                out[0..4].copy_from_slice(&KIND_END.to_le_bytes());
                out[4..8].copy_from_slice(&seq.to_le_bytes());
                out[8..12].copy_from_slice(&12u32.to_le_bytes());
                12
            } else {
                if *pending_len == 0 {
                    *rng ^= *rng << 13;
                    *rng ^= *rng >> 7;
                    *rng ^= *rng << 17;
                    *pending_len = 12 + (*rng % 2000) as usize;
                }
                let len = *pending_len;
                out[0..4].copy_from_slice(&KIND_DATA.to_le_bytes());
                out[4..8].copy_from_slice(&seq.to_le_bytes());
                out[8..12].copy_from_slice(&(len as u32).to_le_bytes());
                for (i, b) in out[12..len].iter_mut().enumerate() {
                    *b = pattern(seq, i + 12);
                }
                len
            };
            match channel.send(&out[..len], Wait::Now) {
                Ok(()) => {
                    progress = true;
                    *pending_len = 0;
                    if seq == *limit {
                        *end_sent = true;
                    } else {
                        stats.sent += 1;
                    }
                }
                Err(ChannelError::Full) => break,
                Err(e) => panic!("sending: {e}"),
            }
        }
        // Receive.
        while let Some(r) = channel.recv(buf, Wait::Now).polled().expect("host receive") {
            progress = true;
            let p = r.payload(buf);
            if r.packet_type == PacketType::GpaDirect {
                let mut ranges = parse_gpa_header(r.header(buf), None).expect("GPA header");
                let range = ranges.next().expect("one range");
                assert_eq!(
                    (range.byte_offset as usize, range.byte_count as usize),
                    (GPA_OFFSET, GPA_LEN)
                );
                let mut bulk = vec![0u8; GPA_LEN];
                read_gpa_range(mem, &range, &mut bulk).expect("range inside guest RAM");
                assert!(
                    bulk.iter()
                        .enumerate()
                        .all(|(i, &b)| b == pattern(0xFFFF, i))
                );
                assert_eq!(&p[..10], b"gpa-direct");
                stats.gpa_ok = true;
                continue;
            }
            assert_eq!(r.packet_type, PacketType::InBand);
            let kind = u64::from_le_bytes(p[0..8].try_into().unwrap());
            if kind == KIND_SUMMARY {
                stats.summary = p
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                break;
            }
            let kind = u32::from_le_bytes(p[0..4].try_into().unwrap());
            let seq = u32::from_le_bytes(p[4..8].try_into().unwrap());
            let len = u32::from_le_bytes(p[8..12].try_into().unwrap()) as usize;
            assert_eq!(
                (kind, seq),
                (KIND_DATA, *next_guest),
                "guest packet in order"
            );
            assert!(
                len <= p.len()
                    && p[12..len]
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == pattern(seq, i + 12))
            );
            assert_eq!(r.completion_requested, seq % 8 == 7);
            if r.completion_requested {
                completions.push_back((r.transaction_id, seq));
            }
            *next_guest += 1;
            stats.data_ok += 1;
            if let Some(c) = checked {
                c.store(stats.data_ok, std::sync::atomic::Ordering::Relaxed);
            }
        }
        progress
    }

    /// The traffic's end: the channel's counters into the stats, and the irqfd checked
    /// from the host side (the guest runs with interrupts off, so the pulse stays latched in
    /// the PIC's request register, which `irr` reads).
    pub fn finish<B: vm_memory::bitmap::BitmapSlice>(
        mut self,
        channel: &HostChannel<'_, &KvmDoorbell, B>,
        bell: &KvmDoorbell,
        irr: &(dyn Fn() -> u8 + Sync),
    ) -> HostStats {
        self.stats.limit = self.limit;
        let stats = &mut self.stats;
        let c = channel.counters();
        stats.rx_signals = c.signals_received;
        stats.ring_bytes_sent = c.bytes_sent;
        stats.ring_bytes_received = c.bytes_received;
        // The irqfd, checked from the host side: the guest runs with interrupts off, so the
        // pulse stays latched in the PIC's request register.
        bell.signal().unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(2) {
            if irr() & (1 << GSI) != 0 {
                stats.irq_raised = true;
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        stats.eventfd_wakes = bell.wakes();
        stats.irqfd_signals = bell.signals_sent();
        self.stats
    }
}

impl HostStats {
    /// Why the traffic mode's checks fail on what the host saw, if they do: the guest's
    /// summary (no errors, every packet sent and checked, every request completed and
    /// checked, the end seen) and the host's own counts.
    pub fn traffic_problem(&self) -> Option<String> {
        let g = &self.summary;
        let all = u64::from(self.limit);
        let checks = [
            (g.len() == 12, "the guest's summary has 12 words"),
            (
                g.get(6) == Some(&0) && g.get(7) == Some(&0),
                "the guest found no errors",
            ),
            (g.get(1) == Some(&all), "the guest sent every packet"),
            (g.get(2) == Some(&(all / 8)), "the guest made every request"),
            (
                g.get(3) == g.get(2),
                "every request was completed, and checked by the guest",
            ),
            (
                g.get(4) == Some(&all),
                "the guest checked every host packet",
            ),
            (g.get(5) == Some(&1), "the guest saw the end marker"),
            (self.data_ok == all, "the host checked every guest packet"),
            (
                self.requests_completed == all / 8,
                "the host completed every request",
            ),
            (self.sent == all, "the host sent every packet"),
            (self.gpa_ok, "the GPA-direct packet was read and checked"),
            (self.irq_raised, "the irqfd raised the GSI"),
        ];
        checks
            .iter()
            .find(|(ok, _)| !ok)
            .map(|(_, what)| format!("not so: {what} (guest summary {g:?}, host {self:?})"))
    }
}

/// A traffic run: what the host saw, the vCPU's exits to userspace, the time the run took.
#[derive(Debug)]
pub struct Traffic {
    /// The host's view, with the guest's summary.
    pub stats: HostStats,
    /// Exits to userspace (`KVM_RUN` returns).
    pub exits: u64,
    /// From the first `KVM_RUN` to the guest's `DONE`.
    pub elapsed: Duration,
}

/// Runs the vCPU until the guest reports `DONE`, calling `on_mailbox` each time it reports
/// `MAILBOX`; returns the exits to userspace. Doorbell writes the ioeventfd did not catch
/// and MMIO reads (answered with zeros) are passed over; any other exit or report panics.
pub fn run_to_done(vcpu: &mut VcpuFd, mut on_mailbox: impl FnMut()) -> u64 {
    let mut exits = 0u64;
    loop {
        let exit = vcpu.run().expect("KVM_RUN");
        exits += 1;
        match exit {
            VcpuExit::MmioWrite(addr, data) if addr == CONTROL => {
                let mut v = [0u8; 8];
                v[..data.len()].copy_from_slice(data);
                match u64::from_le_bytes(v) {
                    DONE => return exits,
                    MAILBOX => on_mailbox(),
                    other => panic!("guest reported {other:#x}"),
                }
            }
            VcpuExit::MmioWrite(addr, _) if addr == DOORBELL => {}
            VcpuExit::MmioRead(_, data) => data.fill(0),
            other => panic!("unexpected exit {other:?} after {exits} exits"),
        }
    }
}

/// Runs the traffic mode (a `TestVm` made with mode 0) to the guest's `DONE`: the vCPU on
/// this thread, the host's channel on another.
pub fn run_traffic(tvm: &mut TestVm) -> Traffic {
    let (vcpu, vm, mem) = tvm.split();
    let bell = KvmDoorbell::new(DOORBELL, GSI).unwrap();
    let registration = bell.register(vm).expect("register doorbells");
    let start = Instant::now();
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut exits = 0u64;
    let stats = thread::scope(|s| {
        let host = s.spawn(|| host_side(mem, vm, &bell, ready_rx));
        exits = run_to_done(vcpu, || ready_tx.send(MAILBOX).unwrap());
        host.join().expect("host thread")
    });
    let elapsed = start.elapsed();
    drop(ready_tx);
    registration.unregister().expect("unregister doorbells");
    Traffic {
        stats,
        exits,
        elapsed,
    }
}

/// A heartbeat phase: what the host's side returned and what the guest counted.
#[derive(Debug)]
pub struct HeartbeatPhase<T> {
    /// What the host's side returned.
    pub host: T,
    /// Messages the guest answered with success (negotiations and heartbeats).
    pub answered: u64,
    /// Messages the guest refused: answered with `HV_E_FAIL`, or ignored.
    pub refused: u64,
    /// Exits to userspace (`KVM_RUN` returns) during the phase.
    pub exits: u64,
    /// From resuming the vCPU to the guest's second `DONE`.
    pub elapsed: Duration,
}

/// Sets [`IC_STOP`] when dropped, so the guest ends its heartbeat phase even when the host's
/// side panics.
struct StopOnDrop<'a>(&'a GuestMemoryMmap);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.write_obj(1u64, GuestAddress(IC_STOP)).unwrap();
    }
}

/// Runs the guest's heartbeat phase: a traffic-mode guest that [`run_traffic`] ran to its
/// `DONE` is resumed, and now serves the heartbeat integration service on the same rings.
/// `host` runs on its own thread with a host channel over those rings; when it returns (or
/// panics) [`IC_STOP`] is set and the vCPU runs on this thread to the guest's second
/// `DONE`. A panic of `host` is passed on once the guest finished.
pub fn run_heartbeat_phase<T: Send>(
    tvm: &mut TestVm,
    host: impl FnOnce(&HostChannel<'_, &KvmDoorbell>) -> T + Send,
) -> HeartbeatPhase<T> {
    let (vcpu, vm, mem) = tvm.split();
    let bell = KvmDoorbell::new(DOORBELL, GSI).unwrap();
    let registration = bell.register(vm).expect("register doorbells");
    let (g2h, pages) = mailbox_pages(mem);
    let start = Instant::now();
    let mut exits = 0u64;
    let result = thread::scope(|s| {
        let bell = &bell;
        let side = s.spawn(move || {
            let _stop = StopOnDrop(mem);
            // SAFETY: as in `host_side`: `mem` is the `TestVm`'s mapping, which outlives
            // this thread, and the host touches the ring pages only through the rings.
            let rings = unsafe { RingPages::new(mem, &pages, g2h) }.expect("valid page list");
            let channel = host_channel(&rings, bell, Config::default()).expect("host channel");
            host(&channel)
        });
        exits = run_to_done(vcpu, || {
            panic!("guest reported MAILBOX in the heartbeat phase")
        });
        side.join()
    });
    let elapsed = start.elapsed();
    registration.unregister().expect("unregister doorbells");
    let host = result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    HeartbeatPhase {
        host,
        answered: mem.read_obj(GuestAddress(IC_ANSWERED)).unwrap(),
        refused: mem.read_obj(GuestAddress(IC_REFUSED)).unwrap(),
        exits,
        elapsed,
    }
}
