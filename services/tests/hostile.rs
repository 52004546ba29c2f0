//! Hostile input: every rejection is its own typed error, negotiation fails the way Linux's
//! does, arbitrary bytes never panic, and every message type survives encode then parse.

use core::time::Duration;

use proptest::prelude::*;
use vmlink_ic::fcopy::{self, DATA_FRAGMENT, Fcopy, FcopyOperation, StartFcopy};
use vmlink_ic::kvp::{self, Kvp, KvpExchangeValue, KvpPool, KvpValue};
use vmlink_ic::negotiate::{self, KVP_VERSIONS, Negotiated, UTIL_FRAMEWORK_VERSIONS};
use vmlink_ic::shutdown::{self, Action, ShutdownFlags};
use vmlink_ic::status::{HV_E_FAIL, HV_S_OK};
use vmlink_ic::timesync::{self, TimeSync, TimeSyncData, TimeSyncRefData};
use vmlink_ic::{
    Header, IcError, Message, MessageType, Version, encode, encode_body, heartbeat, utf16,
};

/// A well-formed message of `message_type` with `body`, by hand: pipe and message headers
/// with consistent sizes.
fn message(message_type: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(1u32.to_le_bytes());
    out.extend((20 + body.len() as u32).to_le_bytes());
    out.extend([3, 0, 0, 0]);
    out.extend(message_type.to_le_bytes());
    out.extend([3, 0, 0, 0]);
    out.extend((body.len() as u16).to_le_bytes());
    out.extend([0, 0, 0, 0, 1, 3, 0, 0]);
    out.extend(body);
    out
}

fn v(major: u16, minor: u16) -> Version {
    Version::new(major, minor)
}

// ---- headers and sizes -------------------------------------------------------------------

#[test]
fn short_payloads_are_rejected() {
    let full = message(1, &[0; 8]);
    for len in 0..28 {
        assert_eq!(
            Message::parse(&full[..len]),
            Err(IcError::PayloadTooShort { len })
        );
    }
}

#[test]
fn sizes_past_the_packet_are_rejected() {
    // msgsize one byte past the payload.
    let mut packet = message(1, &[0; 8]);
    packet[4] = 29;
    assert_eq!(
        Message::parse(&packet),
        Err(IcError::PipeSizePastPacket {
            msgsize: 29,
            available: 28
        })
    );
    packet[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Message::parse(&packet),
        Err(IcError::PipeSizePastPacket { .. })
    ));

    // icmsgsize disagreeing with the payload: one byte more than msgsize leaves.
    let mut packet = message(1, &[0; 8]);
    packet[18] = 9;
    assert_eq!(
        Message::parse(&packet),
        Err(IcError::IcSizePastPipe {
            icmsgsize: 9,
            msgsize: 28
        })
    );
    packet[18..20].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(matches!(
        Message::parse(&packet),
        Err(IcError::IcSizePastPipe { .. })
    ));
}

#[test]
fn sizes_short_of_the_packet_are_accepted() {
    // VMBus pads payloads to 8 bytes and Linux answers with the whole buffer it got: the
    // body is icmsgsize bytes whatever follows.
    let mut packet = message(1, &[5, 0, 0, 0, 0, 0, 0, 0]);
    packet.extend([0xAA; 12]);
    let parsed = Message::parse(&packet).unwrap();
    assert_eq!(parsed.body.len(), 8);
    assert_eq!(heartbeat::parse(&parsed), Ok(5));
}

#[test]
fn unknown_types_are_rejected() {
    for message_type in [6, 8, 100, u16::MAX] {
        assert_eq!(
            Message::parse(&message(message_type, &[0; 64])),
            Err(IcError::UnknownMessageType(message_type))
        );
    }
}

