//! The conformance suite on the in-process pair: two threads, heap rings, the in-process
//! doorbell.

use std::sync::Arc;

use vmlink_channel::conformance::{Pair, PairFactory, run_all};
use vmlink_channel::{Channel, Config, InProcessDoorbell, in_process_pair};
use vmlink_ring::{ControlWord, HeapMem, RingMem};

struct InProcess;

impl PairFactory for InProcess {
    type Mem = Arc<HeapMem>;
    type Bell = InProcessDoorbell;

    fn pair_with(
        &self,
        len: usize,
        config_a: Config,
        config_b: Config,
    ) -> Pair<Self::Mem, Self::Bell> {
        let a_to_b = Arc::new(HeapMem::new(len).expect("ring"));
        let b_to_a = Arc::new(HeapMem::new(len).expect("ring"));
        let (da, db) = in_process_pair();
        let a = Channel::new(a_to_b.clone(), b_to_a.clone(), da, config_a).expect("a");
        let b = Channel::new(b_to_a.clone(), a_to_b, db, config_b).expect("b");
        Pair {
            a,
            b,
            corrupt_b_to_a: Box::new(move || b_to_a.store_control(ControlWord::WriteIndex, 13)),
        }
    }
}

#[test]
fn in_process_pair_conforms() {
    run_all(&InProcess);
}
