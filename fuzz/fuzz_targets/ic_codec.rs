//! Integration-service messages from a hostile host: the input is a VMBus packet's payload,
//! parsed by `vmlink_ic::Message::parse` and then as every kind of body.
//!
//! Asserted:
//! - no parser panics or allocates;
//! - an accepted message's body is exactly `icmsgsize` bytes right after the 28 header bytes,
//!   at least its type's minimum, and re-encoding header and body gives a message that parses
//!   back to the same header and body;
//! - every typed view that parses re-encodes through its encoder to a message whose typed
//!   view is equal (heartbeat, shutdown, time sync in both layouts, KVP, file copy, negotiate
//!   lists), and decoded KVP and file-copy text re-encodes to the same text;
//! - the guest's negotiate answer always parses, and the host reads from it the outcome the
//!   guest reported (the versions, or no common version);
//! - every error's message is plain words;
//! - the failure answer to any payload (`refuse_raw`) keeps the transaction id, says
//!   `HV_E_FAIL`, and has sizes true to what it echoes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlink_fuzz::no_alloc;
use vmlink_ic::fcopy::{self, Fcopy, FcopyOperation, StartFcopy};
use vmlink_ic::kvp::{self, IpField, Kvp, KvpExchangeValue};
use vmlink_ic::negotiate::{self, KVP_VERSIONS, UTIL_FRAMEWORK_VERSIONS, VersionLists};
use vmlink_ic::shutdown;
use vmlink_ic::status::HV_E_FAIL;
use vmlink_ic::timesync::{self, TimeSync};
use vmlink_ic::{IcError, Message, Version, encode, encode_body, heartbeat, refuse_raw};

/// Room for the largest message: the 7432-byte KVP body and the headers.
const OUT: usize = 8192;

fn plain(error: IcError) {
    let message = error.to_string();
    assert!(
        !message.contains("None") && !message.contains("Some(") && !message.contains('{'),
        "{message}"
    );
}

/// Parses what `write` encoded.
fn reparse<'o>(
    out: &'o mut [u8],
    write: impl FnOnce(&mut [u8]) -> Result<usize, IcError>,
) -> Message<'o> {
    let len = write(out).expect("a parsed message re-encodes");
    Message::parse(&out[..len]).expect("what we encode parses")
}

fn check_heartbeat(message: &Message<'_>, out: &mut [u8]) {
    match no_alloc("heartbeat::parse", || heartbeat::parse(message)) {
        Ok(seq) => {
            let again = reparse(out, |o| heartbeat::encode(o, &message.header, seq));
            assert_eq!(heartbeat::parse(&again), Ok(seq));
            let answer = reparse(out, |o| heartbeat::answer(message, o));
            assert_eq!(heartbeat::parse(&answer), Ok(seq.wrapping_add(1)));
        }
        Err(e) => plain(e),
    }
}

fn check_shutdown(message: &Message<'_>, out: &mut [u8]) {
    let body = match no_alloc("shutdown::parse", || shutdown::parse(message)) {
        Ok(body) => body,
        Err(e) => return plain(e),
    };
    let (flags, text) = no_alloc("shutdown accessors", || {
        (body.flags(), body.display_message())
    });
    let (Ok(flags), Ok(text)) = (flags, text) else {
        return;
    };
    // A message filling the whole field has no terminator: it parses but cannot be written.
    if text.len() >= shutdown::DISPLAY_MESSAGE_LEN {
        let write = shutdown::encode(out, &message.header, flags, 0, 0, text);
        assert!(matches!(write, Err(IcError::TextTooLong { .. })));
        return;
    }
    let (reason, timeout) = (body.reason_code(), body.timeout_seconds());
    let write = |o: &mut [u8]| shutdown::encode(o, &message.header, flags, reason, timeout, text);
    let again = reparse(out, write);
    let again = shutdown::parse(&again).expect("a shutdown body");
    assert_eq!(again.flags(), Ok(flags));
    assert_eq!(
        (again.reason_code(), again.timeout_seconds()),
        (reason, timeout)
    );
    assert_eq!(again.display_message(), Ok(text));
}