#[test]
fn bodies_too_short_for_their_type_are_rejected() {
    let cases = [
        (MessageType::Negotiate, 8),
        (MessageType::Heartbeat, 8),
        (MessageType::Kvp, 4),
        (MessageType::Shutdown, 2060),
        (MessageType::TimeSync, 22),
        (MessageType::Vss, 8),
        (MessageType::FileCopy, 36),
    ];
    for (message_type, needed) in cases {
        let packet = message(message_type as u16, &vec![0; needed - 1]);
        assert_eq!(
            Message::parse(&packet),
            Err(IcError::BodyTooShort {
                message_type,
                needed,
                len: needed - 1
            })
        );
        assert!(Message::parse(&message(message_type as u16, &vec![0; needed])).is_ok());
    }
}

#[test]
fn encoders_check_type_and_room() {
    let header = Header::request(MessageType::Shutdown, v(3, 0), v(3, 0), 0);
    let mut out = [0u8; 100];
    assert_eq!(
        heartbeat::encode(&mut out, &header, 1),
        Err(IcError::WrongMessageType {
            expected: MessageType::Heartbeat,
            found: MessageType::Shutdown
        })
    );
    let header = Header::request(MessageType::Heartbeat, v(3, 0), v(3, 0), 0);
    assert_eq!(
        heartbeat::encode(&mut out[..67], &header, 1),
        Err(IcError::OutputTooSmall {
            needed: 68,
            capacity: 67
        })
    );
    assert_eq!(
        encode(&mut [0u8; 70_000], &header, &[0; 65_536]),
        Err(IcError::BodyTooLarge { len: 65_536 })
    );
    // A typed parser refuses another type's message.
    let packet = message(MessageType::Heartbeat as u16, &[0; 40]);
    assert_eq!(
        shutdown::parse(&Message::parse(&packet).unwrap()),
        Err(IcError::WrongMessageType {
            expected: MessageType::Shutdown,
            found: MessageType::Heartbeat
        })
    );
}

// ---- negotiate ---------------------------------------------------------------------------

/// A negotiate body: counts, then the versions.
fn negotiate_body(framework: &[Version], message: &[Version]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend((framework.len() as u16).to_le_bytes());
    body.extend((message.len() as u16).to_le_bytes());
    body.extend([0; 4]);
    for version in framework.iter().chain(message) {
        body.extend(version.major.to_le_bytes());
        body.extend(version.minor.to_le_bytes());
    }
    body
}

/// The guest's answer to `body` with KVP's versions: (outcome, status, answer body).
fn answer(body: &[u8]) -> (Result<Negotiated, IcError>, u32, Vec<u8>) {
    let packet = message(0, body);
    let request = Message::parse(&packet).unwrap();
    let mut out = [0u8; 64];
    let answer =
        negotiate::respond(&request, UTIL_FRAMEWORK_VERSIONS, KVP_VERSIONS, &mut out).unwrap();
    assert_eq!(answer.len, 44);
    let reply = Message::parse(&out[..answer.len]).unwrap();
    assert_eq!(reply.header, request.header.response(reply.header.status));
    (answer.outcome, reply.header.status, reply.body.to_vec())
}

#[test]
fn negotiate_picks_the_highest_common_versions() {
    // Host lists in increasing order; only 3.0 and 1.0 frameworks, 5.0, 3.0 and 1.0 messages.
    let body = negotiate_body(&[v(1, 0), v(3, 0)], &[v(1, 0), v(5, 0), v(3, 0)]);
    let (outcome, status, reply) = answer(&body);
    assert_eq!(
        outcome,
        Ok(Negotiated {
            framework: v(3, 0),
            message: v(3, 0)
        })
    );
    assert_eq!(status, HV_S_OK);
    assert_eq!(reply, [1, 0, 1, 0, 0, 0, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0]);
    // A minor number must match too.
    let (outcome, ..) = answer(&negotiate_body(&[v(3, 0)], &[v(4, 1), v(1, 0)]));
    assert_eq!(
        outcome,
        Ok(Negotiated {
            framework: v(3, 0),
            message: v(1, 0)
        })
    );
}

