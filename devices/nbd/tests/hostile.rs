//! The client against fake servers on a socket pair that break the protocol in every way
//! the client checks: each is a specific `NbdError`, with no panic and no hang.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmlink_nbd::{ConnectOptions, NbdClient, NbdError, proto};

const SIZE: u64 = 1 << 20;
const FLAGS: u16 = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_SEND_TRIM;

/// Options with a timeout short enough that a hang fails the test quickly.
fn options(timeout_ms: u64) -> ConnectOptions {
    ConnectOptions {
        max_in_flight: 8,
        timeout: Some(Duration::from_millis(timeout_ms)),
    }
}

/// Runs `script` as the server on the other end of a socket pair. The script's I/O
/// errors (the client hanging up first) are ignored.
fn fake(
    script: impl FnOnce(&mut UnixStream) -> std::io::Result<()> + Send + 'static,
) -> (UnixStream, JoinHandle<()>) {
    let (client, mut server) = UnixStream::pair().expect("socketpair");
    let thread = std::thread::spawn(move || {
        let _ = script(&mut server);
    });
    (client, thread)
}

fn connect(client: UnixStream) -> Result<NbdClient, NbdError> {
    NbdClient::connect_stream_with(client, "export", &options(5_000))
}

/// Waits until the client closes its end.
fn wait_for_close(s: &mut UnixStream) -> std::io::Result<()> {
    let mut sink = [0u8; 4096];
    while s.read(&mut sink)? > 0 {}
    Ok(())
}

/// Sends the fixed newstyle greeting with `flags` and reads the client's flags.
fn greet(s: &mut UnixStream, flags: u16) -> std::io::Result<u32> {
    s.write_all(&proto::NBDMAGIC.to_be_bytes())?;
    s.write_all(&proto::IHAVEOPT.to_be_bytes())?;
    s.write_all(&flags.to_be_bytes())?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads one option; gives its number and data.
fn read_option(s: &mut UnixStream) -> std::io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h)?;
    assert_eq!(
        u64::from_be_bytes(h[0..8].try_into().unwrap()),
        proto::IHAVEOPT
    );
    let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((option, data))
}

fn opt_reply(s: &mut UnixStream, option: u32, reply_type: u32, data: &[u8]) -> std::io::Result<()> {
    let mut r = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend(option.to_be_bytes());
    r.extend(reply_type.to_be_bytes());
    r.extend((data.len() as u32).to_be_bytes());
    r.extend(data);
    s.write_all(&r)
}

fn export_info(size: u64, flags: u16) -> Vec<u8> {
    let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
    info.extend(size.to_be_bytes());
    info.extend(flags.to_be_bytes());
    info
}

/// A whole good handshake: greeting, NBD_OPT_GO answered with the export's info.
fn handshake(s: &mut UnixStream, size: u64, flags: u16) -> std::io::Result<()> {
    greet(s, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES)?;
    let (option, data) = read_option(s)?;
    assert_eq!(option, proto::OPT_GO);
    assert_eq!(&data[4..data.len() - 2], b"export");
    assert_eq!(&data[data.len() - 2..], &[0, 0], "no information requests");
    opt_reply(s, proto::OPT_GO, proto::REP_INFO, &export_info(size, flags))?;
    opt_reply(s, proto::OPT_GO, proto::REP_ACK, &[])
}

/// Reads one request (and a write's payload); gives type, handle, offset and length.
fn read_request(s: &mut UnixStream) -> std::io::Result<(u16, u64, u64, u32)> {
    let mut r = [0u8; 28];
    s.read_exact(&mut r)?;
    assert_eq!(
        u32::from_be_bytes(r[0..4].try_into().unwrap()),
        proto::REQUEST_MAGIC
    );
    let kind = u16::from_be_bytes(r[6..8].try_into().unwrap());
    let handle = u64::from_be_bytes(r[8..16].try_into().unwrap());
    let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
    let len = u32::from_be_bytes(r[24..28].try_into().unwrap());
    if kind == proto::CMD_WRITE {
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload)?;
    }
    Ok((kind, handle, offset, len))
}

