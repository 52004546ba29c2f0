//! Moving the test guest's running vCPU into a fresh VM mid-stream: the first step of live
//! migration. The vCPU runs on a thread of its own; to move it, that thread is kicked out
//! of `KVM_RUN` with a signal, the vCPU's whole state (registers, special registers, the
//! XSAVE area with the SSE state, XCRs, debug registers, LAPIC, MP state, events, MSRs) and
//! the VM's (irqchip, clock) are read and written into a new VM made beforehand over the
//! same guest memory, the doorbells are registered with the new VM, and the vCPU runs on.
//! The host's channel keeps serving throughout; the guest is not told.
//!
//! Guest memory is not copied here (both VMs map the same pages), and the host endpoint
//! stays where it is: copying memory with dirty logging and restoring the endpoint from its
//! saved state are the next steps.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use super::{CONTROL, DONE, DOORBELL, GSI, HostStats, MAILBOX, MEM_SIZE, TestVm, pic_irr};
use crate::KvmDoorbell;

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
pub fn fresh_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<(VmFd, VcpuFd), String> {
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

/// One move of the vCPU.
#[derive(Debug, Clone, Copy)]
pub struct Move {
    /// Guest data packets the host had checked when the move began.
    pub at_packet: u64,
    /// From the pause request until the vCPU thread was out of `KVM_RUN`.
    pub stop: Duration,
    /// Reading the vCPU's and VM's state.
    pub save: Duration,
    /// Writing them into the fresh VM and registering the doorbells there.
    pub restore: Duration,
    /// From the pause request until the vCPU ran again in the fresh VM.
    pub downtime: Duration,
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

/// Runs the traffic mode (a `TestVm` made with mode 0) to the guest's `DONE`, moving its
/// vCPU into a fresh VM `moves` times: each time the host has checked about another
/// `PACKETS / (moves + 1)` of the guest's packets.
pub fn run_traffic_moving(tvm: TestVm, moves: usize) -> Result<MovingRun, String> {
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
    let result = moving(&_kvm, vcpu, &vm, &mem, moves);
    // The VMs went in `moving`; the first one and then the memory they mapped go now.
    drop(vm);
    drop(mem);
    result
}

fn moving(
    kvm: &Kvm,
    vcpu: VcpuFd,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    moves: usize,
) -> Result<MovingRun, String> {
    let msrs = movable_msrs(kvm);
    // Every VM is made up front, before the first vCPU runs: they outlive the threads.
    let mut vms = Vec::with_capacity(moves);
    let mut vcpus = Vec::with_capacity(moves);
    for _ in 0..moves {
        let (v, c) = fresh_vm(kvm, mem)?;
        vms.push(v);
        vcpus.push(c);
    }
    let all_vms: Vec<&VmFd> = std::iter::once(vm).chain(vms.iter()).collect();
    let current = AtomicUsize::new(0);
    let progress = AtomicU64::new(0);
    let bell = KvmDoorbell::new(DOORBELL, GSI).map_err(|e| format!("doorbell: {e}"))?;
    let mut registration = Some(
        bell.register(all_vms[0])
            .map_err(|e| format!("register doorbells: {e}"))?,
    );
    let (ready_tx, ready_rx) = mpsc::channel();
    let irr = || pic_irr(all_vms[current.load(Ordering::Acquire)]);
    let start = Instant::now();
    let mut log = Vec::new();
    let mut exits = 0u64;
    let step = u64::from(super::PACKETS) / (moves as u64 + 1);
    let stats = thread::scope(|s| -> Result<HostStats, String> {
        let host = s.spawn(|| super::host_side_with(mem, &irr, &bell, ready_rx, Some(&progress)));
        let mut vcpu = vcpu;
        let mut spare = vcpus.into_iter();
        let mut finished = false;
        for k in 0..moves {
            let pause = Arc::new(AtomicBool::new(false));
            let runner = spawn_vcpu(vcpu, pause.clone(), ready_tx.clone());
            let target = step * (k as u64 + 1);
            while progress.load(Ordering::Relaxed) < target && !runner.is_finished() {
                thread::sleep(Duration::from_micros(200));
            }
            let at_packet = progress.load(Ordering::Relaxed);
            let asked = Instant::now();
            pause.store(true, Ordering::Release);
            // A kick that lands before the thread enters `KVM_RUN` is lost; kick until it
            // is out.
            while !runner.is_finished() {
                let _ = runner.kill(kick_signal());
                thread::sleep(Duration::from_micros(100));
            }
            let stopped = runner
                .join()
                .map_err(|_| "the vCPU thread panicked".to_owned())?;
            exits += stopped.exits;
            if stopped.done {
                vcpu = stopped.vcpu;
                finished = true;
                break;
            }
            let stop = asked.elapsed();
            let t = Instant::now();
            let state = VcpuState::save(&stopped.vcpu, &msrs)?;
            let vm_state = VmState::save(all_vms[k])?;
            let save = t.elapsed();
            let t = Instant::now();
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
            let restore = t.elapsed();
            // Whatever the host rang while the guest was stopped is still pending on the
            // eventfds; the guest polls its rings, so it is owed nothing more.
            drop(stopped.vcpu);
            vcpu = next;
            log.push(Move {
                at_packet,
                stop,
                save,
                restore,
                downtime: asked.elapsed(),
            });
        }
        if !finished {
            let runner = spawn_vcpu(vcpu, Arc::new(AtomicBool::new(false)), ready_tx.clone());
            let stopped = runner
                .join()
                .map_err(|_| "the vCPU thread panicked".to_owned())?;
            exits += stopped.exits;
            if !stopped.done {
                return Err("the vCPU stopped without DONE".into());
            }
        }
        drop(ready_tx);
        host.join()
            .map_err(|_| "the host thread panicked".to_owned())
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
