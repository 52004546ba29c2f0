//! The host's side: requests to a guest agent's services, each service on its own channel.
//!
//! [`Host::negotiate`] opens a service the way Hyper-V does, with a version negotiation;
//! the methods then send one request at a time and wait for its answer, which carries the
//! request's transaction id. An answer that is not the one awaited (another transaction,
//! another type, not a response) is dropped and the wait goes on until the deadline; a
//! failure status is [`HostError::Refused`]; garbage is [`HostError::Codec`].

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use vmlink_channel::{ChannelError, PacketType, Wait};

use crate::agent::clock::{Clock, SystemClock, monotonic_reference};
use crate::fcopy::{self, DATA_FRAGMENT, FcopyOperation, StartFcopy};
use crate::kvp::{
    IpField, Kvp, KvpDelete, KvpEnumerate, KvpExchangeValue, KvpIpAddrValue, KvpPool, KvpValue,
};
use crate::link::IcLink;
use crate::negotiate::{self, Negotiated};
use crate::service::Service;
use crate::shutdown::ShutdownFlags;
use crate::status::{HV_E_FAIL, HV_S_CONT, HV_S_OK};
use crate::timesync::{self, FLAG_SAMPLE, FLAG_SYNC, TimeSyncData, TimeSyncRefData};
use crate::{Header, IcError, IcFlags, Message, MessageType, Version, heartbeat, kvp};

/// The two GUIDs of file-copy headers (the agent does not check them).
const FCOPY_SERVICE_IDS: fcopy::ServiceIds = [*b"vmlink-fcopy-v1\0", [0; 16]];

/// The most entries [`Host::kvp_list`] reads from one pool.
pub const MAX_LIST: u32 = 4096;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The channel failed or closed.
    #[error("channel: {0}")]
    Channel(#[from] ChannelError),
    /// A message could not be built, or the answer does not parse.
    #[error("message: {0}")]
    Codec(#[from] IcError),
    /// The agent answered with a failure status.
    #[error("the agent refused: status {status:#010x}")]
    Refused {
        /// The answer's status.
        status: u32,
    },
    /// No answer before the deadline.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// The agent offers no version this host speaks.
    #[error("the agent offers no common version")]
    NoCommonVersion,
    /// The answer parsed but says something else than it must (a heartbeat's number, ...).
    #[error("a wrong answer: {0}")]
    WrongAnswer(String),
    /// Reading the file to copy failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A negotiated service on a channel, and the requests it can send.
#[derive(Debug)]
pub struct Host<'l, L: IcLink> {
    link: &'l L,
    service: Service,
    version: Negotiated,
    next: u64,
    timeout: Duration,
    buf: Vec<u8>,
    out: Vec<u8>,
}

/// What a file copy moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes copied.
    pub bytes: u64,
    /// WRITE_TO_FILE messages sent.
    pub writes: u64,
    /// From START to the COMPLETE's answer.
    pub elapsed: Duration,
}

impl<'l, L: IcLink> Host<'l, L> {
    /// Opens `service` on `link`: negotiates versions, waiting at most `timeout` for this
    /// and for each later answer.
    pub fn negotiate(link: &'l L, service: Service, timeout: Duration) -> Result<Self, HostError> {
        let mut host = Self {
            link,
            service,
            version: Negotiated {
                framework: Version::default(),
                message: Version::default(),
            },
            next: 1,
            timeout,
            buf: vec![0u8; crate::agent::MAX_MESSAGE],
            out: vec![0u8; crate::agent::MAX_MESSAGE],
        };
        let tid = host.next_tid();
        let len = negotiate::encode_request(
            &mut host.out,
            tid as u8,
            service.framework_versions(),
            service.message_versions(),
        )?;
        let answer = host.exchange(tid, len, MessageType::Negotiate)?;
        host.version = match negotiate::parse_response(&answer) {
            Ok(v) => v,
            Err(IcError::NoCommonVersion) => return Err(HostError::NoCommonVersion),
            Err(e) => return Err(e.into()),
        };
        Ok(host)
    }