fn reply_header(magic: u32, error: u32, handle: u64) -> Vec<u8> {
    let mut r = magic.to_be_bytes().to_vec();
    r.extend(error.to_be_bytes());
    r.extend(handle.to_be_bytes());
    r
}

fn simple_reply(s: &mut UnixStream, error: u32, handle: u64, data: &[u8]) -> std::io::Result<()> {
    s.write_all(&reply_header(proto::SIMPLE_REPLY_MAGIC, error, handle))?;
    s.write_all(data)
}

/// Connects through a good handshake and runs `script` for the transmission phase.
fn transmission(
    script: impl FnOnce(&mut UnixStream) -> std::io::Result<()> + Send + 'static,
) -> (NbdClient, JoinHandle<()>) {
    let (client, thread) = fake(move |s| {
        handshake(s, SIZE, FLAGS)?;
        script(s)
    });
    (connect(client).expect("handshake"), thread)
}

// ---- handshake ----

#[test]
fn bad_greeting_magic() {
    let (client, thread) = fake(|s| s.write_all(b"HTTP/1.1 200 OK\r\n\r\n"));
    match connect(client) {
        Err(NbdError::BadMagic { context, found, .. }) => {
            assert_eq!(context, "server greeting");
            assert_eq!(found, u64::from_be_bytes(*b"HTTP/1.1"));
        }
        other => panic!("{other:?}"),
    }
    thread.join().unwrap();
}

#[test]
fn bad_second_magic_and_oldstyle() {
    let (client, thread) = fake(|s| {
        s.write_all(&proto::NBDMAGIC.to_be_bytes())?;
        s.write_all(&0x1234u64.to_be_bytes())
    });
    assert!(matches!(
        connect(client),
        Err(NbdError::BadMagic { found: 0x1234, .. })
    ));
    thread.join().unwrap();

    let (client, thread) = fake(|s| {
        s.write_all(&proto::NBDMAGIC.to_be_bytes())?;
        s.write_all(&proto::CLISERV_MAGIC.to_be_bytes())?;
        wait_for_close(s)
    });
    assert!(matches!(connect(client), Err(NbdError::OldstyleServer)));
    thread.join().unwrap();
}

#[test]
fn server_without_fixed_newstyle_is_refused() {
    let (client, thread) = fake(|s| {
        s.write_all(&proto::NBDMAGIC.to_be_bytes())?;
        s.write_all(&proto::IHAVEOPT.to_be_bytes())?;
        s.write_all(&0u16.to_be_bytes())?;
        wait_for_close(s)
    });
    assert!(matches!(
        connect(client),
        Err(NbdError::NotFixedNewstyle { flags: 0 })
    ));
    thread.join().unwrap();
}

#[test]
fn client_flags_follow_the_server() {
    for (server_flags, expected) in [
        (proto::FLAG_FIXED_NEWSTYLE, proto::FLAG_C_FIXED_NEWSTYLE),
        (
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
            proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES,
        ),
    ] {
        let (client, thread) = fake(move |s| {
            let got = greet(s, server_flags)?;
            assert_eq!(got, expected);
            read_option(s).map(drop)
        });
        assert!(matches!(connect(client), Err(NbdError::Eof { .. })));
        thread.join().unwrap();
    }
}