#[test]
fn negotiate_without_common_versions_answers_counts_zero() {
    // No common message version: counts 0, failure status; as in Linux the framework slot
    // holds the framework found, the message slot the message count.
    let (outcome, status, reply) = answer(&negotiate_body(&[v(3, 0)], &[v(2, 0), v(9, 9)]));
    assert_eq!(outcome, Err(IcError::NoCommonVersion));
    assert_eq!(status, HV_E_FAIL);
    assert_eq!(reply, [0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0]);
    // No common framework: the message list is not searched, both slots hold counts.
    let (outcome, status, reply) = answer(&negotiate_body(&[v(2, 0)], &[v(4, 0)]));
    assert_eq!(outcome, Err(IcError::NoCommonVersion));
    assert_eq!(status, HV_E_FAIL);
    assert_eq!(reply, [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]);
    // The host reads the failure.
    let packet = message(0, &reply);
    let mut response = Message::parse(&packet).unwrap();
    response.header = response.header.response(HV_E_FAIL);
    assert_eq!(
        negotiate::parse_response(&response),
        Err(IcError::NoCommonVersion)
    );
}

#[test]
fn negotiate_counts_past_the_packet_are_typed_errors() {
    // Two framework versions announced, one present.
    let mut body = negotiate_body(&[v(3, 0)], &[v(3, 0)]);
    body[0] = 2;
    let packet = message(0, &body);
    let request = Message::parse(&packet).unwrap();
    assert_eq!(
        negotiate::VersionLists::parse(&request),
        Err(IcError::VersionsPastPacket {
            needed: 20,
            len: 16
        })
    );
    let (outcome, status, reply) = answer(&body);
    assert_eq!(
        outcome,
        Err(IcError::VersionsPastPacket {
            needed: 20,
            len: 16
        })
    );
    assert_eq!(status, HV_E_FAIL);
    assert_eq!(reply[..4], [0, 0, 0, 0]);

    // More than 100 of a kind, however long the packet.
    let mut body = negotiate_body(&[v(3, 0); 101], &[v(3, 0)]);
    let (outcome, status, _) = answer(&body);
    assert_eq!(
        outcome,
        Err(IcError::TooManyVersions {
            framework: 101,
            message: 1
        })
    );
    assert_eq!(status, HV_E_FAIL);
    body[2..4].copy_from_slice(&u16::MAX.to_le_bytes());
    body[..2].copy_from_slice(&1u16.to_le_bytes());
    let (outcome, ..) = answer(&body);
    assert_eq!(
        outcome,
        Err(IcError::TooManyVersions {
            framework: 1,
            message: u16::MAX
        })
    );
}

#[test]
fn negotiate_responses_are_checked() {
    let request_header = Header::request(MessageType::Negotiate, v(0, 0), v(0, 0), 0);
    let mut out = [0u8; 64];
    // Not flagged as a response.
    let len = encode(
        &mut out,
        &request_header,
        &negotiate_body(&[v(3, 0)], &[v(3, 0)]),
    )
    .unwrap();
    assert_eq!(
        negotiate::parse_response(&Message::parse(&out[..len]).unwrap()),
        Err(IcError::NotAResponse { flags: 3 })
    );
    // Counts other than 0/0 and 1/1.
    let header = request_header.response(HV_S_OK);
    let len = encode(
        &mut out,
        &header,
        &negotiate_body(&[v(3, 0), v(1, 0)], &[v(3, 0)]),
    )
    .unwrap();
    assert_eq!(
        negotiate::parse_response(&Message::parse(&out[..len]).unwrap()),
        Err(IcError::UnexpectedVersionCounts {
            framework: 2,
            message: 1
        })
    );
    assert!(matches!(
        negotiate::encode_request(&mut out, 0, &[v(3, 0); 101], &[]),
        Err(IcError::TooManyVersions {
            framework: 101,
            message: 0
        })
    ));
}

