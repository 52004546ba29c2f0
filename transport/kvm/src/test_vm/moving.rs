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

use super::{CONTROL, DONE, DOORBELL, GSI, HostApp, HostStats, MAILBOX, MEM_SIZE, TestVm, pic_irr};
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
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` is the test VM's mapping of MEM_SIZE bytes, which outlives every VM the
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
    /// Reading the vCPU's and VM's state, writing them into the new VM, registering the
    /// doorbells there.
    pub state: Duration,
    /// From the pause request until the vCPU ran again in the new VM (less the check that
    /// the two memories are equal, which a real migration does not make).
    pub downtime: Duration,
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
    /// The moves, in order.
    pub moves: Vec<Move>,
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
            HostApp::new(),
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
        memory_size: MEM_SIZE as u64,
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
        .get_dirty_log(0, MEM_SIZE)
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

/// Copies the pages set in `bits` from `from` into `to`; returns how many.
fn copy_pages(from: &Mem, to: &Mem, bits: &[u64]) -> Result<u64, String> {
    let mut page = vec![0u8; PAGE as usize];
    let mut n = 0;
    for (i, &w) in bits.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let bit = u64::from(w.trailing_zeros());
            w &= w - 1;
            let gpa = GuestAddress((i as u64 * 64 + bit) * PAGE);
            from.read_slice(&mut page, gpa)
                .map_err(|e| format!("read guest page {gpa:?}: {e}"))?;
            to.write_slice(&page, gpa)
                .map_err(|e| format!("write guest page {gpa:?}: {e}"))?;
            n += 1;
        }
    }
    Ok(n)
}

/// The first page (its number) at which `a` and `b` differ, if any.
fn first_difference(a: &Mem, b: &Mem) -> Result<Option<u64>, String> {
    let mut x = vec![0u8; PAGE as usize];
    let mut y = vec![0u8; PAGE as usize];
    for page in 0..MEM_SIZE as u64 / PAGE {
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

/// Copies all of `from` into `to` (both `MEM_SIZE` at GPA 0); returns the bytes copied.
fn copy_memory(from: &Mem, to: &Mem) -> Result<u64, String> {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    while at < MEM_SIZE as u64 {
        from.read_slice(&mut chunk, GuestAddress(at))
            .map_err(|e| format!("read guest memory at {at:#x}: {e}"))?;
        to.write_slice(&chunk, GuestAddress(at))
            .map_err(|e| format!("write guest memory at {at:#x}: {e}"))?;
        at += chunk.len() as u64;
    }
    Ok(at)
}

/// Runs the traffic mode (a `TestVm` made with mode 0) to the guest's `DONE`, moving the
/// guest into a fresh VM with fresh memory `moves` times: each time the host has checked
/// about another `PACKETS / (moves + 1)` of the guest's packets.
pub fn run_traffic_moving(tvm: TestVm<AtomicBitmap>, moves: usize) -> Result<MovingRun, String> {
    static HANDLER: Once = Once::new();
    let mut handler = Ok(());
    HANDLER.call_once(|| handler = register_signal_handler(kick_signal(), on_kick));
    handler.map_err(|e| format!("register the kick signal's handler: {e}"))?;

    let TestVm {
        vcpu,
        vm,
        mem,
        _kvm,
    } = tvm;
    let mut mems = Vec::with_capacity(moves);
    for _ in 0..moves {
        mems.push(
            Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
                .map_err(|e| format!("guest memory: {e}"))?,
        );
    }
    let all_mems: Vec<&Mem> = std::iter::once(&mem).chain(mems.iter()).collect();
    let result = moving(&_kvm, vcpu, &vm, &all_mems);
    // The new VMs went in `moving`; the first one, then the memories they mapped, go now.
    drop(vm);
    drop(all_mems);
    drop(mems);
    drop(mem);
    result
}

fn moving(kvm: &Kvm, vcpu: VcpuFd, vm: &VmFd, mems: &[&Mem]) -> Result<MovingRun, String> {
    let moves = mems.len() - 1;
    let msrs = movable_msrs(kvm);
    // Every VM is made up front, before the first vCPU runs: they outlive the threads.
    let mut vms = Vec::with_capacity(moves);
    let mut vcpus = Vec::with_capacity(moves);
    for m in &mems[1..] {
        let (v, c) = fresh_vm(kvm, m)?;
        vms.push(v);
        vcpus.push(c);
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
    };
    let start = Instant::now();
    let mut log = Vec::new();
    let mut exits = 0u64;
    let step = u64::from(super::PACKETS) / (moves as u64 + 1);
    let stats = thread::scope(|s| -> Result<HostStats, String> {
        let shared = &shared;
        let mut host = s.spawn(move || host_phase(mems[0], shared, None, Some(ready_rx)));
        let mut vcpu = vcpu;
        let mut spare = vcpus.into_iter();
        for k in 0..moves {
            let pause = Arc::new(AtomicBool::new(false));
            let runner = spawn_vcpu(vcpu, pause.clone(), ready_tx.clone());
            let target = step * (k as u64 + 1);
            while shared.checked.load(Ordering::Relaxed) < target
                && !runner.is_finished()
                && !host.is_finished()
            {
                thread::sleep(Duration::from_micros(200));
            }
            // Pre-copy while both sides run: all of memory, then what was written since,
            // until little is.
            dirty_log(all_vms[k], mems[k], true)?;
            dirty_pages(all_vms[k], mems[k])?;
            let all = copy_memory(mems[k], mems[k + 1])? / PAGE;
            let mut passes = vec![Pass {
                pages: all,
                guest: 0,
                host: 0,
            }];
            while passes.len() <= MAX_PASSES {
                let (bits, guest, host) = dirty_pages(all_vms[k], mems[k])?;
                let pages = copy_pages(mems[k], mems[k + 1], &bits)?;
                passes.push(Pass { pages, guest, host });
                if pages <= STOP_PAGES {
                    break;
                }
            }
            let at_packet = shared.checked.load(Ordering::Relaxed);
            let asked = Instant::now();
            pause.store(true, Ordering::Release);
            // A kick that lands before the thread enters `KVM_RUN` is lost; kick until it
            // is out.
            while !runner.is_finished() {
                let _ = runner.kill(kick_signal());
                thread::sleep(Duration::from_micros(50));
            }
            let stopped = runner
                .join()
                .map_err(|_| "the vCPU thread panicked".to_owned())?;
            exits += stopped.exits;
            vcpu = stopped.vcpu;
            if stopped.done {
                break;
            }
            // The host's side stops between two passes (woken if it sleeps on the eventfd)
            // and saves its channel.
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
            let t = Instant::now();
            let (bits, kvm_count, host_count) = dirty_pages(all_vms[k], mems[k])?;
            let final_pages = copy_pages(mems[k], mems[k + 1], &bits)?;
            let copy = t.elapsed();
            // With both sides stopped, the new memory must now equal the old byte for byte:
            // any write the two logs missed shows here (checked outside the downtime).
            let t = Instant::now();
            if let Some(page) = first_difference(mems[k], mems[k + 1])? {
                return Err(format!(
                    "move {k}: guest page {page:#x} differs after the last copy: a write \
                     neither KVM's log nor the bitmap recorded"
                ));
            }
            let checked_in = t.elapsed();
            let t = Instant::now();
            let state = VcpuState::save(&vcpu, &msrs)?;
            let vm_state = VmState::save(all_vms[k])?;
            let next = spare.next().ok_or("no fresh VM left")?;
            vm_state.restore(all_vms[k + 1])?;
            state.restore(&next)?;
            // The doorbells move to the new VM: the old registration goes first (the same
            // eventfds cannot be registered twice at once).
            if let Some(r) = registration.take() {
                r.unregister()
                    .map_err(|e| format!("unregister doorbells: {e}"))?;
            }
            registration = Some(
                bell.register(all_vms[k + 1])
                    .map_err(|e| format!("register doorbells: {e}"))?,
            );
            current.store(k + 1, Ordering::Release);
            let state_time = t.elapsed();
            drop(vcpu);
            vcpu = next;
            // The host's side goes on over the rings in the new memory; restoring its
            // channel signals the guest if the control pages say it is owed a signal.
            let mem = mems[k + 1];
            host = s.spawn(move || host_phase(mem, shared, Some(from), None));
            log.push(Move {
                at_packet,
                stop,
                copy,
                state: state_time,
                downtime: asked.elapsed() - checked_in,
                passes,
                final_pages,
                final_split: (kvm_count, host_count),
            });
        }
        let runner = spawn_vcpu(vcpu, Arc::new(AtomicBool::new(false)), ready_tx.clone());
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
        exits,
        elapsed,
    })
}
