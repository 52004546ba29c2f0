//! The wire format against Linux: every struct's size and field offsets as Linux's headers give
//! them, and hand-written messages (bytes laid out from Linux's struct definitions) that decode
//! to the expected values and that the encoders reproduce byte for byte.

use core::mem::{offset_of, size_of};
use core::time::Duration;

use vmlink_ic::fcopy::{self, DoFcopy, Fcopy, FcopyHeader, StartFcopy};
use vmlink_ic::kvp::{
    self, IpField, Kvp, KvpDelete, KvpEnumerate, KvpExchangeValue, KvpHeader, KvpIpAddrValue,
    KvpIpMsg, KvpMsg, KvpPool, KvpValue,
};
use vmlink_ic::negotiate::{self, HEARTBEAT_VERSIONS, Negotiated, UTIL_FRAMEWORK_VERSIONS};
use vmlink_ic::shutdown::{self, Action, ShutdownFlags, ShutdownMsg};
use vmlink_ic::status::{HV_E_FAIL, HV_S_OK};
use vmlink_ic::timesync::{self, TimeSync, TimeSyncData, TimeSyncRefData};
use vmlink_ic::wire::{IcMsgHeader, IcVersion, NegotiateHeader, PipeHeader};
use vmlink_ic::{Header, IcFlags, Message, MessageType, Version, encode_body, heartbeat};
use zerocopy::FromZeros;

/// Bytes from whitespace-separated hex pairs.
fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|pair| u8::from_str_radix(pair, 16).expect("a hex byte"))
        .collect()
}

/// `parts` concatenated, a run of `n` zero bytes standing for each `Zeros(n)`.
enum Part<'a> {
    Hex(&'a str),
    Zeros(usize),
}

fn bytes(parts: &[Part<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        match part {
            Part::Hex(text) => out.extend(hex(text)),
            Part::Zeros(n) => out.resize(out.len() + n, 0),
        }
    }
    out
}

use Part::{Hex, Zeros};

/// Runs `encode` into a fresh buffer and returns what it wrote.
fn encoded(encode: impl FnOnce(&mut [u8]) -> Result<usize, vmlink_ic::IcError>) -> Vec<u8> {
    let mut out = vec![0xEE; 8192];
    let len = encode(&mut out).expect("encodes");
    out.truncate(len);
    out
}