fn check_timesync(message: &Message<'_>, out: &mut [u8]) {
    for version in [Version::new(3, 0), Version::new(4, 0)] {
        match no_alloc("timesync::parse", || timesync::parse(message, version)) {
            Ok(sample) => {
                let again = match sample {
                    TimeSync::Data(data) => reparse(out, |o| encode_body(o, &message.header, data)),
                    TimeSync::Reference(data) => {
                        reparse(out, |o| encode_body(o, &message.header, data))
                    }
                };
                assert_eq!(timesync::parse(&again, version), Ok(sample));
                if let Ok(unix) = timesync::to_unix(sample.parent_time()) {
                    assert_eq!(timesync::from_unix(unix), Ok(sample.parent_time()));
                }
            }
            Err(e) => plain(e),
        }
    }
}

/// A KVP key and value decoded, then encoded afresh, decode to the same.
fn check_exchange(data: &KvpExchangeValue) {
    let (mut key, mut value) = ([0u8; 1024], [0u8; 4096]);
    let decoded = no_alloc("KVP text", || {
        (data.key(&mut key).map(str::len), data.value(&mut value))
    });
    let (Ok(key_len), Ok(value)) = decoded else {
        return;
    };
    let key = core::str::from_utf8(&key[..key_len]).expect("decoded text is UTF-8");
    let fresh = KvpExchangeValue::new(key, value).expect("decoded text fits its field again");
    let (mut key2, mut value2) = ([0u8; 1024], [0u8; 4096]);
    assert_eq!(fresh.key(&mut key2), Ok(key));
    assert_eq!(fresh.value(&mut value2), Ok(value));
}

fn check_kvp(message: &Message<'_>, out: &mut [u8]) {
    let parsed = match no_alloc("kvp::parse", || kvp::parse(message)) {
        Ok(parsed) => parsed,
        Err(e) => return plain(e),
    };
    match parsed {
        Kvp::Get { data, .. } | Kvp::Set { data, .. } => check_exchange(data),
        Kvp::Enumerate { data, .. } => check_exchange(&data.data),
        Kvp::Delete { data, .. } => {
            let mut key = [0u8; 1024];
            let _ = no_alloc("KVP delete key", || data.key(&mut key).map(str::len));
        }
        Kvp::GetIpInfo { data, .. } | Kvp::SetIpInfo { data, .. } => {
            let mut text = [0u8; 4096];
            for field in [
                IpField::AdapterId,
                IpField::IpAddr,
                IpField::SubNet,
                IpField::Gateway,
                IpField::DnsAddr,
            ] {
                let _ = no_alloc("KVP IP text", || data.text(field, &mut text).map(str::len));
            }
        }
    }
    let again = reparse(out, |o| kvp::encode(o, &message.header, &parsed));
    assert_eq!(kvp::parse(&again), Ok(parsed));
}

fn check_fcopy(message: &Message<'_>, out: &mut [u8]) {
    let parsed = match no_alloc("fcopy::parse", || fcopy::parse(message)) {
        Ok(parsed) => parsed,
        Err(e) => return plain(e),
    };
    let header = &message.header;
    match parsed {
        Fcopy::Start(start) => {
            let again = reparse(out, |o| encode_body(o, header, start));
            assert_eq!(fcopy::parse(&again), Ok(Fcopy::Start(start)));
            let (mut name, mut path) = ([0u8; 1024], [0u8; 1024]);
            let names = (start.file_name(&mut name), start.path_name(&mut path));
            if let (Ok(name), Ok(path)) = names {
                let ids = start.hdr.service_ids();
                let fresh = StartFcopy::new(
                    ids,
                    name,
                    path,
                    start.copy_flags.get(),
                    start.file_size.get(),
                )
                .expect("decoded names fit again");
                let mut text = [0u8; 1024];
                assert_eq!(fresh.file_name(&mut text), Ok(name));
            }
        }
        Fcopy::Write { hdr, offset, data } => {
            let again = reparse(out, |o| {
                fcopy::encode_write(o, header, hdr.service_ids(), offset, data)
            });
            let Ok(Fcopy::Write {
                hdr: h,
                offset: o,
                data: d,
            }) = fcopy::parse(&again)
            else {
                panic!("a write re-parses as a write")
            };
            assert_eq!((h.service_ids(), o, d), (hdr.service_ids(), offset, data));
        }
        Fcopy::Complete(hdr) | Fcopy::Cancel(hdr) => {
            let operation = FcopyOperation::try_from(hdr.operation.get()).expect("parsed");
            let again = reparse(out, |o| {
                fcopy::encode_control(o, header, operation, hdr.service_ids())
            });
            assert_eq!(fcopy::parse(&again), Ok(parsed));
        }
    }
}

