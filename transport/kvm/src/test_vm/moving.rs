//! Moving the test guest, running, into a fresh VM mid-stream: the steps of live migration
//! inside one process. The vCPU runs on a thread of its own; to move it, that thread is
//! kicked out of `KVM_RUN` with a signal and the host's side stops between two passes,
//! saving its channel (the endpoint's saved state: transactions in flight, counters). Then
//! guest memory is copied into the new VM's memory, the vCPU's whole state (registers,
//! special registers, the XSAVE area with the SSE state, XCRs, debug registers, LAPIC, MP
//! state, events, MSRs) and the VM's (irqchip, clock) are written into the new VM made
//! beforehand, the doorbells are registered with it, the host's channel is restored over
//! the rings in the new memory (which signals whichever side the control pages say is owed
//! a signal), and both sides go on. The guest is not told.
//!
//! Memory moves by pre-copy: with KVM's dirty-page log on, all of it is copied while both
//! sides run, then again and again the pages written since (KVM's log for the guest's
//! writes, vm-memory's bitmap for the host's: the rings mark every store they make), until
//! a pass finds few; only those last pages are copied while both sides are stopped. The
//! byte stream between processes and the new process are the next steps.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    Msrs, kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmlink_channel::{Config, Doorbell, Endpoint, RingRx, RingTx, SavedEndpoint};
use vmlink_ring::WaitDecision;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use super::stream::{self, StreamError, Tag, put_struct, take_struct, take_u32, take_u64};
use super::{CONTROL, DONE, DOORBELL, GSI, HostApp, HostStats, MAILBOX, TestVm, pic_irr};
use crate::{KvmDoorbell, RingPages, host_channel};

/// Guest memory whose bitmap records the host's writes (through vm-memory and through the
/// rings), beside KVM's log of the guest's.
pub type Mem = GuestMemoryMmap<AtomicBitmap>;

/// Pre-copy passes stop once a pass finds at most this many dirty pages.
const STOP_PAGES: u64 = 32;
/// Pre-copy passes at most (after the first, which copies everything).
const MAX_PASSES: usize = 8;

/// The MSRs moved with the vCPU, where KVM lists them (the 64-bit syscall and sysenter
/// state, the kernel GS base, the TSC and its aux value, PAT, misc-enable).
const MSRS: [u32; 11] = [
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0x10,        // TSC
    0xc000_0103, // TSC_AUX
    0x277,       // PAT
];

/// An ioctl's error as a message naming it.
fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |err| format!("{what}: {err}")
}

/// Everything of a vCPU that a fresh vCPU needs to go on where it stopped.
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    msrs: Msrs,
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running; `msrs` are the MSR indices to move.
    pub fn save(vcpu: &VcpuFd, msrs: &[u32]) -> Result<Self, String> {
        let e = ioctl;
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msr_state = Msrs::from_entries(&entries).map_err(|e| format!("msrs: {e:?}"))?;
        let read = vcpu.get_msrs(&mut msr_state).map_err(e("get_msrs"))?;
        if read != msrs.len() {
            return Err(format!("get_msrs read {read} of {} MSRs", msrs.len()));
        }
        Ok(Self {
            mp_state: vcpu.get_mp_state().map_err(e("get_mp_state"))?,
            regs: vcpu.get_regs().map_err(e("get_regs"))?,
            sregs: vcpu.get_sregs().map_err(e("get_sregs"))?,
            xsave: vcpu.get_xsave().map_err(e("get_xsave"))?,
            xcrs: vcpu.get_xcrs().map_err(e("get_xcrs"))?,
            debugregs: vcpu.get_debug_regs().map_err(e("get_debug_regs"))?,
            lapic: vcpu.get_lapic().map_err(e("get_lapic"))?,
            events: vcpu.get_vcpu_events().map_err(e("get_vcpu_events"))?,
            msrs: msr_state,
        })
    }

    /// Writes the state into a fresh vCPU (of a VM whose memory holds the same pages).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), String> {
        let e = ioctl;
        vcpu.set_mp_state(self.mp_state)
            .map_err(e("set_mp_state"))?;
        vcpu.set_regs(&self.regs).map_err(e("set_regs"))?;
        vcpu.set_sregs(&self.sregs).map_err(e("set_sregs"))?;
        // SAFETY: `xsave` is a whole `kvm_xsave` that `get_xsave` filled on a vCPU of this
        // host, the size KVM_SET_XSAVE reads (the VM did not enable a larger XSAVE2 area).
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(e("set_xsave"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(e("set_xcrs"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(e("set_debug_regs"))?;
        vcpu.set_lapic(&self.lapic).map_err(e("set_lapic"))?;
        let written = vcpu.set_msrs(&self.msrs).map_err(e("set_msrs"))?;
        if written != self.msrs.as_slice().len() {
            return Err(format!(
                "set_msrs wrote {written} of {} MSRs",
                self.msrs.as_slice().len()
            ));
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(e("set_vcpu_events"))?;
        Ok(())
    }

    /// The state as bytes, for a migration stream: each kvm-bindings struct's bytes in
    /// the order `restore` writes them, then the MSRs (a `u32` count, then index `u32` and
    /// value `u64` each).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_struct(&mut out, &self.mp_state);
        put_struct(&mut out, &self.regs);
        put_struct(&mut out, &self.sregs);
        put_struct(&mut out, &self.xsave);
        put_struct(&mut out, &self.xcrs);
        put_struct(&mut out, &self.debugregs);
        put_struct(&mut out, &self.lapic);
        put_struct(&mut out, &self.events);
        let msrs = self.msrs.as_slice();
        out.extend_from_slice(&(msrs.len() as u32).to_le_bytes());
        for m in msrs {
            out.extend_from_slice(&m.index.to_le_bytes());
            out.extend_from_slice(&m.data.to_le_bytes());
        }
        out
    }

    /// The state from [`to_bytes`](Self::to_bytes)'s form (KVM checks the values when
    /// they are written into a vCPU).
    pub fn from_bytes(mut bytes: &[u8]) -> Result<Self, StreamError> {
        let b = &mut bytes;
        let mp_state = take_struct(b, "the MP state")?;
        let regs = take_struct(b, "the registers")?;
        let sregs = take_struct(b, "the special registers")?;
        let xsave = take_struct(b, "the XSAVE area")?;
        let xcrs = take_struct(b, "the XCRs")?;
        let debugregs = take_struct(b, "the debug registers")?;
        let lapic = take_struct(b, "the LAPIC")?;
        let events = take_struct(b, "the vCPU events")?;
        let n = take_u32(b, "the MSR count")? as usize;
        if n > MSRS.len() {
            return Err(StreamError::Malformed("more MSRs than are moved"));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let index = take_u32(b, "an MSR index")?;
            let data = take_u64(b, "an MSR value")?;
            entries.push(kvm_msr_entry {
                index,
                data,
                ..Default::default()
            });
        }
        if !b.is_empty() {
            return Err(StreamError::Malformed("bytes after the vCPU state"));
        }
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| StreamError::Malformed("the MSR list"))?;
        Ok(Self {
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            mp_state,
            events,
            msrs,
        })
    }

    /// The instruction pointer it stopped at.
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }
}