#[test]
fn sizes_and_offsets_are_linuxs() {
    // include/linux/hyperv.h
    assert_eq!(size_of::<PipeHeader>(), 8);
    assert_eq!(offset_of!(PipeHeader, flags), 0);
    assert_eq!(offset_of!(PipeHeader, msgsize), 4);
    assert_eq!(size_of::<IcVersion>(), 4);
    assert_eq!(offset_of!(IcVersion, minor), 2);
    assert_eq!(size_of::<IcMsgHeader>(), 20);
    assert_eq!(offset_of!(IcMsgHeader, icverframe), 0);
    assert_eq!(offset_of!(IcMsgHeader, icmsgtype), 4);
    assert_eq!(offset_of!(IcMsgHeader, icvermsg), 6);
    assert_eq!(offset_of!(IcMsgHeader, icmsgsize), 10);
    assert_eq!(offset_of!(IcMsgHeader, status), 12);
    assert_eq!(offset_of!(IcMsgHeader, ictransaction_id), 16);
    assert_eq!(offset_of!(IcMsgHeader, icflags), 17);
    assert_eq!(offset_of!(IcMsgHeader, reserved), 18);
    assert_eq!(vmlink_ic::wire::ICMSG_HDR, 28);
    assert_eq!(size_of::<NegotiateHeader>(), 8);
    assert_eq!(offset_of!(NegotiateHeader, icmsg_vercnt), 2);
    assert_eq!(offset_of!(NegotiateHeader, reserved), 4);
    assert_eq!(size_of::<heartbeat::HeartbeatMsg>(), 40);
    assert_eq!(offset_of!(heartbeat::HeartbeatMsg, reserved), 8);
    assert_eq!(size_of::<ShutdownMsg>(), 2060);
    assert_eq!(offset_of!(ShutdownMsg, timeout_seconds), 4);
    assert_eq!(offset_of!(ShutdownMsg, flags), 8);
    assert_eq!(offset_of!(ShutdownMsg, display_message), 12);
    assert_eq!(size_of::<TimeSyncData>(), 25);
    assert_eq!(offset_of!(TimeSyncData, childtime), 8);
    assert_eq!(offset_of!(TimeSyncData, roundtriptime), 16);
    assert_eq!(offset_of!(TimeSyncData, flags), 24);
    assert_eq!(size_of::<TimeSyncRefData>(), 22);
    assert_eq!(offset_of!(TimeSyncRefData, vmreferencetime), 8);
    assert_eq!(offset_of!(TimeSyncRefData, flags), 16);
    assert_eq!(offset_of!(TimeSyncRefData, leapflags), 17);
    assert_eq!(offset_of!(TimeSyncRefData, stratum), 18);
    assert_eq!(offset_of!(TimeSyncRefData, reserved), 19);
    // include/uapi/linux/hyperv.h
    assert_eq!(size_of::<KvpHeader>(), 4);
    assert_eq!(offset_of!(KvpHeader, pool), 1);
    assert_eq!(offset_of!(KvpHeader, pad), 2);
    assert_eq!(size_of::<KvpExchangeValue>(), 2572);
    assert_eq!(offset_of!(KvpExchangeValue, key_size), 4);
    assert_eq!(offset_of!(KvpExchangeValue, value_size), 8);
    assert_eq!(offset_of!(KvpExchangeValue, key), 12);
    assert_eq!(offset_of!(KvpExchangeValue, value), 524);
    assert_eq!(size_of::<KvpDelete>(), 516);
    assert_eq!(offset_of!(KvpDelete, key), 4);
    assert_eq!(size_of::<KvpEnumerate>(), 2576);
    assert_eq!(offset_of!(KvpEnumerate, data), 4);
    assert_eq!(size_of::<KvpIpAddrValue>(), 7426);
    assert_eq!(offset_of!(KvpIpAddrValue, addr_family), 256);
    assert_eq!(offset_of!(KvpIpAddrValue, dhcp_enabled), 257);
    assert_eq!(offset_of!(KvpIpAddrValue, ip_addr), 258);
    assert_eq!(offset_of!(KvpIpAddrValue, sub_net), 2306);
    assert_eq!(offset_of!(KvpIpAddrValue, gate_way), 4354);
    assert_eq!(offset_of!(KvpIpAddrValue, dns_addr), 5378);
    assert_eq!(size_of::<KvpMsg>(), 7432);
    assert_eq!(offset_of!(KvpMsg, body), 4);
    assert_eq!(size_of::<KvpIpMsg>(), 7428);
    assert_eq!(offset_of!(KvpIpMsg, pool), 1);
    assert_eq!(offset_of!(KvpIpMsg, kvp_ip_val), 2);
    assert_eq!(size_of::<FcopyHeader>(), 36);
    assert_eq!(offset_of!(FcopyHeader, service_id0), 4);
    assert_eq!(offset_of!(FcopyHeader, service_id1), 20);
    assert_eq!(size_of::<StartFcopy>(), 1088);
    assert_eq!(offset_of!(StartFcopy, file_name), 36);
    assert_eq!(offset_of!(StartFcopy, path_name), 556);
    assert_eq!(offset_of!(StartFcopy, copy_flags), 1076);
    assert_eq!(offset_of!(StartFcopy, file_size), 1080);
    assert_eq!(size_of::<DoFcopy>(), 6196);
    assert_eq!(offset_of!(DoFcopy, pad), 36);
    assert_eq!(offset_of!(DoFcopy, offset), 40);
    assert_eq!(offset_of!(DoFcopy, size), 48);
    assert_eq!(offset_of!(DoFcopy, data), 52);
}