// ---- UTF-16 ------------------------------------------------------------------------------

fn units(units: &[u16]) -> Vec<u8> {
    units.iter().flat_map(|unit| unit.to_le_bytes()).collect()
}

#[test]
fn utf16_rejections() {
    let mut out = [0u8; 64];
    let field = units(&[0x41, 0x42, 0, 0]);
    assert_eq!(utf16::decode(&field, 6, &mut out), Ok("AB"));
    assert_eq!(
        utf16::decode(&field, 0, &mut out),
        Err(IcError::Utf16EmptySize)
    );
    assert_eq!(
        utf16::decode(&field, 5, &mut out),
        Err(IcError::Utf16OddSize(5))
    );
    assert_eq!(
        utf16::decode(&field, 10, &mut out),
        Err(IcError::Utf16SizePastField { size: 10, field: 8 })
    );
    assert_eq!(
        utf16::decode(&field, u32::MAX - 1, &mut out),
        Err(IcError::Utf16SizePastField {
            size: u32::MAX - 1,
            field: 8
        })
    );
    // No terminator where the size says the text ends.
    assert_eq!(
        utf16::decode(&field, 4, &mut out),
        Err(IcError::Utf16MissingTerminator)
    );
    assert_eq!(
        utf16::decode_terminated(&units(&[0x41; 4]), &mut out),
        Err(IcError::Utf16MissingTerminator)
    );
    // A NUL before the announced end.
    assert_eq!(
        utf16::decode(&field, 8, &mut out),
        Err(IcError::Utf16EmbeddedNul { at: 2 })
    );
    // Lone surrogates: a high one before a non-low, one at the end, a low one alone.
    let cases: [(&[u16], usize); 3] = [
        (&[0x41, 0xD800, 0x41, 0], 1),
        (&[0xDBFF, 0], 0),
        (&[0x41, 0x42, 0xDC00, 0], 2),
    ];
    for (text, at) in cases {
        let field = units(text);
        let size = field.len() as u32;
        assert_eq!(
            utf16::decode(&field, size, &mut out),
            Err(IcError::Utf16LoneSurrogate { at })
        );
        assert!(utf16::chars(&field, size).is_err());
    }
    // A pair is fine, and decodes to one character.
    let pair = units(&[0xD83D, 0xDE00, 0]);
    assert_eq!(utf16::decode(&pair, 6, &mut out), Ok("\u{1F600}"));
    assert_eq!(
        utf16::decode(&pair, 6, &mut out[..3]),
        Err(IcError::OutputTooSmall {
            needed: 4,
            capacity: 3
        })
    );
    // Encoding: the terminator must fit, and text may not hold NUL.
    assert_eq!(utf16::encode("abc", &mut [0u8; 8]), Ok(8));
    assert_eq!(
        utf16::encode("abcd", &mut [0u8; 8]),
        Err(IcError::TextTooLong {
            needed: 10,
            capacity: 8
        })
    );
    assert_eq!(
        utf16::encode("a\0b", &mut [0u8; 8]),
        Err(IcError::TextHasNul)
    );
}

// ---- services ----------------------------------------------------------------------------