/// The VM's own state: the in-kernel irqchip (both PICs, the IOAPIC) and the clock.
pub struct VmState {
    chips: [kvm_irqchip; 3],
    clock: kvm_clock_data,
}

impl VmState {
    /// Reads it (with the vCPU stopped).
    pub fn save(vm: &VmFd) -> Result<Self, String> {
        let mut chips = [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ]
        .map(|chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        });
        for chip in &mut chips {
            vm.get_irqchip(chip)
                .map_err(|e| format!("get_irqchip {}: {e}", chip.chip_id))?;
        }
        let clock = vm.get_clock().map_err(|e| format!("get_clock: {e}"))?;
        Ok(Self { chips, clock })
    }

    /// The state as bytes: the three irqchips' and the clock's structs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for chip in &self.chips {
            put_struct(&mut out, chip);
        }
        put_struct(&mut out, &self.clock);
        out
    }

    /// The state from [`to_bytes`](Self::to_bytes)'s form.
    pub fn from_bytes(mut bytes: &[u8]) -> Result<Self, StreamError> {
        let b = &mut bytes;
        let chips = [
            take_struct(b, "the master PIC")?,
            take_struct(b, "the slave PIC")?,
            take_struct(b, "the IOAPIC")?,
        ];
        let clock = take_struct(b, "the clock")?;
        if !b.is_empty() {
            return Err(StreamError::Malformed("bytes after the VM state"));
        }
        Ok(Self { chips, clock })
    }

    /// Writes it into a fresh VM.
    pub fn restore(&self, vm: &VmFd) -> Result<(), String> {
        for chip in &self.chips {
            vm.set_irqchip(chip)
                .map_err(|e| format!("set_irqchip {}: {e}", chip.chip_id))?;
        }
        // Only the clock's value goes back (no flags the set call would refuse).
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(|e| format!("set_clock: {e}"))?;
        Ok(())
    }
}

/// The MSRs of [`MSRS`] that this KVM can save.
pub fn movable_msrs(kvm: &Kvm) -> Vec<u32> {
    let listed = kvm
        .get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default();
    MSRS.into_iter().filter(|m| listed.contains(m)).collect()
}