#[test]
fn constants_are_linuxs() {
    assert_eq!(MessageType::Negotiate as u16, 0);
    assert_eq!(MessageType::Heartbeat as u16, 1);
    assert_eq!(MessageType::Kvp as u16, 2);
    assert_eq!(MessageType::Shutdown as u16, 3);
    assert_eq!(MessageType::TimeSync as u16, 4);
    assert_eq!(MessageType::Vss as u16, 5);
    assert_eq!(MessageType::FileCopy as u16, 7);
    assert_eq!(
        (
            IcFlags::TRANSACTION.0,
            IcFlags::REQUEST.0,
            IcFlags::RESPONSE.0
        ),
        (1, 2, 4)
    );
    assert_eq!(HV_E_FAIL, 0x8000_4005);
    assert_eq!(vmlink_ic::status::HV_S_CONT, 0x8007_0103);
    assert_eq!(vmlink_ic::status::HV_ERROR_ALREADY_EXISTS, 0x8007_0050);
    assert_eq!(vmlink_ic::status::HV_ERROR_DISK_FULL, 0x8007_0070);
    assert_eq!(vmlink_ic::status::HV_INVALIDARG, 0x8007_0057);
    assert_eq!(timesync::UNIX_EPOCH_DELTA, 116_444_736_000_000_000);
    assert_eq!(
        (
            timesync::FLAG_PROBE,
            timesync::FLAG_SYNC,
            timesync::FLAG_SAMPLE
        ),
        (0, 1, 2)
    );
    assert_eq!((kvp::REG_SZ, kvp::REG_U32, kvp::REG_U64), (1, 4, 8));
    assert_eq!((fcopy::OVER_WRITE, fcopy::CREATE_PATH), (1, 2));
}

// ---- negotiate ---------------------------------------------------------------------------

/// A heartbeat negotiate request: framework 3.0 and 1.0, message 3.0 and 1.0, transaction 0.
const NEGOTIATE_REQUEST: &str = "
    01 00 00 00  2c 00 00 00
    00 00 00 00  00 00  00 00 00 00  18 00  00 00 00 00  00  03  00 00
    02 00 02 00  00 00 00 00
    03 00 00 00  01 00 00 00  03 00 00 00  01 00 00 00";

/// Our answer: counts 1/1, framework 3.0, heartbeat 3.0, a 16-byte body.
const NEGOTIATE_ANSWER: &str = "
    01 00 00 00  24 00 00 00
    00 00 00 00  00 00  00 00 00 00  10 00  00 00 00 00  00  05  00 00
    01 00 01 00  00 00 00 00
    03 00 00 00  03 00 00 00";

/// Linux's answer to the same request: the whole request buffer sent back with `icmsgsize`
/// 0x10, the counts 1/1 and the two slots rewritten; `msgsize` and the old table's tail stay.
const NEGOTIATE_ANSWER_LINUX: &str = "
    01 00 00 00  2c 00 00 00
    00 00 00 00  00 00  00 00 00 00  10 00  00 00 00 00  00  05  00 00
    01 00 01 00  00 00 00 00
    03 00 00 00  03 00 00 00  03 00 00 00  01 00 00 00";

#[test]
fn negotiate_fixtures() {
    let v = |major, minor| Version::new(major, minor);
    let request = hex(NEGOTIATE_REQUEST);
    assert_eq!(
        encoded(|out| negotiate::encode_request(out, 0, &[v(3, 0), v(1, 0)], &[v(3, 0), v(1, 0)])),
        request
    );
    let message = Message::parse(&request).unwrap();
    assert_eq!(
        message.header.flags,
        IcFlags::TRANSACTION | IcFlags::REQUEST
    );
    let lists = negotiate::VersionLists::parse(&message).unwrap();
    assert_eq!(lists.framework().collect::<Vec<_>>(), [v(3, 0), v(1, 0)]);
    assert_eq!(lists.message().collect::<Vec<_>>(), [v(3, 0), v(1, 0)]);

    let mut out = vec![0xEE; 64];
    let answer = negotiate::respond(
        &message,
        UTIL_FRAMEWORK_VERSIONS,
        HEARTBEAT_VERSIONS,
        &mut out,
    )
    .unwrap();
    let chosen = Negotiated {
        framework: v(3, 0),
        message: v(3, 0),
    };
    assert_eq!(answer.outcome, Ok(chosen));
    assert_eq!(out[..answer.len], hex(NEGOTIATE_ANSWER)[..]);

    for fixture in [NEGOTIATE_ANSWER, NEGOTIATE_ANSWER_LINUX] {
        let bytes = hex(fixture);
        let parsed = Message::parse(&bytes).unwrap();
        assert_eq!(parsed.header.status, HV_S_OK);
        assert_eq!(parsed.body.len(), 16);
        assert_eq!(negotiate::parse_response(&parsed), Ok(chosen));
    }
}

