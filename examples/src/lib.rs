//! Runnable vmlink examples; the code is in `examples/`:
//!
//! - `kvm_demo`: boots the bare-metal test guest in a KVM VM and moves ~100k packets both
//!   ways through rings in its memory (`cargo run --release -p vmlink-examples --example
//!   kvm_demo`; needs a usable `/dev/kvm`).
