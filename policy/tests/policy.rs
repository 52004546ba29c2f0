//! Each rule kind allows and denies as written; a malformed policy is refused at load with
//! its line named.

use std::path::PathBuf;

use vmlink_policy::{Peer, Policy, PolicyError};

const POLICY: &str = r#"
[roles.reader]
services = ["vmlink-ic"]
operations = ["heartbeat", "time", "kvp.read"]

[roles.writer]
services = ["vmlink-ic"]
operations = ["kvp.write", "kvp.delete"]

[roles.admin]
services = ["*"]
operations = ["*"]

[roles.pipe]
services = ["vmlink-pipe"]

[[principals]]
uid = 0
roles = ["admin"]

[[principals]]
gid = 27
roles = ["reader"]

[[principals]]
uid = 1000
gid = 1001
roles = ["writer", "reader"]

[[principals]]
exe = "/usr/local/bin/vmlink"
roles = ["pipe"]

[[principals]]
key = "SHA256:078aa180f37cd5f10f009e5cf01ea6e7"
roles = ["writer"]
"#;

fn peer(uid: u32, gids: &[u32]) -> Peer {
    Peer {
        uid,
        gids: gids.to_vec(),
        ..Peer::default()
    }
}

#[test]
fn each_rule_kind_allows_and_denies_as_written() {
    let p = Policy::parse(POLICY).unwrap();
    let yes = |peer: &Peer, s: &str, o: Option<&str>| p.decide(peer, s, o).allowed();

    // uid: root is admin of everything.
    assert!(yes(&peer(0, &[0]), "anything", Some("shutdown")));
    // gid: any of the peer's groups, supplementary ones included.
    let member = peer(500, &[500, 27]);
    assert!(yes(&member, "vmlink-ic", None));
    assert!(yes(&member, "vmlink-ic", Some("kvp.read")));
    assert!(!yes(&member, "vmlink-ic", Some("kvp.write")));
    assert!(!yes(&member, "vmlink-ic", Some("shutdown")));
    assert!(
        !yes(&member, "vmlink-pipe", None),
        "the reader role opens only vmlink-ic"
    );
    // uid and gid together: both must match.
    assert!(yes(&peer(1000, &[1001]), "vmlink-ic", Some("kvp.write")));
    assert!(
        yes(&peer(1000, &[1001]), "vmlink-ic", Some("heartbeat")),
        "its second role"
    );
    assert!(
        !yes(&peer(1000, &[1000]), "vmlink-ic", None),
        "uid 1000 without group 1001"
    );
    assert!(
        !yes(&peer(1002, &[1001]), "vmlink-ic", None),
        "group 1001 without uid 1000"
    );
    // exe.
    let mut prog = peer(2000, &[2000]);
    assert!(!yes(&prog, "vmlink-pipe", None));
    prog.exe = Some(PathBuf::from("/usr/local/bin/vmlink"));
    assert!(yes(&prog, "vmlink-pipe", None));
    assert!(
        !yes(&prog, "vmlink-pipe", Some("kvp.read")),
        "a role with no operations"
    );
    prog.exe = Some(PathBuf::from("/tmp/vmlink"));
    assert!(
        !yes(&prog, "vmlink-pipe", None),
        "another file of the same name"
    );
    // key fingerprint.
    let keyed = peer(3000, &[3000]).with_key("SHA256:078aa180f37cd5f10f009e5cf01ea6e7");
    assert!(yes(&keyed, "vmlink-ic", Some("kvp.write")));
    assert!(!yes(&keyed, "vmlink-ic", Some("kvp.read")));
    let other = peer(3000, &[3000]).with_key("SHA256:00000000000000000000000000000000");
    assert!(!yes(&other, "vmlink-ic", None));
    // Nobody: default deny, with the reason for the operator.
    let d = p.decide(&peer(4000, &[4000]), "vmlink-ic", None);
    assert!(!d.allowed());
    assert_eq!(d.reason(), "no principal of the policy matches the peer");
    let line = d.audit_line();
    assert!(
        line.starts_with("vmlink-policy: deny uid=4000 gids=4000"),
        "{line}"
    );
    assert!(line.contains("vmlink-ic open"), "{line}");
    let d = p.decide(&member, "vmlink-ic", Some("shutdown"));
    assert_eq!(
        d.reason(),
        "no role of the peer (reader) grants shutdown in vmlink-ic"
    );
    let d = p.decide(&member, "vmlink-ic", Some("kvp.read"));
    assert!(
        d.reason()
            .contains("role reader of the principal on line 21 (gid 27)"),
        "{}",
        d.reason()
    );
}

#[test]
fn an_empty_policy_denies_everything() {
    let p = Policy::parse("").unwrap();
    assert!(!p.decide(&peer(0, &[0]), "vmlink-ic", None).allowed());
}

fn refused(text: &str) -> (usize, String) {
    match Policy::parse(text) {
        Err(PolicyError::Invalid { line, message, .. }) => (line, message),
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_policies_are_refused_with_the_line_named() {
    let (line, m) =
        refused("[roles.a]\nservices = [\"x\"]\n\n[[principals]]\nuid = 1\nroles = [\"b\"]\n");
    assert_eq!((line, m.as_str()), (4, "role \"b\" is not defined"));
    let (line, m) = refused("[roles.a]\n\n[[principals]]\nroles = [\"a\"]\n");
    assert_eq!(line, 3);
    assert!(m.contains("would match everyone"), "{m}");
    let (line, m) = refused("[roles.a]\nservice = [\"x\"]\n");
    assert_eq!(line, 2, "{m}");
    assert!(m.contains("unknown field"), "{m}");
    let (line, m) = refused("[roles.a]\nservices = \"x\"\n");
    assert_eq!(line, 2, "{m}");
    let (line, _) = refused("[roles.a\n");
    assert_eq!(line, 1);
    let (line, m) = refused("[roles.a]\n[[principals]]\nuid = -1\nroles = [\"a\"]\n");
    assert_eq!(line, 3, "{m}");
    let (line, m) = refused("[roles.a]\n[[principals]]\nexe = \"vmlink\"\nroles = [\"a\"]\n");
    assert_eq!((line, m.contains("absolute")), (2, true), "{m}");
    let (_, m) = refused("[roles.a]\n[[principals]]\nkey = \"078aa180\"\nroles = [\"a\"]\n");
    assert!(m.contains("fingerprint"), "{m}");
    let (_, m) = refused("[roles.A]\n");
    assert!(m.contains("role name"), "{m}");
    let (_, m) = refused("[roles.a]\noperations = [\"KVP read\"]\n");
    assert!(m.contains("operation"), "{m}");
    let (_, m) = refused("[roles.a]\n[[principals]]\nuid = 1\nroles = []\n");
    assert!(m.contains("no roles"), "{m}");
    let (line, m) = refused("surprise = 1\n");
    assert_eq!(line, 1, "{m}");
}

#[test]
fn explain_says_what_a_peer_may_do() {
    let p = Policy::parse(POLICY).unwrap();
    let text = p.explain(&peer(1000, &[1001, 27]));
    assert!(
        text.contains("matches the principal on line 21 (gid 27)"),
        "{text}"
    );
    assert!(
        text.contains("role writer: opens vmlink-ic; may kvp.write, kvp.delete"),
        "{text}"
    );
    let nobody = p.explain(&peer(9, &[9]));
    assert!(nobody.contains("everything is denied"), "{nobody}");
}