#[test]
fn eof_mid_handshake() {
    // Part of the greeting, then the server goes away.
    let (client, thread) = fake(|s| s.write_all(b"NBDMAGICIHA"));
    match connect(client) {
        Err(NbdError::Eof { context }) => assert!(context.contains("greeting"), "{context}"),
        other => panic!("{other:?}"),
    }
    thread.join().unwrap();

    // Part of an option reply's data.
    let (client, thread) = fake(|s| {
        greet(s, proto::FLAG_FIXED_NEWSTYLE)?;
        read_option(s)?;
        let mut r = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend(proto::OPT_GO.to_be_bytes());
        r.extend(proto::REP_INFO.to_be_bytes());
        r.extend(12u32.to_be_bytes());
        r.extend([0, 0, 0, 0]);
        s.write_all(&r)
    });
    match connect(client) {
        Err(NbdError::Eof { context }) => assert!(context.contains("option reply"), "{context}"),
        other => panic!("{other:?}"),
    }
    thread.join().unwrap();
}

#[test]
fn oversized_option_reply_is_refused_without_reading_it() {
    let (client, thread) = fake(|s| {
        greet(s, proto::FLAG_FIXED_NEWSTYLE)?;
        read_option(s)?;
        let mut r = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend(proto::OPT_GO.to_be_bytes());
        r.extend(proto::REP_INFO.to_be_bytes());
        r.extend(0xffff_fff0u32.to_be_bytes());
        s.write_all(&r)?;
        // Never send the 4 GiB: the client must not wait for them.
        wait_for_close(s)
    });
    let started = Instant::now();
    match connect(client) {
        Err(NbdError::OptionReplyTooLong { len, limit }) => {
            assert_eq!(len, 0xffff_fff0);
            assert_eq!(limit, vmlink_nbd::MAX_OPTION_REPLY_LEN);
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    thread.join().unwrap();
}

#[test]
fn option_reply_with_bad_magic_or_for_another_option() {
    let (client, thread) = fake(|s| {
        greet(s, proto::FLAG_FIXED_NEWSTYLE)?;
        read_option(s)?;
        s.write_all(&[0xaa; 20])?;
        wait_for_close(s)
    });
    match connect(client) {
        Err(NbdError::BadMagic { context, .. }) => assert_eq!(context, "option reply"),
        other => panic!("{other:?}"),
    }
    thread.join().unwrap();

    let (client, thread) = fake(|s| {
        greet(s, proto::FLAG_FIXED_NEWSTYLE)?;
        read_option(s)?;
        opt_reply(s, 3, proto::REP_ACK, &[])?;
        wait_for_close(s)
    });
    assert!(matches!(
        connect(client),
        Err(NbdError::UnexpectedOptionReply {
            expected: 7,
            option: 3,
            ..
        })
    ));
    thread.join().unwrap();

    // A reply type that has no place in NBD_OPT_GO's answer (NBD_REP_SERVER).
    let (client, thread) = fake(|s| {
        greet(s, proto::FLAG_FIXED_NEWSTYLE)?;
        read_option(s)?;
        opt_reply(s, proto::OPT_GO, 2, b"\0\0\0\0")?;
        wait_for_close(s)
    });
    assert!(matches!(
        connect(client),
        Err(NbdError::UnexpectedOptionReply { reply_type: 2, .. })
    ));
    thread.join().unwrap();
}

#[test]
fn error_reply_names_the_error_and_the_client_aborts_softly() {
    let (client, thread) = fake(|s| {
        greet(s, proto::FLAG_FIXED_NEWSTYLE)?;
        read_option(s)?;
        opt_reply(
            s,
            proto::OPT_GO,
            proto::REP_ERR_POLICY,
            b"not for you\x1b[31m",
        )?;
        let (option, data) = read_option(s)?;
        assert_eq!(
            (option, data.len()),
            (proto::OPT_ABORT, 0),
            "NBD_OPT_ABORT after the error"
        );
        wait_for_close(s)
    });
    match connect(client) {
        Err(e @ NbdError::OptionRefused { .. }) => {
            let text = e.to_string();
            assert!(text.contains("NBD_REP_ERR_POLICY"), "{text}");
            assert!(text.contains("not for you"), "{text}");
            assert!(
                !text.contains('\x1b'),
                "control characters are escaped: {text}"
            );
            let NbdError::OptionRefused { code, export, .. } = e else {
                unreachable!()
            };
            assert_eq!(code, proto::REP_ERR_POLICY);
            assert_eq!(export, "export");
        }
        other => panic!("{other:?}"),
    }
    thread.join().unwrap();
}

#[test]
fn ack_without_export_info() {
    let (client, thread) = fake(|s| {
        greet(s, proto::FLAG_FIXED_NEWSTYLE)?;
        read_option(s)?;
        // Only information the client does not need, then the ACK.
        let mut name = 1u16.to_be_bytes().to_vec();
        name.extend(b"export");
        opt_reply(s, proto::OPT_GO, proto::REP_INFO, &name)?;
        opt_reply(s, proto::OPT_GO, proto::REP_ACK, &[])?;
        wait_for_close(s)
    });
    assert!(matches!(connect(client), Err(NbdError::MissingExportInfo)));
    thread.join().unwrap();
}

#[test]
fn endless_info_replies_are_cut_off() {
    let (client, thread) = fake(|s| {
        greet(s, proto::FLAG_FIXED_NEWSTYLE)?;
        read_option(s)?;
        loop {
            opt_reply(s, proto::OPT_GO, proto::REP_INFO, &export_info(SIZE, FLAGS))?;
        }
    });
    match connect(client) {
        Err(NbdError::TooManyOptionReplies { limit }) => {
            assert_eq!(limit, vmlink_nbd::MAX_OPTION_REPLIES)
        }
        other => panic!("{other:?}"),
    }
    thread.join().unwrap();
}

#[test]
fn malformed_info_and_unusable_exports() {
    type Check = fn(&NbdError) -> bool;
    let cases: Vec<(Vec<u8>, Check)> = vec![
        // NBD_INFO_EXPORT one byte short.
        (export_info(SIZE, FLAGS)[..11].to_vec(), |e| {
            matches!(
                e,
                NbdError::BadInfo {
                    info_type: 0,
                    len: 11
                }
            )
        }),
        // Too short to hold an information type.
        (vec![0], |e| matches!(e, NbdError::BadInfo { len: 1, .. })),
        // NBD_INFO_BLOCK_SIZE of the wrong length.
        (vec![0, 3, 0, 0], |e| {
            matches!(e, NbdError::BadInfo { info_type: 3, .. })
        }),
        // An export too large to address.
        (export_info(u64::MAX, FLAGS), |e| {
            matches!(e, NbdError::BadExportSize { size: u64::MAX })
        }),
        (export_info(1 << 63, FLAGS), |e| {
            matches!(e, NbdError::BadExportSize { .. })
        }),
        // Transmission flags without NBD_FLAG_HAS_FLAGS.
        (export_info(SIZE, proto::FLAG_SEND_FLUSH), |e| {
            matches!(e, NbdError::BadTransmissionFlags { .. })
        }),
    ];
    for (info, check) in cases {
        let (client, thread) = fake(move |s| {
            greet(s, proto::FLAG_FIXED_NEWSTYLE)?;
            read_option(s)?;
            opt_reply(s, proto::OPT_GO, proto::REP_INFO, &info)?;
            opt_reply(s, proto::OPT_GO, proto::REP_ACK, &[])?;
            wait_for_close(s)
        });
        let result = connect(client);
        assert!(result.as_ref().is_err_and(check), "{result:?}");
        thread.join().unwrap();
    }
}

#[test]
fn block_size_info_is_kept_and_unknown_info_ignored() {
    let (client, thread) = fake(|s| {
        greet(s, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES)?;
        read_option(s)?;
        let mut bs = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, 32 << 20] {
            bs.extend(v.to_be_bytes());
        }
        opt_reply(s, proto::OPT_GO, proto::REP_INFO, &bs)?;
        opt_reply(s, proto::OPT_GO, proto::REP_INFO, &[0x7f, 0x7f, 1, 2, 3])?;
        opt_reply(s, proto::OPT_GO, proto::REP_INFO, &export_info(SIZE, FLAGS))?;
        opt_reply(s, proto::OPT_GO, proto::REP_ACK, &[])?;
        wait_for_close(s)
    });
    let client = connect(client).expect("handshake");
    let bs = client.block_size().expect("block size");
    assert_eq!((bs.minimum, bs.preferred, bs.maximum), (1, 4096, 32 << 20));
    assert_eq!(client.size(), SIZE);
    drop(client);
    thread.join().unwrap();
}

#[test]
fn falls_back_to_export_name_when_go_is_unsupported() {
    for no_zeroes in [true, false] {
        let (client, thread) = fake(move |s| {
            let flags = if no_zeroes {
                proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
            } else {
                proto::FLAG_FIXED_NEWSTYLE
            };
            greet(s, flags)?;
            let (option, _) = read_option(s)?;
            opt_reply(s, option, proto::REP_ERR_UNSUP, &[])?;
            let (option, name) = read_option(s)?;
            assert_eq!(option, proto::OPT_EXPORT_NAME);
            assert_eq!(name, b"export");
            s.write_all(&SIZE.to_be_bytes())?;
            s.write_all(&FLAGS.to_be_bytes())?;
            if !no_zeroes {
                s.write_all(&[0u8; 124])?;
            }
            let (kind, handle, _, len) = read_request(s)?;
            assert_eq!(kind, proto::CMD_READ);
            simple_reply(s, 0, handle, &vec![0x42; len as usize])?;
            wait_for_close(s)
        });
        let mut client = connect(client).expect("handshake via NBD_OPT_EXPORT_NAME");
        assert_eq!(client.size(), SIZE);
        assert_eq!(client.transmission_flags(), FLAGS);
        let mut buf = [0u8; 16];
        client.read_at(0, &mut buf).expect("read");
        assert_eq!(buf, [0x42; 16]);
        drop(client);
        thread.join().unwrap();
    }
}

#[test]
fn handshake_is_bounded_by_the_timeout() {
    // A server that accepts and then says nothing.
    let (client, thread) = fake(wait_for_close);
    let started = Instant::now();
    let result = NbdClient::connect_stream_with(client, "export", &options(200));
    assert!(
        matches!(result, Err(NbdError::Timeout { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    thread.join().unwrap();

    // One that trickles: the deadline covers the whole handshake, not each read.
    let (client, thread) = fake(|s| {
        for b in proto::NBDMAGIC.to_be_bytes() {
            s.write_all(&[b])?;
            std::thread::sleep(Duration::from_millis(60));
        }
        wait_for_close(s)
    });
    let started = Instant::now();
    let result = NbdClient::connect_stream_with(client, "export", &options(200));
    assert!(
        matches!(result, Err(NbdError::Timeout { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    thread.join().unwrap();
}

#[test]
fn bad_arguments_are_refused_before_connecting() {
    let (client, _server) = UnixStream::pair().unwrap();
    let too_long = "x".repeat(4097);
    assert!(matches!(
        NbdClient::connect_stream(client, &too_long),
        Err(NbdError::InvalidExportName { len: 4097, .. })
    ));
    let (client, _server) = UnixStream::pair().unwrap();
    assert!(matches!(
        NbdClient::connect_stream(client, "a\0b"),
        Err(NbdError::InvalidExportName { .. })
    ));
    for bad in [
        ConnectOptions {
            max_in_flight: 0,
            ..ConnectOptions::default()
        },
        ConnectOptions {
            max_in_flight: vmlink_nbd::MAX_IN_FLIGHT + 1,
            ..ConnectOptions::default()
        },
        ConnectOptions {
            timeout: Some(Duration::ZERO),
            ..ConnectOptions::default()
        },
    ] {
        let (client, _server) = UnixStream::pair().unwrap();
        assert!(matches!(
            NbdClient::connect_stream_with(client, "", &bad),
            Err(NbdError::InvalidOption(_))
        ));
    }
}

// ---- transmission ----

#[test]
fn reply_for_an_unknown_handle_breaks_the_connection() {
    let (mut client, thread) = transmission(|s| {
        let (_, handle, _, _) = read_request(s)?;
        simple_reply(s, 0, handle + 0xdead_0000, &[])?;
        wait_for_close(s)
    });
    client.submit_flush(5).expect("submit");
    match client.reap(|_| None) {
        Err(
            e @ NbdError::UnknownHandle {
                handle: 0xdead_0005,
            },
        ) => assert!(e.is_fatal()),
        other => panic!("{other:?}"),
    }
    assert!(client.is_broken());
    assert!(matches!(client.reap(|_| None), Err(NbdError::Broken)));
    assert!(matches!(client.submit_flush(6), Err(NbdError::Broken)));
    assert!(matches!(
        client.read_at(0, &mut [0; 4]),
        Err(NbdError::Broken)
    ));
    client
        .disconnect()
        .expect("a broken connection disconnects quietly");
    thread.join().unwrap();
}

#[test]
fn duplicate_reply_is_told_from_an_unknown_one() {
    let (mut client, thread) = transmission(|s| {
        let (_, handle, _, _) = read_request(s)?;
        simple_reply(s, 0, handle, &[])?;
        simple_reply(s, 0, handle, &[])?;
        wait_for_close(s)
    });
    client.submit_write(77, 0, b"data").expect("submit");
    client.submit_flush(78).expect("submit");
    assert_eq!(client.reap(|_| None).expect("first reply").handle, 77);
    assert!(matches!(
        client.reap(|_| None),
        Err(NbdError::DuplicateReply { handle: 77 })
    ));
    assert!(client.is_broken());
    drop(client);
    thread.join().unwrap();
}

#[test]
fn bad_reply_magic_and_unnegotiated_structured_replies() {
    for magic in [0x1234_5678u32, proto::STRUCTURED_REPLY_MAGIC] {
        let (mut client, thread) = transmission(move |s| {
            let (_, handle, _, _) = read_request(s)?;
            s.write_all(&reply_header(magic, 0, handle))?;
            wait_for_close(s)
        });
        client.submit_read(1, 0, 512).expect("submit");
        match client.reap(|_| None) {
            Err(NbdError::BadMagic { found, context, .. }) => {
                assert_eq!(found, u64::from(magic));
                assert_eq!(
                    context.contains("structured"),
                    magic == proto::STRUCTURED_REPLY_MAGIC
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(client.is_broken());
        drop(client);
        thread.join().unwrap();
    }
}

#[test]
fn eof_mid_reply() {
    // Half of a read's data, then the server goes away.
    let (mut client, thread) = transmission(|s| {
        let (_, handle, _, len) = read_request(s)?;
        simple_reply(s, 0, handle, &vec![1; len as usize / 2])
    });
    client.submit_read(3, 0, 4096).expect("submit");
    let mut buf = vec![0u8; 4096];
    match client.reap(|_| Some(&mut buf[..])) {
        Err(NbdError::Eof { context }) => assert!(context.contains("data"), "{context}"),
        other => panic!("{other:?}"),
    }
    assert!(client.is_broken());
    thread.join().unwrap();

    // Half of a reply header.
    let (mut client, thread) = transmission(|s| {
        let (_, handle, _, _) = read_request(s)?;
        s.write_all(&reply_header(proto::SIMPLE_REPLY_MAGIC, 0, handle)[..9])
    });
    client.submit_flush(3).expect("submit");
    match client.reap(|_| None) {
        Err(NbdError::Eof { context }) => assert!(context.contains("header"), "{context}"),
        other => panic!("{other:?}"),
    }
    thread.join().unwrap();

    // No reply at all.
    let (mut client, thread) = transmission(|s| read_request(s).map(drop));
    client.submit_flush(3).expect("submit");
    assert!(matches!(client.reap(|_| None), Err(NbdError::Eof { .. })));
    thread.join().unwrap();
}

#[test]
fn a_timeout_before_a_reply_is_harmless_one_inside_it_is_fatal() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (mut client, thread) = transmission(move |s| {
        let (_, handle, _, _) = read_request(s)?;
        // Silent until the client has timed out once.
        rx.recv().unwrap();
        simple_reply(s, 0, handle, &[9; 8])?;
        let (_, handle, _, _) = read_request(s)?;
        // Half a header, then silence.
        s.write_all(&reply_header(proto::SIMPLE_REPLY_MAGIC, 0, handle)[..8])?;
        wait_for_close(s)
    });
    client
        .set_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    client.submit_read(1, 0, 8).expect("submit");
    let mut buf = [0u8; 8];
    let started = Instant::now();
    match client.reap(|_| Some(&mut buf[..])) {
        Err(
            e @ NbdError::Timeout {
                mid_message: false, ..
            },
        ) => assert!(!e.is_fatal()),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!client.is_broken());
    tx.send(()).unwrap();
    client
        .set_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let reply = client.reap(|_| Some(&mut buf[..])).expect("the late reply");
    assert_eq!((reply.handle, reply.error, buf), (1, 0, [9; 8]));

    client
        .set_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    client.submit_flush(2).expect("submit");
    match client.reap(|_| None) {
        Err(
            e @ NbdError::Timeout {
                mid_message: true, ..
            },
        ) => assert!(e.is_fatal()),
        other => panic!("{other:?}"),
    }
    assert!(client.is_broken());
    drop(client);
    thread.join().unwrap();
}

#[test]
fn error_replies_carry_no_data_and_buffers_stay_untouched() {
    let (mut client, thread) = transmission(|s| {
        let (_, first, _, _) = read_request(s)?;
        let (_, second, _, len) = read_request(s)?;
        // Out of order: the second succeeds first, then the first fails with EIO.
        simple_reply(s, 0, second, &vec![0x77; len as usize])?;
        simple_reply(s, proto::EIO, first, &[])?;
        wait_for_close(s)
    });
    let mut buffers = [[0u8; 64]; 2];
    client.submit_read(0, 0, 64).expect("submit");
    client.submit_read(1, 64, 64).expect("submit");
    let mut calls = 0;
    let r = client
        .reap(|h| {
            calls += 1;
            Some(&mut buffers[h as usize][..])
        })
        .expect("reap");
    assert_eq!((r.handle, r.error, calls), (1, 0, 1));
    let r = client
        .reap(|h| {
            calls += 1;
            Some(&mut buffers[h as usize][..])
        })
        .expect("reap");
    assert_eq!((r.handle, r.error), (0, proto::EIO));
    assert!(!r.is_ok());
    assert_eq!(calls, 1, "no buffer is asked for an error reply");
    assert_eq!(buffers, [[0; 64], [0x77; 64]]);
    drop(client);
    thread.join().unwrap();
}

#[test]
fn blocking_calls_turn_error_replies_into_server_errors() {
    let (mut client, thread) = transmission(|s| {
        for errno in [proto::EINVAL, proto::ENOSPC, proto::EIO, proto::EPERM] {
            let (_, handle, _, _) = read_request(s)?;
            simple_reply(s, errno, handle, &[])?;
        }
        let (kind, ..) = read_request(s)?;
        assert_eq!(kind, proto::CMD_DISC);
        wait_for_close(s)
    });
    let e = client.read_at(SIZE, &mut [0; 16]).expect_err("read");
    assert!(matches!(
        e,
        NbdError::Server {
            errno: 22,
            command: "read",
            offset: SIZE,
            len: 16
        }
    ));
    assert!(e.to_string().contains("EINVAL"), "{e}");
    let e = client.write_at(SIZE, &[0; 16]).expect_err("write");
    assert!(
        matches!(
            e,
            NbdError::Server {
                errno: 28,
                command: "write",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(matches!(
        client.flush(),
        Err(NbdError::Server {
            errno: 5,
            command: "flush",
            ..
        })
    ));
    assert!(matches!(
        client.trim(0, 512),
        Err(NbdError::Server {
            errno: 1,
            command: "trim",
            ..
        })
    ));
    assert!(!client.is_broken());
    client.disconnect().expect("disconnect");
    thread.join().unwrap();
}

#[test]
fn caller_mistakes_leave_the_connection_usable() {
    let (mut client, thread) = transmission(|s| {
        let mut handles = Vec::new();
        for _ in 0..8 {
            let (_, handle, _, len) = read_request(s)?;
            handles.push((handle, len));
        }
        for (handle, len) in handles {
            simple_reply(s, 0, handle, &vec![0x33; len as usize])?;
        }
        let (_, handle, _, len) = read_request(s)?;
        simple_reply(s, 0, handle, &vec![0x44; len as usize])?;
        wait_for_close(s)
    });
    assert!(matches!(
        client.reap(|_| None),
        Err(NbdError::NothingInFlight)
    ));
    for h in 0..8u64 {
        client.submit_read(h, h * 100, 100).expect("submit");
    }
    assert!(matches!(
        client.submit_read(100, 0, 1),
        Err(NbdError::QueueFull { capacity: 8 })
    ));
    assert!(matches!(
        client.read_at(0, &mut [0; 4]),
        Err(NbdError::Busy { in_flight: 8 })
    ));
    // Handle 3 reaped, then reused while 0 is still in flight.
    let mut small = [0u8; 10];
    let mut big = [0u8; 100];
    let mut seen = Vec::new();
    for i in 0..8 {
        let result = if i == 0 {
            client.reap(|_| Some(&mut small[..]))
        } else {
            client.reap(|_| Some(&mut big[..]))
        };
        match result {
            Err(NbdError::BufferTooSmall {
                handle,
                len: 100,
                buffer: 10,
            }) => seen.push(handle),
            Ok(reply) => {
                assert!(reply.is_ok());
                assert_eq!(big, [0x33; 100]);
                seen.push(reply.handle);
            }
            Err(e) => panic!("{e:?}"),
        }
        if i == 0 {
            // Not a fatal error; and the handle is free again.
            assert!(!client.is_broken());
            assert!(matches!(
                client.submit_read(1, 0, 1),
                Err(NbdError::HandleInUse { handle: 1 })
            ));
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    assert!(matches!(
        client.submit_read(9, u64::MAX - 10, 100),
        Err(NbdError::OutOfRange { .. })
    ));
    let mut buf = [0u8; 5];
    client.read_at(0, &mut buf).expect("still usable");
    assert_eq!(buf, [0x44; 5]);
    drop(client);
    thread.join().unwrap();
}

#[test]
fn unadvertised_commands_are_not_sent() {
    let (client, thread) = fake(|s| {
        handshake(s, SIZE, proto::FLAG_HAS_FLAGS)?;
        // Nothing may arrive but the disconnect.
        let (kind, ..) = read_request(s)?;
        assert_eq!(kind, proto::CMD_DISC);
        wait_for_close(s)
    });
    let mut client = connect(client).expect("handshake");
    assert!(!client.can_flush() && !client.can_trim() && !client.read_only());
    assert!(matches!(
        client.flush(),
        Err(NbdError::Unsupported { command: "flush" })
    ));
    assert!(matches!(
        client.submit_trim(1, 0, 1),
        Err(NbdError::Unsupported { command: "trim" })
    ));
    client.disconnect().expect("disconnect");
    thread.join().unwrap();
}
