//! Shutdown: the host asks the guest to power off, reboot or hibernate.
//!
//! # Examples
//!
//! ```
//! use vmlink_ic::shutdown::{self, Action, ShutdownFlags};
//! use vmlink_ic::{Header, Message, MessageType, Version};
//!
//! let header = Header::request(MessageType::Shutdown, Version::new(3, 0), Version::new(3, 2), 2);
//! let flags = ShutdownFlags { action: Action::Reboot, force: true };
//! let mut out = [0u8; 2100];
//! let len = shutdown::encode(&mut out, &header, flags, 0x8000_0000, 30, "patching")?;
//!
//! let message = Message::parse(&out[..len])?;
//! let body = shutdown::parse(&message)?;
//! assert_eq!(body.flags()?, flags);
//! assert_eq!(body.timeout_seconds(), 30);
//! assert_eq!(body.display_message()?, "patching");
//! # Ok::<(), vmlink_ic::IcError>(())
//! ```

use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::message::{Body, encode_in_place};
use crate::{Header, IcError, Message, MessageType};

/// Bytes of the display message field.
pub const DISPLAY_MESSAGE_LEN: usize = 2048;

/// `struct shutdown_msg_data`: the shutdown body (2060 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ShutdownMsg {
    /// Reason code.
    pub reason_code: U32,
    /// Seconds the host grants the guest.
    pub timeout_seconds: U32,
    /// What to do ([`ShutdownFlags`]).
    pub flags: U32,
    /// A message to show, NUL-terminated.
    pub display_message: [u8; DISPLAY_MESSAGE_LEN],
}

impl Body for ShutdownMsg {
    const MESSAGE_TYPE: MessageType = MessageType::Shutdown;
}

/// What the host asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Shut down (flags 0).
    PowerOff,
    /// Reboot (flags 2, message version 3.1 and later).
    Reboot,
    /// Hibernate (flags 4, message version 3.2 and later).
    Hibernate,
}

/// The shutdown body's `flags`: an action, and whether to perform it by force (bit 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShutdownFlags {
    /// The action.
    pub action: Action,
    /// Perform it by force (Linux always does).
    pub force: bool,
}

impl ShutdownFlags {
    /// The wire value.
    pub const fn bits(self) -> u32 {
        let action = match self.action {
            Action::PowerOff => 0,
            Action::Reboot => 2,
            Action::Hibernate => 4,
        };
        action | self.force as u32
    }
}

impl TryFrom<u32> for ShutdownFlags {
    type Error = IcError;

    /// Values 0 to 5, as Linux's `shutdown_onchannelcallback` accepts them.
    fn try_from(bits: u32) -> Result<Self, IcError> {
        let action = match bits & !1 {
            0 => Action::PowerOff,
            2 => Action::Reboot,
            4 => Action::Hibernate,
            _ => return Err(IcError::ShutdownFlags(bits)),
        };
        Ok(Self {
            action,
            force: bits & 1 != 0,
        })
    }
}

impl ShutdownMsg {
    /// The reason code.
    pub fn reason_code(&self) -> u32 {
        self.reason_code.get()
    }

    /// Seconds the host grants the guest.
    pub fn timeout_seconds(&self) -> u32 {
        self.timeout_seconds.get()
    }

    /// The flags, checked.
    pub fn flags(&self) -> Result<ShutdownFlags, IcError> {
        ShutdownFlags::try_from(self.flags.get())
    }

    /// The display message: the bytes before the first NUL (or all 2048), as UTF-8.
    pub fn display_message(&self) -> Result<&str, IcError> {
        let field = &self.display_message;
        let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        core::str::from_utf8(&field[..end]).map_err(|_| IcError::DisplayMessageNotUtf8)
    }
}

/// The body of a shutdown message (the whole 2060 bytes, which Linux requires).
pub fn parse<'a>(message: &Message<'a>) -> Result<&'a ShutdownMsg, IcError> {
    message.body_view(MessageType::Shutdown)
}

/// Writes a shutdown message. `display_message` must leave room for its NUL terminator
/// (at most 2047 bytes) and hold no NUL itself.
pub fn encode(
    out: &mut [u8],
    header: &Header,
    flags: ShutdownFlags,
    reason_code: u32,
    timeout_seconds: u32,
    display_message: &str,
) -> Result<usize, IcError> {
    if display_message.contains('\0') {
        return Err(IcError::TextHasNul);
    }
    let text = display_message.as_bytes();
    if text.len() >= DISPLAY_MESSAGE_LEN {
        return Err(IcError::TextTooLong {
            needed: text.len() + 1,
            capacity: DISPLAY_MESSAGE_LEN,
        });
    }
    encode_in_place(
        out,
        header,
        MessageType::Shutdown,
        |body: &mut ShutdownMsg| {
            body.reason_code = U32::new(reason_code);
            body.timeout_seconds = U32::new(timeout_seconds);
            body.flags = U32::new(flags.bits());
            body.display_message[..text.len()].copy_from_slice(text);
            Ok(())
        },
    )
}