    /// The versions agreed on.
    pub fn version(&self) -> Negotiated {
        self.version
    }

    /// The service.
    pub fn service(&self) -> Service {
        self.service
    }

    fn next_tid(&mut self) -> u64 {
        let t = self.next;
        self.next = self.next.wrapping_add(1);
        t
    }

    fn header(&self, message_type: MessageType, tid: u64) -> Header {
        Header::request(
            message_type,
            self.version.framework,
            self.version.message,
            tid as u8,
        )
    }

    /// Sends `out[..len]` with transaction `tid` and waits for its answer of type `t`.
    fn exchange(&mut self, tid: u64, len: usize, t: MessageType) -> Result<Message<'_>, HostError> {
        let deadline = Instant::now() + self.timeout;
        self.link
            .send_message(tid, &self.out[..len], Wait::Until(deadline))
            .map_err(|e| timed_out(e, self.timeout))?;
        loop {
            let got = self
                .link
                .recv_message(&mut self.buf, Wait::Until(deadline))
                .map_err(|e| timed_out(e, self.timeout))?;
            if got.packet_type != PacketType::InBand || got.transaction_id != tid || !got.whole() {
                continue;
            }
            // Parsed twice: once to decide, once to hand out (the borrow checker's way).
            let fits = matches!(
                Message::parse(&self.buf[..got.copied]),
                Ok(m) if m.header.message_type == t
                    && m.header.flags.contains(IcFlags::RESPONSE)
                    && u64::from(m.header.transaction_id) == tid & 0xff
            );
            if !fits {
                continue;
            }
            let m = Message::parse(&self.buf[..got.copied])?;
            let status = m.header.status;
            if status != HV_S_OK && t != MessageType::Negotiate {
                return Err(HostError::Refused { status });
            }
            return Ok(m);
        }
    }

    /// Sends a heartbeat with `seq`; the agent must answer `seq + 1`.
    pub fn heartbeat(&mut self, seq: u64) -> Result<(), HostError> {
        let tid = self.next_tid();
        let header = self.header(MessageType::Heartbeat, tid);
        let len = heartbeat::encode(&mut self.out, &header, seq)?;
        let m = self.exchange(tid, len, MessageType::Heartbeat)?;
        let got = heartbeat::parse(&m)?;
        if got != seq.wrapping_add(1) {
            return Err(HostError::WrongAnswer(format!(
                "heartbeat {seq} answered with {got}"
            )));
        }
        Ok(())
    }

    /// Sends the host's clock now, as a sample (`sync` false) or a sync request, stamped
    /// with the monotonic reference when the negotiated version carries one.
    pub fn time(&mut self, sync: bool) -> Result<(), HostError> {
        let flags = if sync { FLAG_SYNC } else { FLAG_SAMPLE };
        let tid = self.next_tid();
        let header = self.header(MessageType::TimeSync, tid);
        let len = if timesync::uses_reference_layout(self.version.message) {
            let body = TimeSyncRefData::new(SystemClock.now(), monotonic_reference(), flags, 0, 0);
            crate::encode_body(&mut self.out, &header, &body)?
        } else {
            let body = TimeSyncData::new(SystemClock.now(), 0, 0, flags);
            crate::encode_body(&mut self.out, &header, &body)?
        };
        self.exchange(tid, len, MessageType::TimeSync)?;
        Ok(())
    }

    /// Asks the guest to shut down (or reboot, or hibernate).
    pub fn shutdown(
        &mut self,
        flags: ShutdownFlags,
        reason_code: u32,
        timeout_seconds: u32,
        message: &str,
    ) -> Result<(), HostError> {
        let tid = self.next_tid();
        let header = self.header(MessageType::Shutdown, tid);
        let len = crate::shutdown::encode(
            &mut self.out,
            &header,
            flags,
            reason_code,
            timeout_seconds,
            message,
        )?;
        self.exchange(tid, len, MessageType::Shutdown)?;
        Ok(())
    }

    fn kvp_exchange(&mut self, request: &Kvp<'_>) -> Result<Message<'_>, HostError> {
        let tid = self.next_tid();
        let header = self.header(MessageType::Kvp, tid);
        let len = kvp::encode(&mut self.out, &header, request)?;
        self.exchange(tid, len, MessageType::Kvp)
    }

    /// The value of `key` in `pool`; `None` when the agent has none (it answers
    /// `HV_E_FAIL`, as Linux's daemon does).
    pub fn kvp_get(&mut self, pool: KvpPool, key: &str) -> Result<Option<String>, HostError> {
        let data = KvpExchangeValue::new(key, KvpValue::String(""))?;
        let m = match self.kvp_exchange(&Kvp::Get { pool, data: &data }) {
            Err(HostError::Refused { status: HV_E_FAIL }) => return Ok(None),
            other => other?,
        };
        let Kvp::Get { data, .. } = kvp::parse(&m)? else {
            return Err(HostError::WrongAnswer(
                "a GET answered with another operation".into(),
            ));
        };
        Ok(Some(value_text(data)?))
    }

    /// Sets `key` to `value` in `pool`.
    pub fn kvp_set(&mut self, pool: KvpPool, key: &str, value: &str) -> Result<(), HostError> {
        let data = KvpExchangeValue::new(key, KvpValue::String(value))?;
        self.kvp_exchange(&Kvp::Set { pool, data: &data })?;
        Ok(())
    }

    /// Deletes `key` from `pool`; false when it was not there (or the agent refused).
    pub fn kvp_delete(&mut self, pool: KvpPool, key: &str) -> Result<bool, HostError> {
        let data = KvpDelete::new(key)?;
        match self.kvp_exchange(&Kvp::Delete { pool, data: &data }) {
            Ok(_) => Ok(true),
            Err(HostError::Refused { status: HV_E_FAIL }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every entry of `pool`, by enumerating from index 0 until the agent says there is no
    /// more (at most [`MAX_LIST`]).
    pub fn kvp_list(&mut self, pool: KvpPool) -> Result<Vec<(String, String)>, HostError> {
        let mut out = Vec::new();
        for index in 0..MAX_LIST {
            let data = KvpEnumerate::new(index, KvpExchangeValue::new("", KvpValue::String(""))?);
            let m = match self.kvp_exchange(&Kvp::Enumerate { pool, data: &data }) {
                Err(HostError::Refused {
                    status: HV_S_CONT | HV_E_FAIL,
                }) => break,
                other => other?,
            };
            let Kvp::Enumerate { data, .. } = kvp::parse(&m)? else {
                return Err(HostError::WrongAnswer(
                    "an ENUMERATE answered with another operation".into(),
                ));
            };
            let mut key = [0u8; 3 * kvp::MAX_KEY_SIZE];
            let key = data.data.key(&mut key)?.to_owned();
            out.push((key, value_text(&data.data)?));
        }
        Ok(out)
    }

    /// The addresses of the guest's adapter with MAC address `mac`: addresses, subnets,
    /// gateways and name servers, each `;`-separated.
    pub fn ip_info(&mut self, mac: &str) -> Result<[String; 4], HostError> {
        let mut request = <KvpIpAddrValue as zerocopy::FromZeros>::new_zeroed();
        request.set_text(IpField::AdapterId, mac)?;
        let m = self.kvp_exchange(&Kvp::GetIpInfo {
            pool: KvpPool::Auto,
            data: &request,
        })?;
        let Kvp::GetIpInfo { data, .. } = kvp::parse(&m)? else {
            return Err(HostError::WrongAnswer(
                "a GET_IP_INFO answered with another operation".into(),
            ));
        };
        let mut buf = vec![0u8; 3 * 2048];
        let mut field = |f| data.text(f, &mut buf).map(str::to_owned);
        Ok([
            field(IpField::IpAddr)?,
            field(IpField::SubNet)?,
            field(IpField::Gateway)?,
            field(IpField::DnsAddr)?,
        ])
    }

    fn fcopy_exchange(&mut self, tid: u64, len: usize) -> Result<(), HostError> {
        self.exchange(tid, len, MessageType::FileCopy).map(drop)
    }

    /// Starts a copy of a `size`-byte file named `name` into the guest directory `dir`.
    pub fn copy_start(
        &mut self,
        name: &str,
        dir: &str,
        flags: u32,
        size: u64,
    ) -> Result<(), HostError> {
        let tid = self.next_tid();
        let header = self.header(MessageType::FileCopy, tid);
        let start = StartFcopy::new(FCOPY_SERVICE_IDS, name, dir, flags, size)?;
        let len = crate::encode_body(&mut self.out, &header, &start)?;
        self.fcopy_exchange(tid, len)
    }

    /// Writes up to [`DATA_FRAGMENT`] bytes at `offset` of the copy in progress.
    pub fn copy_write(&mut self, offset: u64, data: &[u8]) -> Result<(), HostError> {
        let tid = self.next_tid();
        let header = self.header(MessageType::FileCopy, tid);
        let len = fcopy::encode_write(&mut self.out, &header, FCOPY_SERVICE_IDS, offset, data)?;
        self.fcopy_exchange(tid, len)
    }

    /// Completes (`true`) or cancels the copy in progress.
    pub fn copy_finish(&mut self, complete: bool) -> Result<(), HostError> {
        let tid = self.next_tid();
        let header = self.header(MessageType::FileCopy, tid);
        let op = if complete {
            FcopyOperation::Complete
        } else {
            FcopyOperation::Cancel
        };
        let len = fcopy::encode_control(&mut self.out, &header, op, FCOPY_SERVICE_IDS)?;
        self.fcopy_exchange(tid, len)
    }

    /// Copies the host file `src` to the guest as `name` in directory `dir`: START, the
    /// data in fragments, COMPLETE. A failure after START cancels the copy on the guest.
    pub fn copy_file(
        &mut self,
        src: &Path,
        dir: &str,
        name: &str,
        flags: u32,
    ) -> Result<CopyStats, HostError> {
        let mut file = File::open(src)?;
        let size = file.metadata()?.len();
        let started = Instant::now();
        self.copy_start(name, dir, flags, size)?;
        let mut chunk = vec![0u8; DATA_FRAGMENT];
        let (mut offset, mut writes) = (0u64, 0u64);
        let result = loop {
            let n = match file.read(&mut chunk) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e.into()),
            };
            if let Err(e) = self.copy_write(offset, &chunk[..n]) {
                break Err(e);
            }
            offset += n as u64;
            writes += 1;
        };
        let result = result.and_then(|()| {
            if offset == size {
                Ok(())
            } else {
                Err(HostError::WrongAnswer(format!(
                    "{} changed size during the copy ({size} then {offset} bytes)",
                    src.display()
                )))
            }
        });
        if let Err(e) = result {
            let _ = self.copy_finish(false);
            return Err(e);
        }
        self.copy_finish(true)?;
        Ok(CopyStats {
            bytes: offset,
            writes,
            elapsed: started.elapsed(),
        })
    }
}

/// A KVP value as text (numbers in decimal).
fn value_text(data: &KvpExchangeValue) -> Result<String, HostError> {
    let mut buf = vec![0u8; 3 * kvp::MAX_VALUE_SIZE];
    Ok(match data.value(&mut buf)? {
        KvpValue::String(s) => s.to_owned(),
        KvpValue::U32(n) => n.to_string(),
        KvpValue::U64(n) => n.to_string(),
    })
}

fn timed_out(e: ChannelError, timeout: Duration) -> HostError {
    match e {
        ChannelError::TimedOut => HostError::TimedOut(timeout),
        other => HostError::Channel(other),
    }
}
