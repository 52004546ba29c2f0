//! Access control with a real other user: a child process (this test binary again, test
//! `child_role`) drops to uid/gid 65534 before it connects. With the socket directory
//! owner-only (0700) the kernel stops it at the path; with the directory opened up, the
//! host's policy (same uid only) refuses it with a message and sends no fds.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{ChildProcess, child_command, open_fds, remove_dir, role, socket_path, watchdog};
use vmlink_shm::{Guest, Layout, Listener, RefusalCode, Service, ShmError};

const NOBODY: u32 = 65534;
const PATH_ENV: &str = "VMLINK_SHM_TEST_PATH";

/// Drops every privilege to `NOBODY` (groups first, then gid, then uid).
fn become_nobody() {
    use nix::unistd::{Gid, Uid, geteuid, setgid, setgroups, setuid};
    setgroups(&[]).expect("setgroups");
    setgid(Gid::from_raw(NOBODY)).expect("setgid");
    setuid(Uid::from_raw(NOBODY)).expect("setuid");
    assert_eq!(geteuid().as_raw(), NOBODY);
}

#[test]
fn child_role() {
    let Some(role) = role() else { return };
    let _w = watchdog("child", Duration::from_secs(30));
    let path = std::env::var(PATH_ENV).expect("socket path");
    become_nobody();
    let before = open_fds();
    let r = Guest::new("svc")
        .with_handshake_timeout(Duration::from_secs(10))
        .connect(&path);
    match (role.as_str(), r) {
        ("blocked", Err(ShmError::Connect { source, .. })) => {
            assert_eq!(
                source.raw_os_error(),
                Some(nix::errno::Errno::EACCES as i32),
                "{source}"
            );
        }
        ("refused", Err(ShmError::Refused { code, message })) => {
            assert_eq!(code, RefusalCode::NotAllowed);
            assert!(message.contains("uid 65534"), "{message}");
            println!("refusal: {message}");
        }
        (role, other) => panic!("{role}: unexpected outcome {other:?}"),
    }
    assert_eq!(open_fds(), before, "no fd arrived or stayed behind");
}

fn run_child(role: &str, path: &std::path::Path) -> String {
    let mut cmd = child_command("child_role", role);
    cmd.env(PATH_ENV, path);
    let mut child = ChildProcess::new(cmd.spawn().expect("spawn"));
    child.expect_success(Duration::from_secs(20));
    child.stdout().to_owned()
}

#[test]
fn another_users_guest_is_stopped_and_refused() {
    if role().is_some() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: needs root to run a child as another user");
        return;
    }
    let _w = watchdog("credentials", Duration::from_secs(40));
    let path = socket_path("creds");
    let service = Service::new("svc").with_layout(Layout::symmetric(4096, 0));
    let listener = Listener::bind(&path, service).unwrap();

    // The directory is 0700: another user cannot even reach the socket.
    run_child("blocked", &path);
    assert!(matches!(
        listener.accept_timeout(Duration::from_millis(100)),
        Err(ShmError::AcceptTimedOut(_))
    ));

    // Opened up (as a careless administrator might), the policy still refuses.
    let dir = path.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run_child("refused", &path);
    assert!(out.contains("refusal: peer pid"), "{out}");
    match listener.accept_timeout(Duration::from_secs(5)) {
        Err(ShmError::NotAllowed { peer, service }) => {
            assert_eq!((peer.uid, peer.gid), (NOBODY, NOBODY));
            assert_eq!(service, "svc");
        }
        other => panic!("{other:?}"),
    }
    drop(listener);
    remove_dir(&path);
}