/// A fresh VM over `mem` (the same pages at the same guest addresses), with an in-kernel
/// irqchip and one vCPU not yet set up: made before the vCPU stops, so the move costs only
/// the state's reads and writes.
pub fn fresh_vm(kvm: &Kvm, mem: &Mem) -> Result<(VmFd, VcpuFd), String> {
    let vm = kvm.create_vm().map_err(|e| format!("create_vm: {e}"))?;
    vm.create_irq_chip()
        .map_err(|e| format!("create_irq_chip: {e}"))?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| format!("guest memory: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem_len(mem),
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` is a live mapping of that many bytes, which outlives every VM the
    // moving run makes (they are dropped before it returns).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("set_user_memory_region: {e}"))?;
    let vcpu = vm.create_vcpu(0).map_err(|e| format!("create_vcpu: {e}"))?;
    Ok((vm, vcpu))
}

/// How a vCPU thread ended.
struct Stopped {
    vcpu: VcpuFd,
    /// The guest reported `DONE`.
    done: bool,
    exits: u64,
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (its handler does nothing: the
/// interrupted `KVM_RUN` returns `EINTR`).
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Runs `vcpu` on a thread of its own until the guest reports `DONE` or `pause` is set
/// (and the thread kicked).
fn spawn_vcpu(
    mut vcpu: VcpuFd,
    pause: Arc<AtomicBool>,
    ready: mpsc::Sender<u64>,
) -> thread::JoinHandle<Stopped> {
    thread::spawn(move || {
        let mut exits = 0u64;
        loop {
            if pause.load(Ordering::Acquire) {
                return Stopped {
                    vcpu,
                    done: false,
                    exits,
                };
            }
            match vcpu.run() {
                Ok(exit) => {
                    exits += 1;
                    match exit {
                        VcpuExit::MmioWrite(addr, data) if addr == CONTROL => {
                            let mut v = [0u8; 8];
                            v[..data.len()].copy_from_slice(data);
                            match u64::from_le_bytes(v) {
                                DONE => {
                                    return Stopped {
                                        vcpu,
                                        done: true,
                                        exits,
                                    };
                                }
                                MAILBOX => {
                                    let _ = ready.send(MAILBOX);
                                }
                                other => panic!("guest reported {other:#x}"),
                            }
                        }
                        VcpuExit::MmioWrite(addr, _) if addr == DOORBELL => {}
                        VcpuExit::MmioRead(_, data) => data.fill(0),
                        other => panic!("unexpected exit {other:?} after {exits} exits"),
                    }
                }
                Err(e) if e.errno() == libc::EINTR => {
                    vcpu.set_kvm_immediate_exit(0);
                }
                Err(e) => panic!("KVM_RUN: {e}"),
            }
        }
    })
}

/// Stops a vCPU thread: sets `pause` and kicks the thread out of `KVM_RUN` until it is out
/// (a kick that lands before it enters `KVM_RUN` is lost, so one is not enough).
fn stop_vcpu(runner: thread::JoinHandle<Stopped>, pause: &AtomicBool) -> Result<Stopped, String> {
    pause.store(true, Ordering::Release);
    while !runner.is_finished() {
        let _ = runner.kill(kick_signal());
        thread::sleep(Duration::from_micros(50));
    }
    runner
        .join()
        .map_err(|_| "the vCPU thread panicked".to_owned())
}

/// One move of the guest.
#[derive(Debug, Clone)]
pub struct Move {
    /// Guest data packets the host had checked when the move began.
    pub at_packet: u64,
    /// From the pause request until the vCPU thread was out of `KVM_RUN` and the host's
    /// side had saved its channel.
    pub stop: Duration,
    /// Copying the last dirty pages into the new VM's memory.
    pub copy: Duration,
    /// Sending the vCPU's, VM's and endpoint's state, and the destination's restoring it
    /// and answering.
    pub state: Duration,
    /// From the pause request until the destination had the guest (`GO` sent).
    pub downtime: Duration,
    /// From the first pass to `GO`.
    pub total: Duration,
    /// The passes while the guest ran: the first copies all of memory, each later one the
    /// pages written since the one before.
    pub passes: Vec<Pass>,
    /// Pages copied while both sides were stopped (written since the last pass).
    pub final_pages: u64,
    /// Of those, pages the guest wrote (KVM's log) and the host wrote (the bitmap; a page
    /// both wrote counts in each).
    pub final_split: (u64, u64),
}

/// One pre-copy pass.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// Pages copied.
    pub pages: u64,
    /// Pages KVM's log said the guest wrote since the pass before.
    pub guest: u64,
    /// Pages the bitmap said the host wrote since the pass before.
    pub host: u64,
}

/// A moving traffic run: what the host saw and each move.
#[derive(Debug)]
pub struct MovingRun {
    /// The host's view, with the guest's summary.
    pub stats: HostStats,
    /// The moves that succeeded, in order.
    pub moves: Vec<Move>,
    /// The moves that aborted: the attempt, the destination's behaviour, the source's
    /// reason, and how long the guest was stopped.
    pub aborted: Vec<(usize, Destination, String, Duration)>,
    /// Exits to userspace over all VMs.
    pub exits: u64,
    /// From the first `KVM_RUN` to the guest's `DONE`.
    pub elapsed: Duration,
}

/// How a phase of the host's side ended.
enum Phase {
    /// Stopped for a move: its state and its channel's.
    Paused(Box<(HostApp, SavedEndpoint)>),
    /// The traffic is over.
    Done(HostStats),
}

/// What every phase of the host's side shares.
struct HostShared<'a> {
    bell: &'a KvmDoorbell,
    /// The guest's ring layout (the guest→host ring's page count, the page list), once its
    /// mailbox said.
    layout: OnceLock<(usize, Vec<u64>)>,
    pause: AtomicBool,
    checked: AtomicU64,
    irr: &'a (dyn Fn() -> u8 + Sync),
    /// Settle a streaming run's packet count (after the last migration).
    settle: AtomicBool,
}

/// The host's side over `mem`, going on from `from` (its state and its channel's; a fresh
/// start when `None`, after the guest's mailbox arrives on `ready`), until the traffic
/// ends or `shared.pause` is set.
fn host_phase(
    mem: &Mem,
    shared: &HostShared<'_>,
    from: Option<Box<(HostApp, SavedEndpoint)>>,
    ready: Option<mpsc::Receiver<u64>>,
) -> Result<Phase, String> {
    if let Some(ready) = ready {
        let mailbox = ready
            .recv()
            .map_err(|_| "the guest never published its mailbox")?;
        if mailbox != MAILBOX {
            return Err(format!("the guest reported {mailbox:#x}"));
        }
        let _ = shared.layout.set(super::mailbox_pages(mem));
    }
    let (g2h, pages) = shared.layout.get().ok_or("no ring layout yet")?;
    // SAFETY: `mem` is guest memory that outlives this phase (every memory of the run is
    // dropped after every VM and thread); the host touches the ring pages only through the
    // rings.
    let rings = unsafe { RingPages::new(mem, pages, *g2h) }.map_err(|e| format!("{e}"))?;
    let (mut app, channel) = match from {
        None => (
            HostApp::new().with_limit_of(mem),
            host_channel(&rings, shared.bell, Config::default()).map_err(|e| e.to_string())?,
        ),
        Some(from) => {
            let (app, saved) = *from;
            let tx = RingTx::new(rings.host_to_guest()).map_err(|e| e.to_string())?;
            let rx = RingRx::new(rings.guest_to_host()).map_err(|e| e.to_string())?;
            let channel = Endpoint::restore(tx, rx, shared.bell, saved.config(), &saved)
                .map_err(|e| format!("restore the host's channel: {e}"))?;
            (app, channel)
        }
    };
    let mut idle = 0u32;
    loop {
        if shared.pause.load(Ordering::Acquire) {
            let (saved, ..) = channel.save();
            return Ok(Phase::Paused(Box::new((app, saved))));
        }
        if shared.settle.load(Ordering::Acquire) {
            app.settle(mem);
        }
        let progress = app.step(&channel, mem, Some(&shared.checked));
        if app.done() {
            return Ok(Phase::Done(app.finish(&channel, shared.bell, shared.irr)));
        }
        if progress {
            idle = 0;
        } else if idle < 2000 {
            idle += 1;
            std::hint::spin_loop();
        } else {
            idle = 0;
            if channel.prepare_recv_wait().map_err(|e| e.to_string())? == WaitDecision::Sleep {
                let _ = shared.bell.wait(Some(Duration::from_millis(1)));
            }
        }
    }
}

/// Turns KVM's dirty-page log on or off for the VM's one memory slot over `mem`.
fn dirty_log(vm: &VmFd, mem: &Mem, on: bool) -> Result<(), String> {
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| format!("guest memory: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: 0,
        memory_size: mem_len(mem),
        userspace_addr: host as u64,
    };
    // SAFETY: the same slot over the same live mapping as before, only its flags change;
    // `mem` outlives the VM (see `run_traffic_moving`).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("set_user_memory_region (dirty log {on}): {e}"))
}

/// The pages written since the last look: KVM's log of the guest's writes (cleared by
/// reading it) or'ed with the bitmap of the host's (cleared too); and how many pages each
/// had.
fn dirty_pages(vm: &VmFd, mem: &Mem) -> Result<(Vec<u64>, u64, u64), String> {
    let mut pages = vm
        .get_dirty_log(0, mem_len(mem) as usize)
        .map_err(|e| format!("get_dirty_log: {e}"))?;
    let kvm_count = pages.iter().map(|w| u64::from(w.count_ones())).sum();
    let mut host_count = 0;
    for region in mem.iter() {
        let first = region.start_addr().0 / PAGE;
        let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
        for (i, w) in mapping.bitmap().get_and_reset().into_iter().enumerate() {
            host_count += u64::from(w.count_ones());
            let at = (first / 64) as usize + i;
            if let Some(slot) = pages.get_mut(at) {
                *slot |= w;
            }
        }
    }
    Ok((pages, kvm_count, host_count))
}

/// The first page (its number) at which `a` and `b` differ, if any.
fn first_difference(a: &Mem, b: &Mem) -> Result<Option<u64>, String> {
    let mut x = vec![0u8; PAGE as usize];
    let mut y = vec![0u8; PAGE as usize];
    if mem_len(a) != mem_len(b) {
        return Ok(Some(0));
    }
    for page in 0..mem_len(a) / PAGE {
        let gpa = GuestAddress(page * PAGE);
        a.read_slice(&mut x, gpa).map_err(|e| e.to_string())?;
        b.read_slice(&mut y, gpa).map_err(|e| e.to_string())?;
        if x != y {
            return Ok(Some(page));
        }
    }
    Ok(None)
}

/// Bytes of a page, as KVM's log and vm-memory's bitmap count them.
const PAGE: u64 = 4096;

/// How the destination of an attempted move behaves (the honest one, or a hostile one that
/// the source must survive: the move aborts and the guest goes on where it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Takes the guest.
    Honest,
    /// Reads the header, then closes the connection.
    CloseAfterHeader,
    /// Reads everything, then refuses with a reason.
    Refuse,
    /// Reads everything, then says it is ready with the wrong page count.
    WrongEcho,
    /// Reads everything, then answers nothing (the source times out).
    Silent,
    /// Reads everything, then answers bytes that are no record.
    Garbage,
}

/// How long the source waits for the destination's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// What the destination took from a stream: the host's side to go on with.
struct Arrived {
    app: HostApp,
    saved: SavedEndpoint,
    layout: (usize, Vec<u64>),
    /// Guest pages received.
    pages: u64,
}

/// The destination of one move: reads the stream from `conn` into `mem`, writes the vCPU's
/// and VM's state into `vcpu` and `vm`, answers `READY` and waits for `GO`; or behaves as
/// `how` says. An error is answered with an `ERROR` record where the connection still
/// works.
fn destination(
    conn: &mut UnixStream,
    mem: &Mem,
    vm: &VmFd,
    vcpu: &VcpuFd,
    how: Destination,
) -> Result<Arrived, StreamError> {
    let result = match stream::read_header(conn) {
        Ok(memory) if memory != mem_len(mem) => {
            Err(StreamError::Malformed("a guest of another memory size"))
        }
        Ok(_) => receive(conn, mem, vm, vcpu, how),
        Err(e) => Err(e),
    };
    answer_error(conn, result)
}

/// Answers an error with an `ERROR` record where the connection still works.
fn answer_error<T>(
    conn: &mut UnixStream,
    result: Result<T, StreamError>,
) -> Result<T, StreamError> {
    if let Err(e) = &result {
        let why = match e {
            StreamError::Refused(why) => why.clone(),
            e => e.to_string(),
        };
        let _ = stream::write_record(conn, Tag::Error, &[why.as_bytes()]);
    }
    result
}

/// Where the destination puts what a stream carries.
pub trait Sink {
    /// A guest page at `gpa` (checked: aligned, inside guest memory).
    fn page(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), StreamError>;
    /// The VM's state.
    fn vm(&mut self, state: VmState) -> Result<(), StreamError>;
    /// The vCPU's state.
    fn vcpu(&mut self, state: VcpuState) -> Result<(), StreamError>;
}

/// A sink into a fresh VM: its memory, the VM, its vCPU.
struct KvmSink<'a> {
    mem: &'a Mem,
    vm: &'a VmFd,
    vcpu: &'a VcpuFd,
}

impl Sink for KvmSink<'_> {
    fn page(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), StreamError> {
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|_| StreamError::Malformed("a page outside guest memory"))
    }

    fn vm(&mut self, state: VmState) -> Result<(), StreamError> {
        state.restore(self.vm).map_err(StreamError::Restore)
    }

    fn vcpu(&mut self, state: VcpuState) -> Result<(), StreamError> {
        state.restore(self.vcpu).map_err(StreamError::Restore)
    }
}

/// What a stream's records after the header held, as far as the host's side is concerned.
#[derive(Debug)]
pub struct StateArrived {
    /// Guest pages received.
    pub pages: u64,
    /// The host's state.
    pub app: HostApp,
    /// Its channel's saved state.
    pub saved: SavedEndpoint,
    /// The ring layout (the guest→host ring's page count, the page list).
    pub layout: (usize, Vec<u64>),
}

/// Reads the records after the header, for guest memory of `memory` bytes, into `sink`,
/// up to and including `END`: every record checked, the VM, vCPU and endpoint state
/// required, the page total checked against the pages that came.
pub fn read_state(
    r: &mut impl std::io::Read,
    memory: u64,
    sink: &mut impl Sink,
    buf: &mut Vec<u8>,
) -> Result<StateArrived, StreamError> {
    let mut pages = 0u64;
    let (mut vm_done, mut vcpu_done, mut endpoint) = (false, false, None);
    let total = loop {
        let (tag, body) = stream::read_record(r, buf)?;
        match tag {
            Tag::Pages => {
                pages +=
                    stream::for_each_page(body, memory, |gpa, page| sink.page(gpa, page))? as u64
            }
            Tag::Vm => {
                sink.vm(VmState::from_bytes(body)?)?;
                vm_done = true;
            }
            Tag::Vcpu => {
                sink.vcpu(VcpuState::from_bytes(body)?)?;
                vcpu_done = true;
            }
            Tag::Endpoint => endpoint = Some(parse_endpoint(body)?),
            Tag::End => {
                let mut b = body;
                let total = stream::take_u64(&mut b, "the page total")?;
                if !b.is_empty() {
                    return Err(StreamError::Malformed("bytes after the page total"));
                }
                break total;
            }
            got => {
                return Err(StreamError::Unexpected {
                    got,
                    expected: "pages, state or the end",
                });
            }
        }
    };
    let (Some(arrived), true, true) = (endpoint, vm_done, vcpu_done) else {
        return Err(StreamError::Malformed(
            "an end before the VM, vCPU and endpoint state",
        ));
    };
    if total != pages {
        return Err(StreamError::Malformed(
            "a page total other than the pages that came",
        ));
    }
    Ok(StateArrived {
        pages,
        app: arrived.app,
        saved: arrived.saved,
        layout: arrived.layout,
    })
}

/// The destination's part after the header (which said `mem`'s size).
fn receive(
    conn: &mut UnixStream,
    mem: &Mem,
    vm: &VmFd,
    vcpu: &VcpuFd,
    how: Destination,
) -> Result<Arrived, StreamError> {
    let memory = mem_len(mem);
    if how == Destination::CloseAfterHeader {
        let _ = conn.shutdown(std::net::Shutdown::Both);
        return Err(StreamError::Refused(
            "closed after the header (a test)".into(),
        ));
    }
    let mut sink = KvmSink { mem, vm, vcpu };
    let mut buf = Vec::new();
    let state = read_state(conn, memory, &mut sink, &mut buf)?;
    let pages = state.pages;
    let arrived = Arrived {
        app: state.app,
        saved: state.saved,
        layout: state.layout,
        pages,
    };
    match how {
        Destination::Refuse => return Err(StreamError::Refused("refused (a test)".into())),
        Destination::WrongEcho => {
            stream::write_record(conn, Tag::Ready, &[&(pages + 1).to_le_bytes()])?;
        }
        Destination::Silent => {}
        Destination::Garbage => conn.write_all(b"\xffnot a record at all")?,
        Destination::Honest | Destination::CloseAfterHeader => {
            stream::write_record(conn, Tag::Ready, &[&pages.to_le_bytes()])?;
        }
    }
    match stream::read_record(conn, &mut buf)? {
        (Tag::Go, []) => Ok(arrived),
        (Tag::Error, why) => Err(StreamError::Refused(String::from_utf8_lossy(why).into())),
        (got, _) => Err(StreamError::Unexpected {
            got,
            expected: "GO",
        }),
    }
}

/// The endpoint record's body: the guest→host ring's page count (`u32`), the page count
/// (`u32`, at most 64) and the page numbers (`u64` each), the channel's saved state and the
/// host application's (each a `u32` length and the bytes).
fn endpoint_record(layout: &(usize, Vec<u64>), saved: &SavedEndpoint, app: &HostApp) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(layout.0 as u32).to_le_bytes());
    out.extend_from_slice(&(layout.1.len() as u32).to_le_bytes());
    for p in &layout.1 {
        out.extend_from_slice(&p.to_le_bytes());
    }
    for part in [saved.to_bytes(), app.to_bytes()] {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(&part);
    }
    out
}

fn parse_endpoint(mut body: &[u8]) -> Result<Arrived, StreamError> {
    let b = &mut body;
    let g2h = stream::take_u32(b, "the ring layout")? as usize;
    let n = stream::take_u32(b, "the ring page count")? as usize;
    if n > 64 || g2h > n {
        return Err(StreamError::Malformed("a ring layout past 64 pages"));
    }
    let mut pages = Vec::with_capacity(n);
    for _ in 0..n {
        pages.push(stream::take_u64(b, "a ring page")?);
    }
    let len = stream::take_u32(b, "the saved channel's length")? as usize;
    let saved = SavedEndpoint::from_bytes(stream::take_bytes(b, len, "the saved channel")?)
        .map_err(|_| StreamError::Malformed("the saved channel"))?;
    let len = stream::take_u32(b, "the host state's length")? as usize;
    let app = HostApp::from_bytes(stream::take_bytes(b, len, "the host state")?)?;
    if !b.is_empty() {
        return Err(StreamError::Malformed("bytes after the endpoint"));
    }
    Ok(Arrived {
        app,
        saved,
        layout: (g2h, pages),
        pages: 0,
    })
}

/// Sends the pages set in `bits` of `mem` as `PAGES` records; returns how many.
fn send_pages(conn: &mut UnixStream, mem: &Mem, bits: &[u64]) -> Result<u64, StreamError> {
    let mut record = Vec::with_capacity(4 + stream::MAX_PAGES_PER_RECORD * (8 + PAGE as usize));
    let mut in_record = 0u32;
    let mut sent = 0u64;
    let mut page = vec![0u8; PAGE as usize];
    let mut flush = |record: &mut Vec<u8>, n: &mut u32| -> Result<(), StreamError> {
        if *n > 0 {
            stream::write_record(conn, Tag::Pages, &[&n.to_le_bytes(), record])?;
            record.clear();
            *n = 0;
        }
        Ok(())
    };
    for (i, &w) in bits.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let bit = u64::from(w.trailing_zeros());
            w &= w - 1;
            let gpa = (i as u64 * 64 + bit) * PAGE;
            mem.read_slice(&mut page, GuestAddress(gpa))
                .map_err(|_| StreamError::Malformed("a dirty page outside guest memory"))?;
            record.extend_from_slice(&gpa.to_le_bytes());
            record.extend_from_slice(&page);
            in_record += 1;
            sent += 1;
            if in_record as usize == stream::MAX_PAGES_PER_RECORD {
                flush(&mut record, &mut in_record)?;
            }
        }
    }
    flush(&mut record, &mut in_record)?;
    Ok(sent)
}

/// Every page of guest memory, as a dirty bitmap.
fn all_pages(mem: &Mem) -> Vec<u64> {
    let pages = mem_len(mem) / PAGE;
    let mut bits = vec![u64::MAX; pages.div_ceil(64) as usize];
    if !pages.is_multiple_of(64)
        && let Some(last) = bits.last_mut()
    {
        *last = (1u64 << (pages % 64)) - 1;
    }
    bits
}

/// Bytes of guest memory (one region at GPA 0).
pub fn mem_len(mem: &Mem) -> u64 {
    mem.last_addr().0 + 1
}

/// Runs the traffic mode (a `TestVm` made with mode 0) to the guest's `DONE`, attempting a
/// move for each entry of `plan` to a destination that behaves as it says: each time the
/// host has checked about another `PACKETS / (plan.len() + 1)` of the guest's packets.
/// Honest destinations take the guest; hostile ones make the move abort, and the guest
/// goes on where it was.
pub fn run_traffic_moving(
    tvm: TestVm<AtomicBitmap>,
    plan: &[Destination],
) -> Result<MovingRun, String> {
    register_kick()?;
    let TestVm {
        vcpu,
        vm,
        mem,
        _kvm,
    } = tvm;
    let mut mems = Vec::with_capacity(plan.len());
    for _ in plan {
        mems.push(
            Mem::from_ranges(&[(GuestAddress(0), mem_len(&mem) as usize)])
                .map_err(|e| format!("guest memory: {e}"))?,
        );
    }
    let all_mems: Vec<&Mem> = std::iter::once(&mem).chain(mems.iter()).collect();
    let result = moving(&_kvm, vcpu, &vm, &all_mems, plan);
    // The new VMs went in `moving`; the first one, then the memories they mapped, go now.
    drop(vm);
    drop(all_mems);
    drop(mems);
    drop(mem);
    result
}

/// The source's side of one move, from its first pass to `GO`: `Ok` once the destination
/// has the guest (the source must not run it again), `Err` with the source's parts to go
/// on with where it stopped (or `None` when it had not stopped yet).
struct Outbound<'a> {
    conn: &'a mut UnixStream,
    vm: &'a VmFd,
    mem: &'a Mem,
}

impl Outbound<'_> {
    /// The passes while the guest runs: everything, then the pages written since, until
    /// few are.
    fn pre_copy(&mut self) -> Result<Vec<Pass>, StreamError> {
        stream::write_header(self.conn, mem_len(self.mem))?;
        dirty_log(self.vm, self.mem, true).map_err(StreamError::Restore)?;
        dirty_pages(self.vm, self.mem).map_err(StreamError::Restore)?;
        let all = send_pages(self.conn, self.mem, &all_pages(self.mem))?;
        let mut passes = vec![Pass {
            pages: all,
            guest: 0,
            host: 0,
        }];
        while passes.len() <= MAX_PASSES {
            let (bits, guest, host) =
                dirty_pages(self.vm, self.mem).map_err(StreamError::Restore)?;
            let pages = send_pages(self.conn, self.mem, &bits)?;
            passes.push(Pass { pages, guest, host });
            if pages <= STOP_PAGES {
                break;
            }
        }
        Ok(passes)
    }

    /// With both sides stopped: the last dirty pages, the state, the end; then the
    /// destination's answer and `GO`. Returns the pages sent now and their split.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        vcpu: &VcpuFd,
        msrs: &[u32],
        layout: &(usize, Vec<u64>),
        saved: &SavedEndpoint,
        app: &HostApp,
        sent_before: u64,
    ) -> Result<(u64, u64, u64, Duration), StreamError> {
        let t = Instant::now();
        let (bits, guest, host) = dirty_pages(self.vm, self.mem).map_err(StreamError::Restore)?;
        let pages = send_pages(self.conn, self.mem, &bits)?;
        let copy = t.elapsed();
        let vcpu_state = VcpuState::save(vcpu, msrs).map_err(StreamError::Restore)?;
        let vm_state = VmState::save(self.vm).map_err(StreamError::Restore)?;
        stream::write_record(self.conn, Tag::Vm, &[&vm_state.to_bytes()])?;
        stream::write_record(self.conn, Tag::Vcpu, &[&vcpu_state.to_bytes()])?;
        stream::write_record(
            self.conn,
            Tag::Endpoint,
            &[&endpoint_record(layout, saved, app)],
        )?;
        let total = sent_before + pages;
        stream::write_record(self.conn, Tag::End, &[&total.to_le_bytes()])?;
        self.conn.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let mut buf = Vec::new();
        match stream::read_record(self.conn, &mut buf)? {
            (Tag::Ready, echo) if echo == total.to_le_bytes() => {}
            (Tag::Ready, _) => return Err(StreamError::Malformed("READY with another page total")),
            (Tag::Error, why) => {
                return Err(StreamError::Refused(String::from_utf8_lossy(why).into()));
            }
            (got, _) => {
                return Err(StreamError::Unexpected {
                    got,
                    expected: "READY",
                });
            }
        }
        stream::write_record(self.conn, Tag::Go, &[])?;
        Ok((pages, guest, host, copy))
    }

    /// Waits for the destination's `RESUMED`: the guest runs there.
    fn resumed(&mut self) -> Result<(), StreamError> {
        let mut buf = Vec::new();
        match stream::read_record(self.conn, &mut buf)? {
            (Tag::Resumed, []) => Ok(()),
            (got, _) => Err(StreamError::Unexpected {
                got,
                expected: "RESUMED",
            }),
        }
    }
}

fn moving(
    kvm: &Kvm,
    vcpu: VcpuFd,
    vm: &VmFd,
    mems: &[&Mem],
    plan: &[Destination],
) -> Result<MovingRun, String> {
    let attempts = plan.len();
    let msrs = movable_msrs(kvm);
    // Every VM is made up front, before the first vCPU runs: they outlive the threads.
    let mut vms = Vec::with_capacity(attempts);
    let mut vcpus = Vec::with_capacity(attempts);
    for m in &mems[1..] {
        let (v, c) = fresh_vm(kvm, m)?;
        vms.push(v);
        vcpus.push(Some(c));
    }
    let all_vms: Vec<&VmFd> = std::iter::once(vm).chain(vms.iter()).collect();
    let current = AtomicUsize::new(0);
    let bell = KvmDoorbell::new(DOORBELL, GSI).map_err(|e| format!("doorbell: {e}"))?;
    let mut registration = Some(
        bell.register(all_vms[0])
            .map_err(|e| format!("register doorbells: {e}"))?,
    );
    let (ready_tx, ready_rx) = mpsc::channel();
    let irr = || pic_irr(all_vms[current.load(Ordering::Acquire)]);
    let shared = HostShared {
        bell: &bell,
        layout: OnceLock::new(),
        pause: AtomicBool::new(false),
        checked: AtomicU64::new(0),
        irr: &irr,
        settle: AtomicBool::new(false),
    };
    let start = Instant::now();
    let mut log = Vec::new();
    let mut aborted = Vec::new();
    let mut exits = 0u64;
    let step = u64::from(super::PACKETS) / (attempts as u64 + 1);
    let stats = thread::scope(|s| -> Result<HostStats, String> {
        let shared = &shared;
        let mut host = s.spawn(move || host_phase(mems[0], shared, None, Some(ready_rx)));
        let mut cur = 0usize;
        let mut pause = Arc::new(AtomicBool::new(false));
        let mut runner = spawn_vcpu(vcpu, pause.clone(), ready_tx.clone());
        for (k, &how) in plan.iter().enumerate() {
            let t_idx = k + 1;
            let target = step * (k as u64 + 1);
            while shared.checked.load(Ordering::Relaxed) < target
                && !runner.is_finished()
                && !host.is_finished()
            {
                thread::sleep(Duration::from_micros(200));
            }
            let at_packet = shared.checked.load(Ordering::Relaxed);
            let move_start = Instant::now();
            let (mut src_conn, mut dst_conn) =
                UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
            let next = vcpus[k].take().ok_or("no fresh vCPU")?;
            let (dst_mem, dst_vm) = (mems[t_idx], all_vms[t_idx]);
            let dest = s.spawn(move || {
                let r = destination(&mut dst_conn, dst_mem, dst_vm, &next, how);
                (r, next)
            });
            let mut out = Outbound {
                conn: &mut src_conn,
                vm: all_vms[cur],
                mem: mems[cur],
            };
            let passes = match out.pre_copy() {
                Ok(passes) => passes,
                Err(e) => {
                    // The move failed while the guest ran: it never stopped.
                    let _ = src_conn.shutdown(std::net::Shutdown::Both);
                    let _ = dest.join();
                    let _ = dirty_log(all_vms[cur], mems[cur], false);
                    aborted.push((k, how, e.to_string(), Duration::ZERO));
                    continue;
                }
            };
            let sent_before: u64 = passes.iter().map(|p| p.pages).sum();
            // Both sides stop: the vCPU kicked out of `KVM_RUN`, the host's side between
            // two passes with its channel saved.
            let asked = Instant::now();
            let stopped = stop_vcpu(runner, &pause)?;
            exits += stopped.exits;
            let mut vcpu = stopped.vcpu;
            if stopped.done {
                let _ = src_conn.shutdown(std::net::Shutdown::Both);
                let _ = dest.join();
                let _ = dirty_log(all_vms[cur], mems[cur], false);
                return Err(format!("the guest finished before move {k}"));
            }
            shared.pause.store(true, Ordering::Release);
            let _ = bell.wake_local();
            let phase = host
                .join()
                .map_err(|_| "the host thread panicked".to_owned())??;
            shared.pause.store(false, Ordering::Release);
            let Phase::Paused(from) = phase else {
                return Err("the traffic ended while the guest was stopped mid-stream".into());
            };
            let stop = asked.elapsed();
            let layout = shared.layout.get().ok_or("no ring layout")?.clone();
            let t = Instant::now();
            let mut out = Outbound {
                conn: &mut src_conn,
                vm: all_vms[cur],
                mem: mems[cur],
            };
            let sent = out
                .finish(&vcpu, &msrs, &layout, &from.1, &from.0, sent_before)
                .map(|r| (passes, r));
            let (downtime, total) = (asked.elapsed(), move_start.elapsed());
            let state_and_answer = t.elapsed();
            let (arrived, next) = {
                if sent.is_err() {
                    let _ = src_conn.shutdown(std::net::Shutdown::Both);
                }
                dest.join()
                    .map_err(|_| "the destination thread panicked".to_owned())?
            };
            let (passes, (final_pages, guest, host_pages, copy)) = match (sent, arrived) {
                (Ok(sent), Ok(arrived)) => {
                    // The destination has the guest: the source never runs it again. With
                    // both stopped, its memory must equal the source's byte for byte: any
                    // write the two logs missed shows here (checked outside the downtime).
                    if let Some(page) = first_difference(mems[cur], mems[t_idx])? {
                        return Err(format!(
                            "move {k}: guest page {page:#x} differs after the last pass: a \
                             write neither KVM's log nor the bitmap recorded"
                        ));
                    }
                    drop(vcpu);
                    vcpu = next;
                    if let Some(r) = registration.take() {
                        r.unregister()
                            .map_err(|e| format!("unregister doorbells: {e}"))?;
                    }
                    registration = Some(
                        bell.register(all_vms[t_idx])
                            .map_err(|e| format!("register doorbells: {e}"))?,
                    );
                    cur = t_idx;
                    current.store(cur, Ordering::Release);
                    let _ = shared.layout.set(arrived.layout.clone());
                    let mem = mems[cur];
                    let from = Box::new((arrived.app, arrived.saved));
                    host = s.spawn(move || host_phase(mem, shared, Some(from), None));
                    sent
                }
                (sent, arrived) => {
                    // The move failed before `GO`: the source goes on where it stopped.
                    let why = match (sent, arrived) {
                        (Err(e), _) | (Ok(_), Err(e)) => e.to_string(),
                        (Ok(_), Ok(_)) => unreachable!(),
                    };
                    let _ = dirty_log(all_vms[cur], mems[cur], false);
                    let mem = mems[cur];
                    host = s.spawn(move || host_phase(mem, shared, Some(from), None));
                    aborted.push((k, how, why, asked.elapsed()));
                    drop(next);
                    pause = Arc::new(AtomicBool::new(false));
                    runner = spawn_vcpu(vcpu, pause.clone(), ready_tx.clone());
                    continue;
                }
            };
            let _ = dirty_log(all_vms[cur], mems[cur], false);
            pause = Arc::new(AtomicBool::new(false));
            runner = spawn_vcpu(vcpu, pause.clone(), ready_tx.clone());
            log.push(Move {
                at_packet,
                passes,
                final_pages,
                final_split: (guest, host_pages),
                stop,
                copy,
                state: state_and_answer.saturating_sub(copy),
                downtime,
                total,
            });
        }
        let _ = &pause;
        // Every move is done: a streaming run's count is settled, and the traffic ends.
        shared.settle.store(true, Ordering::Release);
        let stopped = runner
            .join()
            .map_err(|_| "the vCPU thread panicked".to_owned())?;
        exits += stopped.exits;
        if !stopped.done {
            return Err("the vCPU stopped without DONE".into());
        }
        drop(ready_tx);
        match host
            .join()
            .map_err(|_| "the host thread panicked".to_owned())??
        {
            Phase::Done(stats) => Ok(stats),
            Phase::Paused(..) => Err("the host's side paused at the end".into()),
        }
    })?;
    let elapsed = start.elapsed();
    if let Some(r) = registration.take() {
        r.unregister()
            .map_err(|e| format!("unregister doorbells: {e}"))?;
    }
    Ok(MovingRun {
        stats,
        moves: log,
        aborted,
        exits,
        elapsed,
    })
}

/// What the source of a migration to another process measured.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The move (its pre-copy passes, the pages sent while stopped, the times).
    pub step: Move,
    /// Exits to userspace in the source.
    pub exits: u64,
}

/// What the destination of a migration from another process saw.
#[derive(Debug)]
pub struct Incoming {
    /// Guest pages received.
    pub pages: u64,
    /// How the guest's run here ended: at its `DONE` (with what the host saw), or moved on
    /// to yet another process.
    pub then: Ran,
    /// From `GO` to the end of the run here.
    pub ran: Duration,
}

/// How a run of the guest in this process ended.
#[derive(Debug)]
pub enum Ran {
    /// The guest reported `DONE`: what the host saw, and the exits to userspace here.
    Done(HostStats, u64),
    /// The guest was migrated on.
    Out(Outgoing),
    /// A migration on failed before `GO` (why), and the guest ran to its end here.
    Stayed(HostStats, u64, String),
}

/// Where the host's side of a run starts.
enum Start {
    /// Afresh, once the guest's mailbox arrives.
    Fresh,
    /// From a migration's state: the ring layout, the host's and its channel's state.
    Arrived((usize, Vec<u64>), Box<(HostApp, SavedEndpoint)>),
}

/// Runs the guest (`vcpu` in `vm` over `mem`) in this process with the host's side from
/// `start`, to the guest's `DONE`; or, with `onward` (`at`, a way to reach the next
/// destination), until the host has checked `at` of the guest's packets, and then migrates
/// it there. A migration that fails before `GO` leaves the guest running here, to its end.
/// `running` is told once the guest runs (for a destination's `RESUMED`).
fn run_here(
    kvm: &Kvm,
    vm: &VmFd,
    mem: &Mem,
    vcpu: VcpuFd,
    start: Start,
    onward: Option<(u64, &mut dyn FnMut() -> std::io::Result<UnixStream>)>,
    running: &mut dyn FnMut(),
) -> Result<Ran, String> {
    let msrs = movable_msrs(kvm);
    let bell = KvmDoorbell::new(DOORBELL, GSI).map_err(|e| format!("doorbell: {e}"))?;
    let registration = bell
        .register(vm)
        .map_err(|e| format!("register doorbells: {e}"))?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let irr = || pic_irr(vm);
    let shared = HostShared {
        bell: &bell,
        layout: OnceLock::new(),
        pause: AtomicBool::new(false),
        checked: AtomicU64::new(0),
        irr: &irr,
        settle: AtomicBool::new(false),
    };
    // A fresh run learns the ring layout from the guest's mailbox, which the vCPU thread
    // passes on; a migrated one brought it.
    let (ready, from) = match start {
        Start::Fresh => (Some(ready_rx), None),
        Start::Arrived(layout, from) => {
            let _ = shared.layout.set(layout);
            (None, Some(from))
        }
    };
    let result = thread::scope(|s| -> Result<Ran, String> {
        let shared = &shared;
        let mut host = s.spawn(move || host_phase(mem, shared, from, ready));
        let pause = Arc::new(AtomicBool::new(false));
        let mut runner = spawn_vcpu(vcpu, pause.clone(), ready_tx.clone());
        running();
        // To the end here: joins both sides.
        let to_the_end = |runner: thread::JoinHandle<Stopped>,
                          host: thread::ScopedJoinHandle<'_, Result<Phase, String>>,
                          why: Option<String>|
         -> Result<Ran, String> {
            // No migration follows: a streaming run's count is settled.
            shared.settle.store(true, Ordering::Release);
            let stopped = runner
                .join()
                .map_err(|_| "the vCPU thread panicked".to_owned())?;
            if !stopped.done {
                return Err("the vCPU stopped without DONE".into());
            }
            match host
                .join()
                .map_err(|_| "the host thread panicked".to_owned())??
            {
                Phase::Done(stats) => Ok(match why {
                    None => Ran::Done(stats, stopped.exits),
                    Some(why) => Ran::Stayed(stats, stopped.exits, why),
                }),
                Phase::Paused(..) => Err("the host's side paused at the end".into()),
            }
        };
        let Some((at, connect)) = onward else {
            return to_the_end(runner, host, None);
        };
        while shared.checked.load(Ordering::Relaxed) < at && !runner.is_finished() {
            thread::sleep(Duration::from_micros(200));
        }
        let at_packet = shared.checked.load(Ordering::Relaxed);
        let mut conn = match connect() {
            Ok(c) => c,
            Err(e) => return to_the_end(runner, host, Some(format!("reach the destination: {e}"))),
        };
        let move_start = Instant::now();
        let mut out = Outbound {
            conn: &mut conn,
            vm,
            mem,
        };
        let passes = match out.pre_copy() {
            Ok(p) => p,
            Err(e) => {
                // Failed while the guest ran: it never stopped.
                let _ = dirty_log(vm, mem, false);
                return to_the_end(runner, host, Some(format!("pre-copy: {e}")));
            }
        };
        let asked = Instant::now();
        let stopped = stop_vcpu(runner, &pause)?;
        shared.pause.store(true, Ordering::Release);
        let _ = bell.wake_local();
        let phase = host
            .join()
            .map_err(|_| "the host thread panicked".to_owned())??;
        if stopped.done {
            return Err("the guest finished before the migration".into());
        }
        let Phase::Paused(from) = phase else {
            return Err("the traffic ended while the guest was stopped mid-stream".into());
        };
        let stop = asked.elapsed();
        let layout = shared.layout.get().ok_or("no ring layout")?.clone();
        let sent_before = passes.iter().map(|p| p.pages).sum();
        let t = Instant::now();
        match out.finish(&stopped.vcpu, &msrs, &layout, &from.1, &from.0, sent_before) {
            Ok((final_pages, guest, host_pages, copy)) => {
                // `GO` went out: the guest is the destination's. The downtime ends when it
                // says the guest runs there.
                let state = t.elapsed().saturating_sub(copy);
                out.resumed().map_err(|e| {
                    format!("the destination took the guest but did not say it runs: {e}")
                })?;
                Ok(Ran::Out(Outgoing {
                    step: Move {
                        at_packet,
                        passes,
                        stop,
                        copy,
                        state,
                        downtime: asked.elapsed(),
                        total: move_start.elapsed(),
                        final_pages,
                        final_split: (guest, host_pages),
                    },
                    exits: stopped.exits,
                }))
            }
            Err(e) => {
                // Failed before `GO`: the guest goes on here where it stopped.
                let _ = dirty_log(vm, mem, false);
                shared.pause.store(false, Ordering::Release);
                host = s.spawn(move || host_phase(mem, shared, Some(from), None));
                runner = spawn_vcpu(stopped.vcpu, Arc::new(AtomicBool::new(false)), ready_tx);
                to_the_end(runner, host, Some(format!("migration: {e}")))
            }
        }
    });
    drop(registration);
    result
}

/// The source of a migration to another process: runs the traffic mode (a `TestVm` made
/// with mode 0) until the host has checked `at` of the guest's packets, then migrates the
/// guest over `conn` (pre-copy, stop, state, `READY`, `GO`, `RESUMED`): [`Ran::Out`]. A
/// migration that fails before `GO` leaves the guest running here to its end:
/// [`Ran::Stayed`], with what the host saw and why.
pub fn migrate_out(tvm: TestVm<AtomicBitmap>, at: u64, conn: UnixStream) -> Result<Ran, String> {
    register_kick()?;
    let TestVm {
        vcpu,
        vm,
        mem,
        _kvm,
    } = tvm;
    let mut conn = Some(conn);
    let mut connect = move || {
        conn.take()
            .ok_or_else(|| std::io::Error::other("the connection was used"))
    };
    let ran = run_here(
        &_kvm,
        &vm,
        &mem,
        vcpu,
        Start::Fresh,
        Some((at, &mut connect)),
        &mut || {},
    );
    drop(vm);
    drop(mem);
    match ran? {
        Ran::Done(..) => Err("the guest finished before the migration".into()),
        ran => Ok(ran),
    }
}

/// The destination of a migration from another process: a fresh VM of its own (KVM
/// handle, memory of the size the stream's header says, vCPU, doorbells), the guest taken
/// from `conn`, then run here with the host's side going on from the state that came with
/// it: to the end, or with `onward` (`at`, a way to reach the next destination) until the
/// host has checked `at` of the guest's packets, then migrated on.
pub fn migrate_in(
    conn: &mut UnixStream,
    onward: Option<(u64, &mut dyn FnMut() -> std::io::Result<UnixStream>)>,
) -> Result<Incoming, String> {
    register_kick()?;
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    // The header says how much memory: made, with the VM, before the rest arrives.
    let header = stream::read_header(conn);
    let memory = answer_error(conn, header).map_err(|e| format!("taking the guest: {e}"))?;
    let mem = Mem::from_ranges(&[(GuestAddress(0), memory as usize)])
        .map_err(|e| format!("guest memory: {e}"))?;
    let result = (|| {
        let (vm, vcpu) = fresh_vm(&kvm, &mem)?;
        let received = receive(conn, &mem, &vm, &vcpu, Destination::Honest);
        let arrived = answer_error(conn, received).map_err(|e| format!("taking the guest: {e}"))?;
        let pages = arrived.pages;
        let start = Instant::now();
        let mut running = || {
            // The guest runs here: the source's downtime ends.
            let _ = stream::write_record(&mut *conn, Tag::Resumed, &[]);
        };
        let then = run_here(
            &kvm,
            &vm,
            &mem,
            vcpu,
            Start::Arrived(arrived.layout, Box::new((arrived.app, arrived.saved))),
            onward,
            &mut running,
        )?;
        Ok(Incoming {
            pages,
            then,
            ran: start.elapsed(),
        })
    })();
    drop(mem);
    result
}

/// Registers the handler of the signal that kicks a vCPU thread out of `KVM_RUN` (once per
/// process).
fn register_kick() -> Result<(), String> {
    static HANDLER: Once = Once::new();
    static FAILED: OnceLock<String> = OnceLock::new();
    HANDLER.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            let _ = FAILED.set(format!("register the kick signal's handler: {e}"));
        }
    });
    match FAILED.get() {
        Some(e) => Err(e.clone()),
        None => Ok(()),
    }
}
