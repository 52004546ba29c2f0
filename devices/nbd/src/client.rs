//! [`NbdClient`]: fixed newstyle handshake with `NBD_OPT_GO`, then pipelined requests with
//! simple replies over a Unix stream socket.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::NbdError;
use crate::proto::*;
use crate::table::{InFlight, Kind, Recent};

/// The longest option reply the client reads during the handshake: 64 KiB. A longer one
/// is refused with [`NbdError::OptionReplyTooLong`] before anything is allocated for it.
pub const MAX_OPTION_REPLY_LEN: u32 = 64 * 1024;

/// The most replies the client takes for its one `NBD_OPT_GO` before giving up with
/// [`NbdError::TooManyOptionReplies`].
pub const MAX_OPTION_REPLIES: usize = 64;

/// The largest read or write the blocking calls send in one request: 32 MiB, the limit the
/// protocol recommends to clients that did not negotiate block sizes, and `qemu-nbd`'s
/// limit. Longer [`NbdClient::read_at`] / [`NbdClient::write_at`] calls are split.
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;

/// The most requests a client can be sized to keep in flight.
pub const MAX_IN_FLIGHT: usize = 1 << 16;

/// The handle the blocking calls use (any would do: they run with nothing else in flight).
const SYNC_HANDLE: u64 = 0;

const REQUEST_LEN: usize = 28;
const REPLY_LEN: usize = 16;
const SCRATCH_LEN: usize = 64 * 1024;

/// How a client connects: its queue depth and its timeout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectOptions {
    /// The most requests in flight at once (1 ..= [`MAX_IN_FLIGHT`]); the table of
    /// requests in flight is allocated once, at this size. Default 256.
    pub max_in_flight: usize,
    /// A bound on every wait for the socket: the whole handshake, and each read or write
    /// of the socket afterwards. `None` waits forever (not recommended: a dead server then
    /// hangs the caller). Default 30 s.
    pub timeout: Option<Duration>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            max_in_flight: 256,
            timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// The block size constraints a server sent (`NBD_INFO_BLOCK_SIZE`), for information:
/// the client did not ask for them, so it is not bound by them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// The smallest block size the server supports.
    pub minimum: u32,
    /// The block size the server prefers.
    pub preferred: u32,
    /// The largest request the server accepts.
    pub maximum: u32,
}

/// The reply to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The request's handle.
    pub handle: u64,
    /// 0 for success, else the NBD error number ([`crate::proto::EINVAL`], ...). A read
    /// that failed carried no data: its buffer is untouched.
    pub error: u32,
}

impl Reply {
    /// Whether the request succeeded.
    pub fn is_ok(&self) -> bool {
        self.error == 0
    }
}

/// A client of one NBD export over a Unix stream socket: simple replies only, requests
/// pipelined up to a fixed depth.
///
/// Requests are submitted with `submit_*` under handles the caller chooses (any `u64`
/// not in flight) and completed in the server's order with [`NbdClient::reap`], which
/// reads a read's data straight into the caller's buffer for that handle. Nothing on this
/// path allocates: the table of requests in flight is sized at connect. The blocking
/// calls ([`NbdClient::read_at`], [`NbdClient::write_at`], [`NbdClient::flush`],
/// [`NbdClient::trim`]) run one request at a time when nothing else is in flight.
///
/// A protocol violation by the server, end of file, or a socket error or timeout part way
/// through a message leaves the connection broken (see [`NbdError::is_fatal`]).
///
/// One thread both submits and reaps, so a submit blocks while the socket's send buffer
/// is full. A server that stops reading requests while its replies go unread (`qemu-nbd`
/// works on at most 16 requests per client) can then stall a caller that sends a large
/// write with many large reads unreaped, until the timeout breaks the connection. Reads
/// alone (28-byte requests) and writes alone (16-byte replies) cannot stall; for mixes,
/// reap before submitting more once the unread read data nears the socket buffer's size
/// (about 200 KiB by default on Linux).
#[derive(Debug)]
pub struct NbdClient {
    stream: UnixStream,
    size: u64,
    flags: u16,
    block_size: Option<BlockSize>,
    timeout: Option<Duration>,
    in_flight: InFlightDebug,
    broken: bool,
}