fn check_negotiate(message: &Message<'_>, out: &mut [u8]) {
    match no_alloc("VersionLists::parse", || VersionLists::parse(message)) {
        Ok(lists) => {
            let framework: Vec<Version> = lists.framework().collect();
            let versions: Vec<Version> = lists.message().collect();
            let tid = message.header.transaction_id;
            let again = reparse(out, |o| {
                negotiate::encode_request(o, tid, &framework, &versions)
            });
            let again = VersionLists::parse(&again).expect("our lists parse");
            assert!(again.framework().eq(framework.iter().copied()));
            assert!(again.message().eq(versions.iter().copied()));
        }
        Err(e) => plain(e),
    }
    let answer = no_alloc("negotiate::respond", || {
        negotiate::respond(message, UTIL_FRAMEWORK_VERSIONS, KVP_VERSIONS, out)
    });
    match answer {
        Ok(answer) => {
            let reply = Message::parse(&out[..answer.len]).expect("our answer parses");
            let read = negotiate::parse_response(&reply);
            match answer.outcome {
                Ok(chosen) => assert_eq!(read, Ok(chosen)),
                Err(e) => {
                    plain(e);
                    assert_eq!(read, Err(IcError::NoCommonVersion));
                }
            }
        }
        Err(e) => plain(e),
    }
    let _ = no_alloc("negotiate::parse_response", || {
        negotiate::parse_response(message)
    });
}

/// The failure answer to anything: present exactly when both headers are, the request's
/// transaction id kept, the failure status and response flags set, its sizes true to what
/// it holds.
fn check_refusal(payload: &[u8]) {
    let mut out = [0u8; OUT];
    let len = no_alloc("refuse_raw", || refuse_raw(payload, &mut out));
    if payload.len() < 28 {
        assert_eq!(len, 0);
        return;
    }
    assert_eq!(len, 28 + (payload.len() - 28).min(OUT - 28));
    assert_eq!(out[24], payload[24], "the transaction id");
    assert_eq!(
        u32::from_le_bytes([out[20], out[21], out[22], out[23]]),
        HV_E_FAIL
    );
    assert_eq!(out[25], 1 | 4, "TRANSACTION | RESPONSE");
    assert_eq!(
        usize::from(u16::from_le_bytes([out[18], out[19]])),
        len - 28
    );
    assert_eq!(
        u32::from_le_bytes([out[4], out[5], out[6], out[7]]) as usize,
        len - 8
    );
    assert_eq!(&out[28..len], &payload[28..len]);
}

fuzz_target!(|payload: &[u8]| {
    check_refusal(payload);
    let message = match no_alloc("Message::parse", || Message::parse(payload)) {
        Ok(message) => message,
        Err(e) => return plain(e),
    };
    let body_len = message.body.len();
    assert!(body_len >= message.header.message_type.min_body_len());
    assert_eq!(
        usize::from(u16::from_le_bytes([payload[18], payload[19]])),
        body_len
    );
    assert_eq!(&payload[28..28 + body_len], message.body);

    let mut out = vec![0u8; OUT];
    let again = reparse(&mut out, |o| encode(o, &message.header, message.body));
    assert_eq!((again.header, again.body), (message.header, message.body));

    check_negotiate(&message, &mut out);
    check_heartbeat(&message, &mut out);
    check_shutdown(&message, &mut out);
    check_timesync(&message, &mut out);
    check_kvp(&message, &mut out);
    check_fcopy(&message, &mut out);
});