#[test]
fn kvp_rejections() {
    let mut body = vec![0u8; 7432];
    body[1] = 5;
    assert_eq!(
        kvp::parse(&Message::parse(&message(2, &body)).unwrap()),
        Err(IcError::KvpPool(5))
    );
    body[1] = 0;
    body[0] = 6;
    assert_eq!(
        kvp::parse(&Message::parse(&message(2, &body)).unwrap()),
        Err(IcError::KvpOperation(6))
    );
    // GET needs the 4-byte header and the 2572-byte value.
    body[0] = 0;
    assert_eq!(
        kvp::parse(&Message::parse(&message(2, &body[..2575])).unwrap()),
        Err(IcError::BodyTooShort {
            message_type: MessageType::Kvp,
            needed: 2576,
            len: 2575
        })
    );
    // GET_IP_INFO needs 2 + 7426 bytes.
    body[0] = 4;
    assert_eq!(
        kvp::parse(&Message::parse(&message(2, &body[..7427])).unwrap()),
        Err(IcError::BodyTooShort {
            message_type: MessageType::Kvp,
            needed: 7428,
            len: 7427
        })
    );
    // A value type that is none of the three.
    let mut value = KvpExchangeValue::new("k", KvpValue::U32(1)).unwrap();
    value.value_type.set(3);
    assert_eq!(value.value(&mut []), Err(IcError::KvpValueType(3)));
    // A key longer than the field.
    let long = "k".repeat(256);
    assert_eq!(
        KvpExchangeValue::new(&long, KvpValue::U32(1)),
        Err(IcError::TextTooLong {
            needed: 514,
            capacity: 512
        })
    );
    assert_eq!(KvpPool::try_from(4), Ok(KvpPool::AutoInternal));
}

#[test]
fn fcopy_rejections() {
    let mut body = vec![0u8; 6196];
    body[0] = 4;
    assert_eq!(
        fcopy::parse(&Message::parse(&message(7, &body)).unwrap()),
        Err(IcError::FcopyOperation(4))
    );
    body[0] = 1;
    body[48..52].copy_from_slice(&6145u32.to_le_bytes());
    assert_eq!(
        fcopy::parse(&Message::parse(&message(7, &body)).unwrap()),
        Err(IcError::FcopyDataTooLong(6145))
    );
    body[48..52].copy_from_slice(&100u32.to_le_bytes());
    assert_eq!(
        fcopy::parse(&Message::parse(&message(7, &body[..151])).unwrap()),
        Err(IcError::BodyTooShort {
            message_type: MessageType::FileCopy,
            needed: 152,
            len: 151
        })
    );
    // START needs its whole body.
    body[0] = 0;
    assert!(matches!(
        fcopy::parse(&Message::parse(&message(7, &body[..1087])).unwrap()),
        Err(IcError::BodyTooShort { needed: 1088, .. })
    ));
    let header = Header::request(MessageType::FileCopy, v(3, 0), v(1, 1), 0);
    let mut out = vec![0u8; 7000];
    assert_eq!(
        fcopy::encode_write(&mut out, &header, [[0; 16]; 2], 0, &[0; DATA_FRAGMENT + 1]),
        Err(IcError::FcopyDataTooLong(6145))
    );
    assert_eq!(
        fcopy::encode_control(&mut out, &header, FcopyOperation::Write, [[0; 16]; 2]),
        Err(IcError::FcopyOperation(1))
    );
}

#[test]
fn shutdown_rejections() {
    let mut body = vec![0u8; 2060];
    for (bits, flags) in [
        (0, Action::PowerOff),
        (3, Action::Reboot),
        (5, Action::Hibernate),
    ] {
        body[8] = bits;
        let packet = message(3, &body);
        let parsed = Message::parse(&packet).unwrap();
        assert_eq!(
            shutdown::parse(&parsed).unwrap().flags().map(|f| f.action),
            Ok(flags)
        );
    }
    body[8] = 6;
    let packet = message(3, &body);
    let parsed = Message::parse(&packet).unwrap();
    assert_eq!(
        shutdown::parse(&parsed).unwrap().flags(),
        Err(IcError::ShutdownFlags(6))
    );
    body[12] = 0xFF;
    let packet = message(3, &body);
    let parsed = Message::parse(&packet).unwrap();
    assert_eq!(
        shutdown::parse(&parsed).unwrap().display_message(),
        Err(IcError::DisplayMessageNotUtf8)
    );
    let header = Header::request(MessageType::Shutdown, v(3, 0), v(3, 0), 0);
    let flags = ShutdownFlags {
        action: Action::PowerOff,
        force: false,
    };
    let mut out = vec![0u8; 3000];
    assert_eq!(
        shutdown::encode(&mut out, &header, flags, 0, 0, &"x".repeat(2048)),
        Err(IcError::TextTooLong {
            needed: 2049,
            capacity: 2048
        })
    );
    assert!(shutdown::encode(&mut out, &header, flags, 0, 0, &"x".repeat(2047)).is_ok());
}