/// The table, the recent ring and the drain buffer, kept apart so `Debug` stays short.
struct InFlightDebug {
    table: InFlight,
    recent: Recent,
    scratch: Box<[u8]>,
}

impl std::fmt::Debug for InFlightDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("len", &self.table.len())
            .field("capacity", &self.table.capacity())
            .finish()
    }
}

impl NbdClient {
    /// Connects to the server's Unix socket at `path` and negotiates `export` with the
    /// default [`ConnectOptions`] (256 in flight, 30 s timeout).
    pub fn connect_unix(path: &Path, export: &str) -> Result<NbdClient, NbdError> {
        NbdClient::connect_unix_with(path, export, &ConnectOptions::default())
    }

    /// Connects to the server's Unix socket at `path` and negotiates `export`.
    pub fn connect_unix_with(
        path: &Path,
        export: &str,
        options: &ConnectOptions,
    ) -> Result<NbdClient, NbdError> {
        let stream = UnixStream::connect(path).map_err(|source| NbdError::Connect {
            path: path.to_owned(),
            source,
        })?;
        NbdClient::connect_stream_with(stream, export, options)
    }

    /// Negotiates `export` over an already connected stream (for example one end of
    /// [`UnixStream::pair`]) with the default [`ConnectOptions`].
    ///
    /// # Examples
    ///
    /// A fake server on the other end of a socket pair that answers the handshake and one
    /// read:
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::os::unix::net::UnixStream;
    /// use vmlink_nbd::NbdClient;
    ///
    /// let (ours, mut server) = UnixStream::pair()?;
    /// let fake = std::thread::spawn(move || -> std::io::Result<()> {
    ///     // Greeting, handshake flags FIXED_NEWSTYLE | NO_ZEROES.
    ///     server.write_all(b"NBDMAGICIHAVEOPT\x00\x03")?;
    ///     // Client flags (4 bytes), then NBD_OPT_GO: IHAVEOPT, option 7, length, data.
    ///     let mut head = [0u8; 20];
    ///     server.read_exact(&mut head)?;
    ///     let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
    ///     server.read_exact(&mut vec![0; len as usize])?;
    ///     // NBD_REP_INFO with NBD_INFO_EXPORT: size 4096, flags HAS_FLAGS | SEND_FLUSH.
    ///     let reply = |kind: u32, data: &[u8]| {
    ///         let mut r = 0x3e889045565a9u64.to_be_bytes().to_vec();
    ///         r.extend(7u32.to_be_bytes());
    ///         r.extend(kind.to_be_bytes());
    ///         r.extend((data.len() as u32).to_be_bytes());
    ///         r.extend(data);
    ///         r
    ///     };
    ///     let mut info = 0u16.to_be_bytes().to_vec();
    ///     info.extend(4096u64.to_be_bytes());
    ///     info.extend(0b101u16.to_be_bytes());
    ///     server.write_all(&reply(3, &info))?;
    ///     server.write_all(&reply(1, &[]))?; // NBD_REP_ACK
    ///     // One request (28 bytes): answer with a simple reply and 4 bytes of data.
    ///     let mut req = [0u8; 28];
    ///     server.read_exact(&mut req)?;
    ///     server.write_all(&0x67446698u32.to_be_bytes())?;
    ///     server.write_all(&0u32.to_be_bytes())?;
    ///     server.write_all(&req[8..16])?; // the handle
    ///     server.write_all(b"nbd!")?;
    ///     Ok(())
    /// });
    ///
    /// let mut client = NbdClient::connect_stream(ours, "")?;
    /// assert_eq!(client.size(), 4096);
    /// assert!(client.can_flush() && !client.can_trim() && !client.read_only());
    /// let mut buf = [0u8; 4];
    /// client.read_at(0, &mut buf)?;
    /// assert_eq!(&buf, b"nbd!");
    /// fake.join().unwrap()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn connect_stream(stream: UnixStream, export: &str) -> Result<NbdClient, NbdError> {
        NbdClient::connect_stream_with(stream, export, &ConnectOptions::default())
    }

    /// Negotiates `export` over an already connected stream.
    ///
    /// The handshake: the server's greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags),
    /// the client's flags (`NBD_FLAG_C_FIXED_NEWSTYLE`, and `NBD_FLAG_C_NO_ZEROES` if the
    /// server offers it), then `NBD_OPT_GO` for `export` with no information requests,
    /// answered by `NBD_REP_INFO`s (`NBD_INFO_EXPORT` is required) and `NBD_REP_ACK`. A
    /// server that answers `NBD_REP_ERR_UNSUP` gets `NBD_OPT_EXPORT_NAME` instead; any
    /// other error reply is [`NbdError::OptionRefused`], after which the client ends the
    /// negotiation with `NBD_OPT_ABORT`. Structured replies are not requested.
    pub fn connect_stream_with(
        stream: UnixStream,
        export: &str,
        options: &ConnectOptions,
    ) -> Result<NbdClient, NbdError> {
        if options.max_in_flight == 0 || options.max_in_flight > MAX_IN_FLIGHT {
            return Err(NbdError::InvalidOption(
                "max_in_flight must be between 1 and MAX_IN_FLIGHT (65536)",
            ));
        }
        if options.timeout == Some(Duration::ZERO) {
            return Err(NbdError::InvalidOption("timeout must not be zero"));
        }
        if export.len() > MAX_STRING_LEN {
            return Err(NbdError::InvalidExportName {
                len: export.len(),
                reason: "longer than the protocol's 4096 bytes",
            });
        }
        if export.contains('\0') {
            return Err(NbdError::InvalidExportName {
                len: export.len(),
                reason: "contains a NUL character",
            });
        }
        let hs = Handshake::new(&stream, options.timeout);
        let export_info = hs.negotiate(export)?;
        set_timeouts(&stream, options.timeout)?;
        Ok(NbdClient {
            stream,
            size: export_info.size,
            flags: export_info.flags,
            block_size: export_info.block_size,
            timeout: options.timeout,
            in_flight: InFlightDebug {
                table: InFlight::new(options.max_in_flight),
                recent: Recent::new(options.max_in_flight),
                scratch: vec![0; SCRATCH_LEN].into_boxed_slice(),
            },
            broken: false,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export's transmission flags as the server sent them
    /// ([`crate::proto::FLAG_READ_ONLY`], ...).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Whether the export is read-only (`NBD_FLAG_READ_ONLY`). Writes are still sent if
    /// asked for, and the server refuses them: the protocol asks for `EPERM`, `qemu-nbd`
    /// 10.0 answers `EINVAL`.
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    /// Whether the server accepts flushes (`NBD_FLAG_SEND_FLUSH`).
    pub fn can_flush(&self) -> bool {
        self.flags & FLAG_SEND_FLUSH != 0
    }

    /// Whether the server accepts trims (`NBD_FLAG_SEND_TRIM`).
    pub fn can_trim(&self) -> bool {
        self.flags & FLAG_SEND_TRIM != 0
    }

    /// Whether the server says several connections to this export see each other's
    /// writes consistently (`NBD_FLAG_CAN_MULTI_CONN`).
    pub fn can_multi_conn(&self) -> bool {
        self.flags & FLAG_CAN_MULTI_CONN != 0
    }

    /// The block size constraints the server volunteered, if it did.
    pub fn block_size(&self) -> Option<BlockSize> {
        self.block_size
    }

    /// How many requests are in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.table.len()
    }

    /// The most requests that can be in flight ([`ConnectOptions::max_in_flight`]).
    pub fn max_in_flight(&self) -> usize {
        self.in_flight.table.capacity()
    }

    /// Whether an earlier fatal error broke the connection.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Changes the bound on each read or write of the socket (`None`: wait forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), NbdError> {
        if timeout == Some(Duration::ZERO) {
            return Err(NbdError::InvalidOption("timeout must not be zero"));
        }
        set_timeouts(&self.stream, timeout)?;
        self.timeout = timeout;
        Ok(())
    }

    /// Sends a read of `len` bytes at `offset` under `handle`. Its data arrives with
    /// [`NbdClient::reap`].
    pub fn submit_read(&mut self, handle: u64, offset: u64, len: u32) -> Result<(), NbdError> {
        self.submit(CMD_READ, handle, offset, len, &[], Kind::Read(len))
    }

    /// Sends a write of `data` at `offset` under `handle`. The data is written to the
    /// socket straight from `data` (one vectored write with the header), not copied.
    pub fn submit_write(&mut self, handle: u64, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len()).map_err(|_| NbdError::OutOfRange {
            offset,
            len: data.len() as u64,
        })?;
        self.submit(CMD_WRITE, handle, offset, len, data, Kind::NoData)
    }

    /// Sends a flush under `handle`: when it is answered, every write answered before it
    /// was sent is on stable storage. [`NbdError::Unsupported`] if the server did not
    /// advertise flushes.
    pub fn submit_flush(&mut self, handle: u64) -> Result<(), NbdError> {
        if !self.can_flush() {
            return Err(NbdError::Unsupported { command: "flush" });
        }
        self.submit(CMD_FLUSH, handle, 0, 0, &[], Kind::NoData)
    }

    /// Sends a trim of `len` bytes at `offset` under `handle`: the server may discard
    /// them, and their contents are unspecified until written again.
    /// [`NbdError::Unsupported`] if the server did not advertise trims.
    pub fn submit_trim(&mut self, handle: u64, offset: u64, len: u32) -> Result<(), NbdError> {
        if !self.can_trim() {
            return Err(NbdError::Unsupported { command: "trim" });
        }
        self.submit(CMD_TRIM, handle, offset, len, &[], Kind::NoData)
    }

    fn submit(
        &mut self,
        command: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
        kind: Kind,
    ) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        if offset.checked_add(u64::from(len)).is_none() {
            return Err(NbdError::OutOfRange {
                offset,
                len: len.into(),
            });
        }
        let table = &self.in_flight.table;
        if table.len() >= table.capacity() {
            return Err(NbdError::QueueFull {
                capacity: table.capacity(),
            });
        }
        if table.contains(handle) {
            return Err(NbdError::HandleInUse { handle });
        }
        let mut header = [0u8; REQUEST_LEN];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        // header[4..6]: command flags, none.
        header[6..8].copy_from_slice(&command.to_be_bytes());
        header[8..16].copy_from_slice(&handle.to_be_bytes());
        header[16..24].copy_from_slice(&offset.to_be_bytes());
        header[24..28].copy_from_slice(&len.to_be_bytes());
        let mut bufs = [IoSlice::new(&header), IoSlice::new(payload)];
        let slices = if payload.is_empty() {
            &mut bufs[..1]
        } else {
            &mut bufs[..]
        };
        write_all_vectored(&self.stream, slices, "sending a request", self.timeout)
            .map_err(|e| self.fail_if_fatal(e))?;
        self.in_flight.table.insert(handle, kind);
        Ok(())
    }

    /// Waits for the next reply, in whatever order the server answers, and completes its
    /// request.
    ///
    /// For a successful read, `buffer_for(handle)` is called once with the read's handle
    /// and the data is read straight into the slice it gives (its first `len` bytes; it may
    /// be longer). `None` drops the data. A slice shorter than the read drops the data
    /// and returns [`NbdError::BufferTooSmall`] (the request is complete and the
    /// connection usable). `buffer_for` is not called for other replies.
    ///
    /// An error reply is `Ok` with [`Reply::error`] set. [`NbdError::NothingInFlight`] if
    /// nothing is in flight. A timeout before any byte of the reply arrived leaves the
    /// connection usable, so `reap` can be called again.
    ///
    /// ```no_run
    /// # use vmlink_nbd::NbdClient;
    /// # fn f(client: &mut NbdClient) -> Result<(), vmlink_nbd::NbdError> {
    /// let mut buffers = vec![vec![0u8; 4096]; 32];
    /// for (i, _) in buffers.iter().enumerate() {
    ///     client.submit_read(i as u64, i as u64 * 4096, 4096)?;
    /// }
    /// while client.in_flight() > 0 {
    ///     let reply = client.reap(|handle| buffers.get_mut(handle as usize).map(|b| &mut b[..]))?;
    ///     assert!(reply.is_ok());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn reap<'b>(
        &mut self,
        buffer_for: impl FnOnce(u64) -> Option<&'b mut [u8]>,
    ) -> Result<Reply, NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        if self.in_flight.table.len() == 0 {
            return Err(NbdError::NothingInFlight);
        }
        let mut header = [0u8; REPLY_LEN];
        read_all(
            &self.stream,
            &mut header,
            "reading a reply header",
            self.timeout,
        )
        .map_err(|e| self.fail_if_fatal(e))?;
        let magic = u32::from_be_bytes(header[0..4].try_into().unwrap_or_default());
        let error = u32::from_be_bytes(header[4..8].try_into().unwrap_or_default());
        let handle = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(self.fail(NbdError::BadMagic {
                context: if magic == STRUCTURED_REPLY_MAGIC {
                    "reply header (a structured reply, which was not negotiated)"
                } else {
                    "reply header"
                },
                expected: SIMPLE_REPLY_MAGIC.into(),
                found: magic.into(),
            }));
        }
        let Some(kind) = self.in_flight.table.remove(handle) else {
            let e = if self.in_flight.recent.contains(handle) {
                NbdError::DuplicateReply { handle }
            } else {
                NbdError::UnknownHandle { handle }
            };
            return Err(self.fail(e));
        };
        self.in_flight.recent.push(handle);
        let reply = Reply { handle, error };
        let Kind::Read(len) = kind else {
            return Ok(reply);
        };
        if error != 0 {
            return Ok(reply);
        }
        let len_usize = len as usize;
        match buffer_for(handle) {
            Some(buf) if buf.len() >= len_usize => {
                let timeout = self.timeout;
                read_all(
                    &self.stream,
                    &mut buf[..len_usize],
                    "reading a read reply's data",
                    timeout,
                )
                .map_err(|e| self.fail(e.mid_message()))?;
                Ok(reply)
            }
            Some(buf) => {
                let buffer = buf.len();
                self.drain(len)?;
                Err(NbdError::BufferTooSmall {
                    handle,
                    len,
                    buffer,
                })
            }
            None => {
                self.drain(len)?;
                Ok(reply)
            }
        }
    }

    /// Reads and drops `len` bytes of reply data.
    fn drain(&mut self, len: u32) -> Result<(), NbdError> {
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(self.in_flight.scratch.len());
            let timeout = self.timeout;
            read_all(
                &self.stream,
                &mut self.in_flight.scratch[..n],
                "reading a read reply's data",
                timeout,
            )
            .map_err(|e| self.fail(e.mid_message()))?;
            left -= n;
        }
        Ok(())
    }

    /// Marks the connection broken if `e` is fatal, and gives it back.
    fn fail_if_fatal(&mut self, e: NbdError) -> NbdError {
        if e.is_fatal() {
            self.broken = true;
        }
        e
    }

    /// Marks the connection broken and gives `e` back.
    fn fail(&mut self, e: NbdError) -> NbdError {
        self.broken = true;
        e
    }

    fn ensure_idle(&self) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        match self.in_flight.table.len() {
            0 => Ok(()),
            in_flight => Err(NbdError::Busy { in_flight }),
        }
    }

    /// Waits for the reply to the one request in flight and turns an error reply into
    /// [`NbdError::Server`].
    fn complete_one(
        &mut self,
        buf: Option<&mut [u8]>,
        command: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<(), NbdError> {
        let reply = self.reap(|_| buf)?;
        match reply.error {
            0 => Ok(()),
            errno => Err(NbdError::Server {
                command,
                offset,
                len,
                errno,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`, one request of at most [`MAX_REQUEST_LEN`]
    /// bytes at a time. Needs nothing else in flight ([`NbdError::Busy`]). A refused read
    /// is [`NbdError::Server`] (a read past the end: `EINVAL`).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.ensure_idle()?;
        check_range(offset, buf.len())?;
        let mut at = offset;
        for chunk in buf.chunks_mut(MAX_REQUEST_LEN as usize) {
            let len = chunk.len() as u32;
            self.submit_read(SYNC_HANDLE, at, len)?;
            self.complete_one(Some(chunk), "read", at, len.into())?;
            at += u64::from(len);
        }
        Ok(())
    }

    /// Writes `data` at `offset`, one request of at most [`MAX_REQUEST_LEN`] bytes at a
    /// time. Needs nothing else in flight. A refused write is [`NbdError::Server`] (to a
    /// read-only export: `EPERM`, or `EINVAL` from `qemu-nbd`; past the end: `ENOSPC`,
    /// or `EINVAL` from `qemu-nbd`).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.ensure_idle()?;
        check_range(offset, data.len())?;
        let mut at = offset;
        for chunk in data.chunks(MAX_REQUEST_LEN as usize) {
            self.submit_write(SYNC_HANDLE, at, chunk)?;
            self.complete_one(None, "write", at, chunk.len() as u64)?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// Flushes: every write answered so far is on stable storage when this returns.
    /// Needs nothing else in flight.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.ensure_idle()?;
        self.submit_flush(SYNC_HANDLE)?;
        self.complete_one(None, "flush", 0, 0)
    }

    /// Trims `len` bytes at `offset` (their contents are unspecified until written
    /// again). Needs nothing else in flight.
    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.ensure_idle()?;
        self.submit_trim(SYNC_HANDLE, offset, len)?;
        self.complete_one(None, "trim", offset, len.into())
    }

    /// Ends the session: sends `NBD_CMD_DISC` and shuts the socket down. Requests still in
    /// flight are abandoned (the server finishes them). On a broken connection nothing is
    /// sent.
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        if self.broken {
            return Ok(());
        }
        let mut header = [0u8; REQUEST_LEN];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        let mut slices = [IoSlice::new(&header)];
        write_all_vectored(
            &self.stream,
            &mut slices,
            "sending NBD_CMD_DISC",
            self.timeout,
        )?;
        self.broken = true;
        // The server closes its end; nothing is lost if this fails.
        let _ = self.stream.shutdown(Shutdown::Both);
        Ok(())
    }
}

fn check_range(offset: u64, len: usize) -> Result<(), NbdError> {
    match u64::try_from(len)
        .ok()
        .and_then(|len| offset.checked_add(len))
    {
        Some(_) => Ok(()),
        None => Err(NbdError::OutOfRange {
            offset,
            len: len as u64,
        }),
    }
}

fn set_timeouts(stream: &UnixStream, timeout: Option<Duration>) -> Result<(), NbdError> {
    let io = |source| NbdError::Io {
        context: "setting the socket's timeout",
        source,
    };
    stream.set_read_timeout(timeout).map_err(io)?;
    stream.set_write_timeout(timeout).map_err(io)
}

impl NbdError {
    /// A timeout that struck part way through a message.
    fn mid_message(self) -> NbdError {
        match self {
            NbdError::Timeout {
                context, timeout, ..
            } => NbdError::Timeout {
                context,
                timeout,
                mid_message: true,
            },
            e => e,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads exactly `buf.len()` bytes. A timeout is fatal (`mid_message`) unless nothing had
/// been read yet.
fn read_all(
    mut stream: &UnixStream,
    buf: &mut [u8],
    context: &'static str,
    timeout: Option<Duration>,
) -> Result<(), NbdError> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(NbdError::Eof { context }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(NbdError::Timeout {
                    context,
                    timeout: timeout.unwrap_or_default(),
                    mid_message: got > 0,
                });
            }
            Err(source) => return Err(NbdError::Io { context, source }),
        }
    }
    Ok(())
}

/// Writes every byte of `slices`. A timeout is fatal (`mid_message`) unless nothing had
/// been written yet.
fn write_all_vectored(
    mut stream: &UnixStream,
    mut slices: &mut [IoSlice<'_>],
    context: &'static str,
    timeout: Option<Duration>,
) -> Result<(), NbdError> {
    let mut written = 0usize;
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => {
                return Err(NbdError::Io {
                    context,
                    source: io::ErrorKind::WriteZero.into(),
                });
            }
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut slices, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(NbdError::Timeout {
                    context,
                    timeout: timeout.unwrap_or_default(),
                    mid_message: written > 0,
                });
            }
            Err(source) => return Err(NbdError::Io { context, source }),
        }
    }
    Ok(())
}

/// What the handshake learns about the export.
struct ExportInfo {
    size: u64,
    flags: u16,
    block_size: Option<BlockSize>,
}

/// The handshake's socket, with one deadline over all of it.
struct Handshake<'s> {
    stream: &'s UnixStream,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
}

impl<'s> Handshake<'s> {
    fn new(stream: &'s UnixStream, timeout: Option<Duration>) -> Handshake<'s> {
        Handshake {
            stream,
            timeout,
            deadline: timeout.map(|t| Instant::now() + t),
        }
    }

    /// Sets the socket's timeouts to what is left of the deadline.
    fn arm(&self, context: &'static str) -> Result<(), NbdError> {
        let Some(deadline) = self.deadline else {
            return set_timeouts(self.stream, None);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(NbdError::Timeout {
                context,
                timeout: self.timeout.unwrap_or_default(),
                mid_message: true,
            });
        }
        set_timeouts(self.stream, Some(left))
    }

    fn read(&self, buf: &mut [u8], context: &'static str) -> Result<(), NbdError> {
        self.arm(context)?;
        read_all(self.stream, buf, context, self.timeout).map_err(NbdError::mid_message)
    }

    fn write(&self, data: &[u8], context: &'static str) -> Result<(), NbdError> {
        self.arm(context)?;
        let mut slices = [IoSlice::new(data)];
        write_all_vectored(self.stream, &mut slices, context, self.timeout)
            .map_err(NbdError::mid_message)
    }

    fn read_u64(&self, context: &'static str) -> Result<u64, NbdError> {
        let mut b = [0u8; 8];
        self.read(&mut b, context)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads the greeting and sends the client flags; gives whether the zeroes after
    /// `NBD_OPT_EXPORT_NAME` are left out.
    fn greet(&self) -> Result<bool, NbdError> {
        let magic = self.read_u64("reading the server's greeting")?;
        if magic != NBDMAGIC {
            return Err(NbdError::BadMagic {
                context: "server greeting",
                expected: NBDMAGIC,
                found: magic,
            });
        }
        let magic = self.read_u64("reading the server's greeting")?;
        if magic == CLISERV_MAGIC {
            return Err(NbdError::OldstyleServer);
        }
        if magic != IHAVEOPT {
            return Err(NbdError::BadMagic {
                context: "server greeting (IHAVEOPT)",
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let mut b = [0u8; 2];
        self.read(&mut b, "reading the handshake flags")?;
        let flags = u16::from_be_bytes(b);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::NotFixedNewstyle { flags });
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let client_flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        self.write(&client_flags.to_be_bytes(), "sending the client flags")?;
        Ok(no_zeroes)
    }

    fn send_option(&self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.write(&msg, "sending an option")
    }

    /// Reads one option reply to `option` into `data` (at most
    /// [`MAX_OPTION_REPLY_LEN`] bytes); gives its type.
    fn read_option_reply(&self, option: u32, data: &mut Vec<u8>) -> Result<u32, NbdError> {
        let mut h = [0u8; 20];
        self.read(&mut h, "reading an option reply")?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
        let replied = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
        let reply_type = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
        if magic != OPTION_REPLY_MAGIC {
            return Err(NbdError::BadMagic {
                context: "option reply",
                expected: OPTION_REPLY_MAGIC,
                found: magic,
            });
        }
        if replied != option {
            return Err(NbdError::UnexpectedOptionReply {
                expected: option,
                option: replied,
                reply_type,
            });
        }
        if len > MAX_OPTION_REPLY_LEN {
            return Err(NbdError::OptionReplyTooLong {
                len,
                limit: MAX_OPTION_REPLY_LEN,
            });
        }
        data.clear();
        data.resize(len as usize, 0);
        self.read(data, "reading an option reply's data")?;
        Ok(reply_type)
    }

    fn negotiate(&self, export: &str) -> Result<ExportInfo, NbdError> {
        let no_zeroes = self.greet()?;
        // NBD_OPT_GO: name length, name, no information requests.
        let mut go = Vec::with_capacity(6 + export.len());
        go.extend_from_slice(&(export.len() as u32).to_be_bytes());
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &go)?;

        let mut data = Vec::new();
        let mut export_info: Option<(u64, u16)> = None;
        let mut block_size = None;
        for _ in 0..MAX_OPTION_REPLIES {
            match self.read_option_reply(OPT_GO, &mut data)? {
                REP_INFO => {
                    let bad = |info_type| NbdError::BadInfo {
                        info_type,
                        len: data.len() as u32,
                    };
                    let Some(kind) = data.get(0..2) else {
                        return Err(bad(0));
                    };
                    let kind = u16::from_be_bytes([kind[0], kind[1]]);
                    let word = |at: usize| {
                        u32::from_be_bytes(data[at..at + 4].try_into().unwrap_or_default())
                    };
                    match kind {
                        INFO_EXPORT if data.len() == 12 => {
                            let size =
                                u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                            let flags = u16::from_be_bytes([data[10], data[11]]);
                            export_info = Some((size, flags));
                        }
                        INFO_BLOCK_SIZE if data.len() == 14 => {
                            block_size = Some(BlockSize {
                                minimum: word(2),
                                preferred: word(6),
                                maximum: word(10),
                            });
                        }
                        INFO_EXPORT | INFO_BLOCK_SIZE => return Err(bad(kind)),
                        // The client must ignore information it does not understand.
                        _ => {}
                    }
                }
                REP_ACK => {
                    let Some((size, flags)) = export_info else {
                        return Err(NbdError::MissingExportInfo);
                    };
                    return check_export(size, flags, block_size);
                }
                REP_ERR_UNSUP => {
                    // A server without NBD_OPT_GO: fall back to NBD_OPT_EXPORT_NAME,
                    // after which it cannot report errors (it closes the connection).
                    return self.export_name(export, no_zeroes);
                }
                code if code & REP_FLAG_ERROR != 0 => {
                    let mut message = String::from_utf8_lossy(&data).escape_debug().to_string();
                    if message.len() > MAX_STRING_LEN {
                        let mut end = MAX_STRING_LEN;
                        while !message.is_char_boundary(end) {
                            end -= 1;
                        }
                        message.truncate(end);
                    }
                    // A soft disconnect, as the protocol asks of a client that gives up;
                    // the connection is dropped next, so a failure changes nothing.
                    let _ = self.send_option(OPT_ABORT, &[]);
                    return Err(NbdError::OptionRefused {
                        option: "NBD_OPT_GO",
                        export: export.to_owned(),
                        code,
                        message,
                    });
                }
                reply_type => {
                    return Err(NbdError::UnexpectedOptionReply {
                        expected: OPT_GO,
                        option: OPT_GO,
                        reply_type,
                    });
                }
            }
        }
        Err(NbdError::TooManyOptionReplies {
            limit: MAX_OPTION_REPLIES,
        })
    }

    fn export_name(&self, export: &str, no_zeroes: bool) -> Result<ExportInfo, NbdError> {
        self.send_option(OPT_EXPORT_NAME, export.as_bytes())?;
        let mut b = [0u8; 10];
        self.read(&mut b, "reading the reply to NBD_OPT_EXPORT_NAME")?;
        let size = u64::from_be_bytes(b[0..8].try_into().unwrap_or_default());
        let flags = u16::from_be_bytes([b[8], b[9]]);
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            self.read(&mut zeroes, "reading the reply to NBD_OPT_EXPORT_NAME")?;
        }
        check_export(size, flags, None)
    }
}

fn check_export(
    size: u64,
    flags: u16,
    block_size: Option<BlockSize>,
) -> Result<ExportInfo, NbdError> {
    if size > i64::MAX as u64 {
        return Err(NbdError::BadExportSize { size });
    }
    if flags & FLAG_HAS_FLAGS == 0 {
        return Err(NbdError::BadTransmissionFlags { flags });
    }
    Ok(ExportInfo {
        size,
        flags,
        block_size,
    })
}

/// Checks that a newstyle NBD server answers on `stream`, then ends the negotiation
/// cleanly with `NBD_OPT_ABORT` (so the server logs nothing and keeps no export open).
pub(crate) fn probe(stream: &UnixStream, timeout: Duration) -> Result<(), NbdError> {
    let hs = Handshake::new(stream, Some(timeout));
    hs.greet()?;
    hs.send_option(OPT_ABORT, &[])?;
    let mut data = Vec::new();
    match hs.read_option_reply(OPT_ABORT, &mut data) {
        // The server may close without answering: still a server.
        Ok(_) | Err(NbdError::Eof { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}
