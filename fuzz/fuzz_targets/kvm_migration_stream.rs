//! A KVM migration stream from a hostile source, read as the destination reads it
//! (`read_header`, then `read_state`: pages, VM, vCPU and endpoint state, the end), into a
//! sink that stands for the fresh VM.
//!
//! Asserted: nothing panics; every page handed to the sink is page-aligned, whole and
//! inside the guest memory the header declared; a stream that is accepted has its page
//! total equal to the pages that came.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlink_kvm::test_vm::moving::{Sink, VcpuState, VmState, read_state};
use vmlink_kvm::test_vm::stream::{self, PAGE, StreamError};

struct Counting {
    memory: u64,
    pages: u64,
}

impl Sink for Counting {
    fn page(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), StreamError> {
        assert!(gpa.is_multiple_of(PAGE as u64) && gpa < self.memory, "{gpa:#x}");
        assert_eq!(bytes.len(), PAGE);
        self.pages += 1;
        Ok(())
    }

    fn vm(&mut self, _: VmState) -> Result<(), StreamError> {
        Ok(())
    }

    fn vcpu(&mut self, _: VcpuState) -> Result<(), StreamError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // Half the inputs get a valid header (16 pages of memory), so the records themselves
    // are explored; the rest are read whole, header included.
    let (with_header, rest) = match data.split_first() {
        Some((flag, rest)) => (flag & 1 == 1, rest),
        None => return,
    };
    let mut stream_bytes = Vec::new();
    if with_header {
        stream::write_header(&mut stream_bytes, 16 * PAGE as u64).unwrap();
    }
    stream_bytes.extend_from_slice(rest);
    let mut r = &stream_bytes[..];
    let Ok(memory) = stream::read_header(&mut r) else {
        return;
    };
    let mut sink = Counting { memory, pages: 0 };
    let mut buf = Vec::new();
    if let Ok(state) = read_state(&mut r, memory, &mut sink, &mut buf) {
        assert_eq!(state.pages, sink.pages);
    }
});