#[test]
fn time_conversions() {
    assert_eq!(
        timesync::to_unix(timesync::UNIX_EPOCH_DELTA),
        Ok(Duration::ZERO)
    );
    assert_eq!(
        timesync::to_unix(timesync::UNIX_EPOCH_DELTA - 1),
        Err(IcError::TimeBeforeUnixEpoch(timesync::UNIX_EPOCH_DELTA - 1))
    );
    assert_eq!(
        timesync::to_unix(timesync::UNIX_EPOCH_DELTA + 15),
        Ok(Duration::from_nanos(1500))
    );
    assert_eq!(
        timesync::from_unix(Duration::from_nanos(1599)),
        Ok(timesync::UNIX_EPOCH_DELTA + 15)
    );
    assert_eq!(
        timesync::from_unix(Duration::from_secs(u64::MAX / 1000)),
        Err(IcError::TimeOutOfRange)
    );
    assert!(timesync::uses_reference_layout(v(3, 1)) && !timesync::uses_reference_layout(v(3, 0)));
}

// ---- properties --------------------------------------------------------------------------

/// Runs every typed parser over a parsed message; none may panic.
fn parse_every_way(message: &Message<'_>) {
    let _ = heartbeat::parse(message);
    let _ = shutdown::parse(message).map(|body| (body.flags(), body.display_message()));
    for version in [v(3, 0), v(4, 0)] {
        let _ = timesync::parse(message, version);
    }
    let mut text = [0u8; 64];
    if let Ok(Kvp::Get { data, .. } | Kvp::Set { data, .. }) = kvp::parse(message) {
        let _ = data.key(&mut text);
        let _ = data.value(&mut text);
    }
    if let Ok(Fcopy::Start(start)) = fcopy::parse(message) {
        let _ = start.file_name(&mut text);
    }
    let _ = negotiate::VersionLists::parse(message);
    let _ = negotiate::parse_response(message);
    let _ = negotiate::respond(
        message,
        UTIL_FRAMEWORK_VERSIONS,
        KVP_VERSIONS,
        &mut [0u8; 64],
    );
}

