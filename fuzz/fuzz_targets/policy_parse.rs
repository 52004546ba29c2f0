//! A role-based access policy file as an operator (or an attacker who can write it) may
//! have written it: the input's text, parsed by `vmlink_policy::Policy::parse`, then asked
//! about a few peers.
//!
//! Asserted:
//! - the parser never panics; a refusal names a line within the text (or 0) and says why;
//! - an accepted policy decides without panicking, and one with no principals denies
//!   everyone;
//! - deciding is consistent: whatever `decide` allows for an operation, it also allows
//!   opening that service.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlink_policy::{Peer, Policy, PolicyError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match Policy::parse(text) {
        Ok(p) => p,
        Err(PolicyError::Invalid { line, message, .. }) => {
            assert!(line <= text.lines().count() + 1, "line {line} past the text");
            assert!(!message.is_empty());
            return;
        }
        Err(e) => panic!("parsing text gave {e}"),
    };
    if policy.principals() == 0 {
        let root = Peer {
            uid: 0,
            gids: vec![0],
            ..Peer::default()
        };
        assert!(!policy.decide(&root, "vmlink-ic", None).allowed());
    }
    for uid in [0, 1000] {
        let peer = Peer {
            uid,
            gids: vec![uid, 27],
            exe: Some("/usr/local/bin/vmlink".into()),
            key: None,
            pid: Some(1),
        };
        for service in ["vmlink-ic", "vmlink-pipe", "*"] {
            for op in ["kvp.read", "shutdown", "*"] {
                let d = policy.decide(&peer, service, Some(op));
                assert!(!d.audit_line().is_empty());
                if d.allowed() {
                    assert!(policy.decide(&peer, service, None).allowed());
                }
            }
        }
        let _ = policy.explain(&peer);
    }
});
