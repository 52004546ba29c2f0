//! `vmlink keygen` and `vmlink serve / connect --secure`, used as a user would: keys made,
//! a file moved through a secure channel intact, and every wrong key, cipher, flag and key
//! file refused with a clear message while the server keeps serving.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vmlink() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmlink"))
}

fn keygen(path: &Path) {
    let out = vmlink().arg("keygen").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(said.contains("fingerprint SHA256:"), "{said}");
}

fn connect(sock: &Path, key: &Path, peers: &Path, extra: &[&str]) -> Output {
    vmlink()
        .args(["connect", "--socket"])
        .arg(sock)
        .args(["--secure", "--key"])
        .arg(key)
        .arg("--peer-keys")
        .arg(peers)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn serve(sock: &Path, key: &Path, peers: &Path, data: &[u8]) -> Child {
    // From a file: the server reads its stdin only once a client is in.
    let input = sock.with_extension("in");
    fs::write(&input, data).unwrap();
    let child = vmlink()
        .args(["serve", "--socket"])
        .arg(sock)
        .args(["--secure", "--key"])
        .arg(key)
        .arg("--peer-keys")
        .arg(peers)
        .stdin(fs::File::open(&input).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(sock);
    child
}

#[test]
fn a_file_crosses_a_secure_channel_and_wrong_keys_are_turned_away() {
    let dir = common::private_dir("secure");
    let (host, guest, stranger) = (dir.join("host"), dir.join("guest"), dir.join("stranger"));
    for k in [&host, &guest, &stranger] {
        keygen(k);
    }
    let mode = fs::metadata(&host).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let data = common::data(17, 3 << 20);
    let sock = dir.join("s.sock");
    let server = serve(&sock, &host, &guest.with_extension("pub"), &data);

    // Turned away, each with exit status 2 and a reason; the server keeps listening.
    let host_pub = dir.join("host.pub");
    let cases: [(&Path, &Path, &[&str], &str); 3] = [
        (
            &guest,
            &guest.with_extension("pub"),
            &[],
            "is not authorized",
        ),
        (&stranger, &host_pub, &[], "refused this side"),
        (&guest, &host_pub, &["--cipher", "aes"], "refused this side"),
    ];
    for (key, peers, extra, why) in cases {
        let out = connect(&sock, key, peers, extra);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{extra:?}: {err}");
    }

    let out = connect(&sock, &guest, &host_pub, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == data, "the file arrived intact");
    let server = server.wait_with_output().unwrap();
    assert!(server.status.success());
    let log = String::from_utf8_lossy(&server.stderr);
    assert_eq!(
        log.matches("refused a client (secure handshake").count(),
        3,
        "{log}"
    );
    assert!(log.contains("is not authorized"), "{log}");
    assert!(log.contains("speaks Noise_XX_25519_AESGCM_SHA256"), "{log}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn wrong_flags_and_key_files_are_refused_before_anything_listens() {
    let dir = common::private_dir("secure-flags");
    let key = dir.join("k");
    keygen(&key);
    let sock = dir.join("s.sock");
    let run = |args: &[&str]| vmlink().args(args).stdin(Stdio::null()).output().unwrap();
    let s = sock.to_str().unwrap();
    let k = key.to_str().unwrap();
    let p = dir.join("k.pub");
    let p = p.to_str().unwrap();

    // clap: --secure without keys, keys without --secure, --take-over with --secure.
    for args in [
        vec!["serve", "--socket", s, "--secure"],
        vec!["connect", "--socket", s, "--key", k, "--peer-keys", p],
        vec![
            "serve",
            "--socket",
            s,
            "--take-over",
            "--secure",
            "--key",
            k,
            "--peer-keys",
            p,
        ],
    ] {
        assert_eq!(run(&args).status.code(), Some(2), "{args:?}");
    }
    // A private key others may read.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    let out = run(&[
        "serve",
        "--socket",
        s,
        "--secure",
        "--key",
        k,
        "--peer-keys",
        p,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    // A peer-keys file that is not one, or lists nobody.
    let bad = dir.join("bad.pub");
    fs::write(&bad, "# guests\nssh-ed25519 AAAAC3Nza\n").unwrap();
    let out = run(&[
        "serve",
        "--socket",
        s,
        "--secure",
        "--key",
        k,
        "--peer-keys",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.pub:2: not a vmlink-secure public key line"),
        "{err}"
    );
    fs::write(&bad, "# nobody yet\n").unwrap();
    let out = run(&[
        "serve",
        "--socket",
        s,
        "--secure",
        "--key",
        k,
        "--peer-keys",
        bad.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("lists no key"));
    // A private key given as the peer keys, and the reverse.
    let out = run(&[
        "serve",
        "--socket",
        s,
        "--secure",
        "--key",
        p,
        "--peer-keys",
        p,
    ]);
    assert_eq!(out.status.code(), Some(2));
    // keygen never replaces a key.
    let out = run(&["keygen", k]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("File exists"));
    assert!(!sock.exists(), "nothing listened");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn over_a_stream_socket_a_refused_client_costs_only_itself() {
    let dir = common::private_dir("secure-stream");
    let (host, guest, stranger) = (dir.join("host"), dir.join("guest"), dir.join("stranger"));
    for k in [&host, &guest, &stranger] {
        keygen(k);
    }
    let data = common::data(23, 1 << 20);
    let input = dir.join("in");
    fs::write(&input, &data).unwrap();
    let sock = dir.join("stream.sock");
    let server = vmlink()
        .args(["serve", "--unix-stream"])
        .arg(&sock)
        .args(["--secure", "--pattern", "ik", "--cipher", "aes", "--key"])
        .arg(&host)
        .arg("--peer-keys")
        .arg(guest.with_extension("pub"))
        .stdin(fs::File::open(&input).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&sock);
    let client = |key: &Path| {
        vmlink()
            .args(["connect", "--unix-stream"])
            .arg(&sock)
            .args(["--secure", "--pattern", "ik", "--cipher", "aes", "--key"])
            .arg(key)
            .arg("--peer-keys")
            .arg(dir.join("host.pub"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    assert_eq!(client(&stranger).status.code(), Some(2));
    let out = client(&guest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == data);
    let log = server.wait_with_output().unwrap();
    assert!(log.status.success());
    let log = String::from_utf8_lossy(&log.stderr);
    assert!(log.contains("is not authorized); still listening"), "{log}");
    let _ = fs::remove_dir_all(&dir);
}

/// The fingerprint `vmlink keygen` printed for a key, read back from its `.pub` line.
fn fingerprint(public: &Path) -> String {
    let line = fs::read_to_string(public).unwrap();
    vmlink_secure::PublicKey::from_line(line.trim())
        .unwrap()
        .fingerprint()
}

#[test]
fn a_policy_can_grant_by_key_once_the_secure_handshake_has_proven_it() {
    let dir = common::private_dir("secure-policy");
    let (host, guest, stranger) = (dir.join("host"), dir.join("guest"), dir.join("stranger"));
    for k in [&host, &guest, &stranger] {
        keygen(k);
    }
    // Both keys pass the secure handshake; the policy grants only the guest's.
    let peers = dir.join("peers.pub");
    fs::write(
        &peers,
        fs::read_to_string(dir.join("guest.pub")).unwrap()
            + &fs::read_to_string(dir.join("stranger.pub")).unwrap(),
    )
    .unwrap();
    let policy = dir.join("policy.toml");
    fs::write(
        &policy,
        format!(
            "[roles.pipe]\nservices = [\"vmlink-pipe\"]\n\n[[principals]]\nkey = \"{}\"\nroles = [\"pipe\"]\n",
            fingerprint(&dir.join("guest.pub"))
        ),
    )
    .unwrap();
    let data = common::data(29, 1 << 20);
    let input = dir.join("in");
    fs::write(&input, &data).unwrap();
    let sock = dir.join("s.sock");
    let server = vmlink()
        .args(["serve", "--socket"])
        .arg(&sock)
        .args(["--secure", "--key"])
        .arg(&host)
        .arg("--peer-keys")
        .arg(&peers)
        .arg("--policy")
        .arg(&policy)
        .stdin(fs::File::open(&input).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&sock);
    let host_pub = dir.join("host.pub");
    let denied = connect(&sock, &stranger, &host_pub, &[]);
    assert_eq!(denied.status.code(), Some(2));
    let out = connect(&sock, &guest, &host_pub, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == data);
    let log = server.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&log.stderr);
    assert!(log.contains("vmlink-policy: deny uid="), "{log}");
    assert!(
        log.contains(&format!("key={} ", fingerprint(&dir.join("stranger.pub")))),
        "{log}"
    );
    assert!(
        log.contains("vmlink-pipe open: no principal of the policy matches the peer"),
        "{log}"
    );
    let _ = fs::remove_dir_all(&dir);
}