fn text(max_chars: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        any::<char>().prop_filter("no NUL", |c| *c != '\0'),
        0..max_chars,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn header(message_type: MessageType) -> impl Strategy<Value = Header> {
    (any::<(u16, u16, u16, u16, u32, u8)>()).prop_map(move |(a, b, c, d, status, tid)| Header {
        status,
        ..Header::request(message_type, v(a, b), v(c, d), tid)
    })
}

fn pool() -> impl Strategy<Value = KvpPool> {
    (0u8..5).prop_map(|p| KvpPool::try_from(p).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(message) = Message::parse(&bytes) {
            parse_every_way(&message);
        }
    }

    #[test]
    fn arbitrary_bodies_never_panic(
        message_type in prop::sample::select(&[0u16, 1, 2, 3, 4, 5, 7][..]),
        body in proptest::collection::vec(any::<u8>(), 0..8000),
        padding in 0usize..8,
    ) {
        let mut packet = message(message_type, &body);
        packet.extend(vec![0; padding]);
        if let Ok(message) = Message::parse(&packet) {
            prop_assert_eq!(message.body, &body[..]);
            parse_every_way(&message);
        }
    }

    #[test]
    fn heartbeat_round_trips(header in header(MessageType::Heartbeat), seq in any::<u64>()) {
        let mut out = [0u8; 68];
        let len = heartbeat::encode(&mut out, &header, seq).unwrap();
        let message = Message::parse(&out[..len]).unwrap();
        prop_assert_eq!(message.header, header);
        prop_assert_eq!(heartbeat::parse(&message), Ok(seq));
    }

    #[test]
    fn shutdown_round_trips(
        header in header(MessageType::Shutdown),
        bits in prop::sample::select(&[0u32, 1, 2, 3, 4, 5][..]),
        reason in any::<u32>(),
        timeout in any::<u32>(),
        display in text(200),
    ) {
        let flags = ShutdownFlags::try_from(bits).unwrap();
        prop_assert_eq!(flags.bits(), bits);
        let mut out = vec![0u8; 2100];
        let len = shutdown::encode(&mut out, &header, flags, reason, timeout, &display).unwrap();
        let message = Message::parse(&out[..len]).unwrap();
        prop_assert_eq!(message.header, header);
        let body = shutdown::parse(&message).unwrap();
        prop_assert_eq!(body.flags(), Ok(flags));
        prop_assert_eq!((body.reason_code(), body.timeout_seconds()), (reason, timeout));
        prop_assert_eq!(body.display_message(), Ok(display.as_str()));
    }

    #[test]
    fn timesync_round_trips(
        header in header(MessageType::TimeSync),
        times in any::<(u64, u64, u64)>(),
        small in any::<(u8, u8, u8)>(),
    ) {
        let mut out = [0u8; 64];
        let data = TimeSyncData::new(times.0, times.1, times.2, small.0);
        let len = encode_body(&mut out, &header, &data).unwrap();
        let message = Message::parse(&out[..len]).unwrap();
        prop_assert_eq!(timesync::parse(&message, v(3, 0)), Ok(TimeSync::Data(&data)));
        let reference = TimeSyncRefData::new(times.0, times.1, small.0, small.1, small.2);
        let len = encode_body(&mut out, &header, &reference).unwrap();
        let message = Message::parse(&out[..len]).unwrap();
        prop_assert_eq!(timesync::parse(&message, v(4, 0)), Ok(TimeSync::Reference(&reference)));
        if let Ok(unix) = timesync::to_unix(times.0) {
            prop_assert_eq!(timesync::from_unix(unix), Ok(times.0));
        }
    }

    #[test]
    fn kvp_round_trips(
        header in header(MessageType::Kvp),
        operation in 0u8..4,
        pool in pool(),
        key in text(120),
        value in text(500),
        number in any::<u64>(),
    ) {
        let values = [KvpValue::String(&value), KvpValue::U32(number as u32), KvpValue::U64(number)];
        let data = KvpExchangeValue::new(&key, values[usize::from(operation) % 3]).unwrap();
        let delete = kvp::KvpDelete::new(&key).unwrap();
        let entry = kvp::KvpEnumerate::new(number as u32, data);
        let kvp = match operation {
            0 => Kvp::Get { pool, data: &data },
            1 => Kvp::Set { pool, data: &data },
            2 => Kvp::Delete { pool, data: &delete },
            _ => Kvp::Enumerate { pool, data: &entry },
        };
        let mut out = vec![0u8; 7460];
        let len = kvp::encode(&mut out, &header, &kvp).unwrap();
        let message = Message::parse(&out[..len]).unwrap();
        prop_assert_eq!(message.header, header);
        prop_assert_eq!(kvp::parse(&message), Ok(kvp));
        let (mut key_out, mut value_out) = (vec![0u8; 512], vec![0u8; 2048]);
        prop_assert_eq!(data.key(&mut key_out), Ok(key.as_str()));
        prop_assert_eq!(data.value(&mut value_out), Ok(values[usize::from(operation) % 3]));
        prop_assert!(utf16::chars(&data.key, data.key_size.get()).unwrap().eq(key.chars()));
    }

    #[test]
    fn kvp_ip_round_trips(header in header(MessageType::Kvp), pool in pool(), address in text(300), set in any::<bool>()) {
        let mut ip = <kvp::KvpIpAddrValue as zerocopy::FromZeros>::new_zeroed();
        ip.set_text(kvp::IpField::DnsAddr, &address).unwrap();
        let kvp = if set { Kvp::SetIpInfo { pool, data: &ip } } else { Kvp::GetIpInfo { pool, data: &ip } };
        let mut out = vec![0u8; 7460];
        let len = kvp::encode(&mut out, &header, &kvp).unwrap();
        let message = Message::parse(&out[..len]).unwrap();
        prop_assert_eq!(kvp::parse(&message), Ok(kvp));
        let mut text = vec![0u8; 4096];
        prop_assert_eq!(ip.text(kvp::IpField::DnsAddr, &mut text), Ok(address.as_str()));
    }

    #[test]
    fn fcopy_round_trips(
        header in header(MessageType::FileCopy),
        ids in any::<[[u8; 16]; 2]>(),
        name in text(100),
        path in text(100),
        flags in any::<u32>(),
        offset in any::<u64>(),
        data in proptest::collection::vec(any::<u8>(), 0..=DATA_FRAGMENT),
    ) {
        let mut out = vec![0u8; 6300];
        let start = StartFcopy::new(ids, &name, &path, flags, offset).unwrap();
        let len = encode_body(&mut out, &header, &start).unwrap();
        let message = Message::parse(&out[..len]).unwrap();
        prop_assert_eq!(fcopy::parse(&message), Ok(Fcopy::Start(&start)));
        let mut text = vec![0u8; 1200];
        prop_assert_eq!(start.file_name(&mut text), Ok(name.as_str()));
        prop_assert_eq!(start.path_name(&mut text), Ok(path.as_str()));
        let len = fcopy::encode_write(&mut out, &header, ids, offset, &data).unwrap();
        let message = Message::parse(&out[..len]).unwrap();
        let Ok(Fcopy::Write { hdr, offset: parsed_offset, data: parsed }) = fcopy::parse(&message) else {
            return Err(TestCaseError::fail("not a write"));
        };
        prop_assert_eq!((hdr.service_ids(), parsed_offset, parsed), (ids, offset, &data[..]));
    }

    #[test]
    fn negotiate_round_trips(
        framework in proptest::collection::vec(any::<(u16, u16)>(), 0..6),
        messages in proptest::collection::vec(any::<(u16, u16)>(), 0..6),
        tid in any::<u8>(),
    ) {
        let framework: Vec<Version> = framework.into_iter().map(|(a, b)| v(a % 5, b % 2)).collect();
        let messages: Vec<Version> = messages.into_iter().map(|(a, b)| v(a % 5, b % 2)).collect();
        let mut request = [0u8; 128];
        let len = negotiate::encode_request(&mut request, tid, &framework, &messages).unwrap();
        let parsed = Message::parse(&request[..len]).unwrap();
        let lists = negotiate::VersionLists::parse(&parsed).unwrap();
        prop_assert_eq!(lists.framework().collect::<Vec<_>>(), framework.clone());
        prop_assert_eq!(lists.message().collect::<Vec<_>>(), messages.clone());
        let mut out = [0u8; 64];
        let answer = negotiate::respond(&parsed, UTIL_FRAMEWORK_VERSIONS, KVP_VERSIONS, &mut out).unwrap();
        let best = |ours: &[Version], theirs: &[Version]| ours.iter().copied().filter(|o| theirs.contains(o)).max();
        let expected = match (best(UTIL_FRAMEWORK_VERSIONS, &framework), best(KVP_VERSIONS, &messages)) {
            (Some(framework), Some(message)) => Ok(Negotiated { framework, message }),
            _ => Err(IcError::NoCommonVersion),
        };
        prop_assert_eq!(answer.outcome, expected);
        prop_assert_eq!(negotiate::parse_response(&Message::parse(&out[..answer.len]).unwrap()), expected);
    }
}
