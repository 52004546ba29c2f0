//! A listener under a role-based access policy: the peer identified by its uid, groups and
//! executable (`SO_PEERCRED`, `SO_PEERPIDFD`), allowed exactly the services its roles
//! open; a denied peer told only "not allowed", the operator given the audit line.

use std::thread;
use std::time::Duration;

use vmlink_policy::Policy as Access;
use vmlink_shm::{Guest, Layout, Listener, Policy, RefusalCode, Service, ShmError};

fn services(access: &Access, names: &[&str]) -> Vec<Service> {
    names
        .iter()
        .map(|n| {
            Service::new(*n)
                .with_layout(Layout::symmetric(4 * 4096, 0))
                .with_policy(Policy::roles(access.clone()))
        })
        .collect()
}

/// Connects as a guest of `service` and returns what the host's accept said and what the
/// guest got.
fn attempt(
    listener: &Listener,
    path: &std::path::Path,
    service: &str,
) -> (Result<(), ShmError>, Result<(), ShmError>) {
    let path = path.to_path_buf();
    let name = service.to_owned();
    let guest = thread::spawn(move || Guest::new(&name).connect(&path).map(|_| ()));
    let host = listener.accept_timeout(Duration::from_secs(10)).map(|_| ());
    (host, guest.join().unwrap())
}

#[test]
fn each_principal_kind_opens_exactly_what_its_roles_allow() {
    let me = nix::unistd::geteuid().as_raw();
    let exe = std::env::current_exe().unwrap();
    let groups: Vec<u32> = nix::unistd::getgroups()
        .unwrap()
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    let group = groups
        .first()
        .copied()
        .unwrap_or(nix::unistd::getegid().as_raw());
    let text = format!(
        r#"
[roles.a]
services = ["svc-a"]
[roles.b]
services = ["svc-b"]
[roles.c]
services = ["svc-c"]
[roles.d]
services = ["svc-d"]

[[principals]]
uid = {me}
roles = ["a"]

[[principals]]
exe = "{}"
roles = ["b"]

[[principals]]
gid = {group}
roles = ["c"]

[[principals]]
exe = "/usr/bin/not-this-program"
roles = ["d"]
"#,
        exe.display()
    );
    let access = Access::parse(&text).unwrap();
    let dir = std::env::temp_dir().join(format!("vmlink-access-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("s.sock");
    let listener = Listener::bind_services(
        &path,
        services(&access, &["svc-a", "svc-b", "svc-c", "svc-d"]),
    )
    .unwrap();
    for ok in ["svc-a", "svc-b", "svc-c"] {
        let (host, guest) = attempt(&listener, &path, ok);
        assert!(host.is_ok() && guest.is_ok(), "{ok}: {host:?} {guest:?}");
    }
    let (host, guest) = attempt(&listener, &path, "svc-d");
    match host {
        Err(ShmError::Denied { service, audit }) => {
            assert_eq!(service, "svc-d");
            assert!(
                audit.starts_with(&format!("vmlink-policy: deny uid={me} ")),
                "{audit}"
            );
            assert!(audit.contains(&format!("exe={}", exe.display())), "{audit}");
            assert!(
                audit.contains("no role of the peer (a, b, c) opens svc-d"),
                "{audit}"
            );
        }
        other => panic!("{other:?}"),
    }
    match guest {
        Err(ShmError::Refused { code, message }) => {
            assert_eq!(code, RefusalCode::NotAllowed);
            assert_eq!(message, "not allowed", "the peer learns nothing more");
        }
        other => panic!("{other:?}"),
    }
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_policy_nobody_matches_denies_every_service() {
    let access = Access::parse(
        "[roles.all]\nservices = [\"*\"]\n[[principals]]\nuid = 4294967000\nroles = [\"all\"]\n",
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("vmlink-access-none-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("s.sock");
    let listener = Listener::bind_services(&path, services(&access, &["svc"])).unwrap();
    let (host, guest) = attempt(&listener, &path, "svc");
    assert!(matches!(host, Err(ShmError::Denied { .. })), "{host:?}");
    assert!(
        matches!(
            guest,
            Err(ShmError::Refused {
                code: RefusalCode::NotAllowed,
                ..
            })
        ),
        "{guest:?}"
    );
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}
