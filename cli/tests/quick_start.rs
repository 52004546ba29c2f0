//! The README's quick start, run as a test: a host and a guest exchange a request and its
//! completion over vmlink-shm. `readme_shows_this_code` keeps the two in step: every line
//! of the README's block must appear here, in order (whitespace aside).

use std::error::Error;

#[test]
fn quick_start() -> Result<(), Box<dyn Error + Send + Sync>> {
    // README quick start begins
    #[allow(
        unused_imports,
        reason = "the README's block needs it; here it is in scope"
    )]
    use std::error::Error;
    use std::thread;
    use vmlink_shm::{Guest, Listener, Service};

    // The host listens on a socket in a directory only its user can enter.
    let dir = std::env::temp_dir().join(format!("vmlink-quick-start-{}", std::process::id()));
    let path = dir.join("echo.sock");
    let listener = Listener::bind(&path, Service::new("echo"))?;

    // The guest: any process of the same user (here a thread) connects and calls.
    let guest = thread::spawn(move || -> Result<Vec<u8>, Box<dyn Error + Send + Sync>> {
        let guest = Guest::new("echo").connect(&path)?;
        let mut reply = [0u8; 64];
        let len = guest.channel().call(b"ping", &mut reply, None)?; // request, then completion
        Ok(reply[..len].to_vec())
    });

    // The host accepts it, receives the request and completes it.
    let host = listener.accept()?;
    let mut buf = [0u8; 64];
    let request = host.channel().recv(&mut buf, None)?;
    assert!(request.completion_requested);
    assert_eq!(&request.payload(&buf)[..4], b"ping");
    host.channel()
        .complete(request.transaction_id, b"pong", None)?;

    let reply = guest.join().unwrap()?;
    assert_eq!(reply, b"pong\0\0\0\0"); // VMBus pads payloads to 8 bytes
    drop(listener); // removes the socket
    std::fs::remove_dir(&dir)?;
    // README quick start ends
    Ok(())
}

#[test]
fn readme_shows_this_code() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("## Quick start")
        .expect("a Quick start section");
    let block = &readme[start..];
    let block = &block[block.find("```rust\n").expect("a rust block") + 8..];
    let block = &block[..block.find("```").expect("the block's end")];
    let source = include_str!("quick_start.rs");
    let ours = &source[source.find("// README quick start begins").unwrap()
        ..source.find("// README quick start ends").unwrap()];
    // Compared without whitespace, so rustfmt's line breaks do not matter.
    let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    let ours = squash(ours);
    let mut at = 0;
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let line = squash(line);
        match ours[at..].find(&line) {
            Some(i) => at += i + line.len(),
            None => panic!("README line not in the test (or out of order): {line}"),
        }
    }
}