// ---- heartbeat ---------------------------------------------------------------------------

#[test]
fn heartbeat_fixtures() {
    // Framework 3.0, heartbeat 3.0, transaction 5, sequence 0x1234.
    let request = bytes(&[
        Hex("01 00 00 00  3c 00 00 00
             03 00 00 00  01 00  03 00 00 00  28 00  00 00 00 00  05  03  00 00
             34 12 00 00 00 00 00 00"),
        Zeros(32),
    ]);
    let answer = bytes(&[
        Hex("01 00 00 00  3c 00 00 00
             03 00 00 00  01 00  03 00 00 00  28 00  00 00 00 00  05  05  00 00
             35 12 00 00 00 00 00 00"),
        Zeros(32),
    ]);
    let header = Header::request(
        MessageType::Heartbeat,
        Version::new(3, 0),
        Version::new(3, 0),
        5,
    );
    assert_eq!(
        encoded(|out| heartbeat::encode(out, &header, 0x1234)),
        request
    );
    let message = Message::parse(&request).unwrap();
    assert_eq!(message.header, header);
    assert_eq!(message.pipe_flags, 1);
    assert_eq!(heartbeat::parse(&message), Ok(0x1234));
    assert_eq!(encoded(|out| heartbeat::answer(&message, out)), answer);
    assert_eq!(
        heartbeat::parse(&Message::parse(&answer).unwrap()),
        Ok(0x1235)
    );

    // A host may leave out the reserved words: 8 bytes of body are enough (as for Linux).
    let short = hex("01 00 00 00  1c 00 00 00
         03 00 00 00  01 00  03 00 00 00  08 00  00 00 00 00  05  03  00 00
         34 12 00 00 00 00 00 00");
    assert_eq!(
        heartbeat::parse(&Message::parse(&short).unwrap()),
        Ok(0x1234)
    );
}

// ---- shutdown ----------------------------------------------------------------------------

#[test]
fn shutdown_fixture() {
    // Framework 3.0, shutdown 3.2, transaction 9: reason 0x80000000, 30 s, reboot by force,
    // "Bye".
    let request = bytes(&[
        Hex("01 00 00 00  20 08 00 00
             03 00 00 00  03 00  03 00 02 00  0c 08  00 00 00 00  09  03  00 00
             00 00 00 80  1e 00 00 00  03 00 00 00  42 79 65"),
        Zeros(2045),
    ]);
    let header = Header::request(
        MessageType::Shutdown,
        Version::new(3, 0),
        Version::new(3, 2),
        9,
    );
    let flags = ShutdownFlags {
        action: Action::Reboot,
        force: true,
    };
    assert_eq!(
        encoded(|out| shutdown::encode(out, &header, flags, 0x8000_0000, 30, "Bye")),
        request
    );
    let message = Message::parse(&request).unwrap();
    assert_eq!(message.header, header);
    let body = shutdown::parse(&message).unwrap();
    assert_eq!(body.reason_code(), 0x8000_0000);
    assert_eq!(body.timeout_seconds(), 30);
    assert_eq!(body.flags(), Ok(flags));
    assert_eq!(body.display_message(), Ok("Bye"));
}

// ---- time sync ---------------------------------------------------------------------------

/// 2023-11-14 22:13:20 UTC (Unix 1,700,000,000 s) in 100 ns units since 1601.
const HOST_TIME: u64 = 133_444_736_000_000_000;

#[test]
fn timesync_fixtures() {
    // Version 3.0: `ictimesync_data`, a SAMPLE with round trip 0x10.
    let v3 = hex("01 00 00 00  2d 00 00 00
         03 00 00 00  04 00  03 00 00 00  19 00  00 00 00 00  01  03  00 00
         00 00 6d c6 47 17 da 01  00 00 00 00 00 00 00 00  10 00 00 00 00 00 00 00  02");
    let header = Header::request(
        MessageType::TimeSync,
        Version::new(3, 0),
        Version::new(3, 0),
        1,
    );
    let data = TimeSyncData::new(HOST_TIME, 0, 0x10, timesync::FLAG_SAMPLE);
    assert_eq!(encoded(|out| encode_body(out, &header, &data)), v3);
    let message = Message::parse(&v3).unwrap();
    let sample = timesync::parse(&message, Version::new(3, 0)).unwrap();
    assert_eq!(sample, TimeSync::Data(&data));
    assert!(sample.is_sample() && !sample.is_sync());
    assert_eq!(
        timesync::to_unix(sample.parent_time()),
        Ok(Duration::from_secs(1_700_000_000))
    );

    // Version 4.0: `ictimesync_ref_data`, a SYNC with reference time 0x12345678, stratum 2.
    let v4 = hex("01 00 00 00  2a 00 00 00
         03 00 00 00  04 00  04 00 00 00  16 00  00 00 00 00  02  03  00 00
         00 00 6d c6 47 17 da 01  78 56 34 12 00 00 00 00  01  00  02  00 00 00");
    let header = Header::request(
        MessageType::TimeSync,
        Version::new(3, 0),
        Version::new(4, 0),
        2,
    );
    let data = TimeSyncRefData::new(HOST_TIME, 0x1234_5678, timesync::FLAG_SYNC, 0, 2);
    assert_eq!(encoded(|out| encode_body(out, &header, &data)), v4);
    let message = Message::parse(&v4).unwrap();
    let sample = timesync::parse(&message, Version::new(4, 0)).unwrap();
    assert_eq!(sample, TimeSync::Reference(&data));
    assert!(sample.is_sync());
    assert_eq!(sample.parent_time(), HOST_TIME);
    // The 22-byte body is too short for the 3.0 layout.
    assert!(timesync::parse(&message, Version::new(3, 0)).is_err());
}

// ---- KVP ---------------------------------------------------------------------------------

fn kvp_header(transaction_id: u8) -> Header {
    Header::request(
        MessageType::Kvp,
        Version::new(3, 0),
        Version::new(4, 0),
        transaction_id,
    )
}

#[test]
fn kvp_set_fixture() {
    // SET in the guest pool: key "Ab", string value "xyz"; the whole 7432-byte hv_kvp_msg.
    let request = bytes(&[
        Hex("01 00 00 00  1c 1d 00 00
             03 00 00 00  02 00  04 00 00 00  08 1d  00 00 00 00  03  03  00 00
             01 01 00 00
             01 00 00 00  06 00 00 00  08 00 00 00
             41 00 62 00 00 00"),
        Zeros(506),
        Hex("78 00 79 00 7a 00 00 00"),
        Zeros(2040 + 4856),
    ]);
    let value = KvpExchangeValue::new("Ab", KvpValue::String("xyz")).unwrap();
    let set = Kvp::Set {
        pool: KvpPool::Guest,
        data: &value,
    };
    assert_eq!(
        encoded(|out| kvp::encode(out, &kvp_header(3), &set)),
        request
    );
    let message = Message::parse(&request).unwrap();
    let Kvp::Set { pool, data } = kvp::parse(&message).unwrap() else {
        panic!("not a SET")
    };
    assert_eq!(pool, KvpPool::Guest);
    let (mut key, mut text) = ([0u8; 16], [0u8; 16]);
    assert_eq!(data.key(&mut key), Ok("Ab"));
    assert_eq!(data.value(&mut text), Ok(KvpValue::String("xyz")));
}

#[test]
fn kvp_get_fixture() {
    // GET in the auto pool: key "OS", empty value (its terminator alone).
    let request = bytes(&[
        Hex("01 00 00 00  1c 1d 00 00
             03 00 00 00  02 00  04 00 00 00  08 1d  00 00 00 00  07  03  00 00
             00 02 00 00
             01 00 00 00  06 00 00 00  02 00 00 00
             4f 00 53 00 00 00"),
        Zeros(506 + 2048 + 4856),
    ]);
    let value = KvpExchangeValue::new("OS", KvpValue::String("")).unwrap();
    let get = Kvp::Get {
        pool: KvpPool::Auto,
        data: &value,
    };
    assert_eq!(
        encoded(|out| kvp::encode(out, &kvp_header(7), &get)),
        request
    );
    let parsed = kvp::parse(&Message::parse(&request).unwrap()).unwrap();
    assert_eq!(parsed, get);
    assert_eq!(parsed.operation(), kvp::KvpOperation::Get);
    let mut text = [0u8; 4];
    let Kvp::Get { data, .. } = parsed else {
        panic!("not a GET")
    };
    assert_eq!(data.value(&mut text), Ok(KvpValue::String("")));
}

#[test]
fn kvp_get_ip_info_fixture() {
    // GET_IP_INFO: hv_kvp_ip_msg, no padding, the addresses at byte 2 of the body; adapter
    // "eth0", IPv4, DHCP on, address "10.0.0.2".
    let request = bytes(&[
        Hex("01 00 00 00  18 1d 00 00
             03 00 00 00  02 00  04 00 00 00  04 1d  00 00 00 00  08  03  00 00
             04 00
             65 00 74 00 68 00 30 00 00 00"),
        Zeros(246),
        Hex("01 01
             31 00 30 00 2e 00 30 00 2e 00 30 00 2e 00 32 00 00 00"),
        Zeros(2030 + 2048 + 1024 + 2048),
    ]);
    let mut ip = KvpIpAddrValue::new_zeroed();
    ip.set_text(IpField::AdapterId, "eth0").unwrap();
    ip.addr_family = kvp::ADDR_FAMILY_IPV4;
    ip.dhcp_enabled = 1;
    ip.set_text(IpField::IpAddr, "10.0.0.2").unwrap();
    let get = Kvp::GetIpInfo {
        pool: KvpPool::External,
        data: &ip,
    };
    assert_eq!(
        encoded(|out| kvp::encode(out, &kvp_header(8), &get)),
        request
    );
    let Kvp::GetIpInfo { pool, data } = kvp::parse(&Message::parse(&request).unwrap()).unwrap()
    else {
        panic!("not GET_IP_INFO")
    };
    assert_eq!(pool, KvpPool::External);
    let mut text = [0u8; 32];
    assert_eq!(data.text(IpField::AdapterId, &mut text), Ok("eth0"));
    assert_eq!(data.text(IpField::IpAddr, &mut text), Ok("10.0.0.2"));
    assert_eq!(data.text(IpField::Gateway, &mut text), Ok(""));
    assert_eq!((data.addr_family, data.dhcp_enabled), (1, 1));
}

#[test]
fn kvp_delete_and_enumerate_round_trip() {
    let mut out = vec![0u8; 8192];
    let delete = KvpDelete::new("gone").unwrap();
    let len = kvp::encode(
        &mut out,
        &kvp_header(1),
        &Kvp::Delete {
            pool: KvpPool::External,
            data: &delete,
        },
    )
    .unwrap();
    assert_eq!(len, 28 + 7432);
    // key_size at body byte 4, the key at byte 8.
    assert_eq!(
        out[28..40],
        hex("02 00 00 00  0a 00 00 00  67 00 6f 00")[..]
    );
    let Kvp::Delete { data, .. } = kvp::parse(&Message::parse(&out[..len]).unwrap()).unwrap()
    else {
        panic!("not a DELETE")
    };
    assert_eq!(data.key(&mut [0u8; 8]), Ok("gone"));

    let entry = KvpEnumerate::new(
        3,
        KvpExchangeValue::new("n", KvpValue::U64(1 << 40)).unwrap(),
    );
    let len = kvp::encode(
        &mut out,
        &kvp_header(2),
        &Kvp::Enumerate {
            pool: KvpPool::Auto,
            data: &entry,
        },
    )
    .unwrap();
    // The index at body byte 4, value_type (REG_U64) at byte 8.
    assert_eq!(
        out[28..40],
        hex("03 02 00 00  03 00 00 00  08 00 00 00")[..]
    );
    let Kvp::Enumerate { data, .. } = kvp::parse(&Message::parse(&out[..len]).unwrap()).unwrap()
    else {
        panic!("not an ENUMERATE")
    };
    assert_eq!(data.index.get(), 3);
    assert_eq!(data.data.value(&mut []), Ok(KvpValue::U64(1 << 40)));
    let number = KvpExchangeValue::new("k", KvpValue::U32(0xDEAD_BEEF)).unwrap();
    assert_eq!(number.value(&mut []), Ok(KvpValue::U32(0xDEAD_BEEF)));
    assert_eq!(number.value_size.get(), 4);
}

// ---- file copy ---------------------------------------------------------------------------

const SERVICE_ID: [u8; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
const SERVICE_IDS: fcopy::ServiceIds = [SERVICE_ID, [0; 16]];

fn fcopy_header(transaction_id: u8) -> Header {
    Header::request(
        MessageType::FileCopy,
        Version::new(3, 0),
        Version::new(1, 1),
        transaction_id,
    )
}

#[test]
fn fcopy_start_fixture() {
    // START_FILE_COPY of "a.txt" into "/tmp", OVER_WRITE | CREATE_PATH, 4096 bytes.
    let request = bytes(&[
        Hex("01 00 00 00  54 04 00 00
             03 00 00 00  07 00  01 00 01 00  40 04  00 00 00 00  04  03  00 00
             00 00 00 00  01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10"),
        Zeros(16),
        Hex("61 00 2e 00 74 00 78 00 74 00 00 00"),
        Zeros(508),
        Hex("2f 00 74 00 6d 00 70 00 00 00"),
        Zeros(510),
        Hex("03 00 00 00  00 10 00 00 00 00 00 00"),
    ]);
    let start = StartFcopy::new(SERVICE_IDS, "a.txt", "/tmp", 3, 4096).unwrap();
    assert_eq!(
        encoded(|out| encode_body(out, &fcopy_header(4), &start)),
        request
    );
    let Fcopy::Start(parsed) = fcopy::parse(&Message::parse(&request).unwrap()).unwrap() else {
        panic!("not a START")
    };
    let mut text = [0u8; 16];
    assert_eq!(parsed.file_name(&mut text), Ok("a.txt"));
    assert_eq!(parsed.path_name(&mut text), Ok("/tmp"));
    assert_eq!((parsed.copy_flags.get(), parsed.file_size.get()), (3, 4096));
    assert_eq!(parsed.hdr.service_id0, SERVICE_ID);
}

#[test]
fn fcopy_write_fixture() {
    // WRITE_TO_FILE of "hi!" at offset 0x2000: the whole 6196-byte hv_do_fcopy.
    let request = bytes(&[
        Hex("01 00 00 00  48 18 00 00
             03 00 00 00  07 00  01 00 01 00  34 18  00 00 00 00  0b  03  00 00
             01 00 00 00  01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10"),
        Zeros(16),
        Hex("00 00 00 00  00 20 00 00 00 00 00 00  03 00 00 00  68 69 21"),
        Zeros(6141),
    ]);
    assert_eq!(
        encoded(|out| fcopy::encode_write(out, &fcopy_header(11), SERVICE_IDS, 0x2000, b"hi!")),
        request
    );
    let Fcopy::Write { hdr, offset, data } =
        fcopy::parse(&Message::parse(&request).unwrap()).unwrap()
    else {
        panic!("not a WRITE")
    };
    assert_eq!((offset, data), (0x2000, &b"hi!"[..]));
    assert_eq!(hdr.service_ids(), SERVICE_IDS);

    // COMPLETE_FCOPY is the header alone.
    let complete = encoded(|out| {
        fcopy::encode_control(
            out,
            &fcopy_header(12),
            fcopy::FcopyOperation::Complete,
            SERVICE_IDS,
        )
    });
    assert_eq!(complete.len(), 28 + 36);
    assert_eq!(complete[28..32], hex("02 00 00 00")[..]);
    assert!(matches!(
        fcopy::parse(&Message::parse(&complete).unwrap()),
        Ok(Fcopy::Complete(_))
    ));
}
