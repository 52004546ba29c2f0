//! The services, each on a channel of its own as on Hyper-V: their message types, the
//! versions each side offers, and the names their channels go by on vmlink transports.

use crate::MessageType;
use crate::Version;
use crate::negotiate::{
    FCOPY_FRAMEWORK_VERSIONS, FCOPY_VERSIONS, HEARTBEAT_VERSIONS, KVP_VERSIONS, SHUTDOWN_VERSIONS,
    TIMESYNC_VERSIONS, UTIL_FRAMEWORK_VERSIONS,
};

/// An integration service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// "Are you alive": the guest answers each sequence number with the next.
    Heartbeat,
    /// The host asks the guest to shut down, reboot or hibernate.
    Shutdown,
    /// The host sends its clock.
    TimeSync,
    /// Key-value pairs in five pools.
    Kvp,
    /// Files copied from the host into the guest.
    FileCopy,
}

impl Service {
    /// Every service.
    pub const ALL: [Service; 5] = [
        Service::Heartbeat,
        Service::Shutdown,
        Service::TimeSync,
        Service::Kvp,
        Service::FileCopy,
    ];

    /// The channel's service name on vmlink transports (`ic-heartbeat`, ...).
    pub const fn channel_name(self) -> &'static str {
        match self {
            Service::Heartbeat => "ic-heartbeat",
            Service::Shutdown => "ic-shutdown",
            Service::TimeSync => "ic-timesync",
            Service::Kvp => "ic-kvp",
            Service::FileCopy => "ic-fcopy",
        }
    }

    /// The service whose channel is named `name`.
    pub fn from_channel_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.channel_name() == name)
    }

    /// The message type its requests carry (negotiation apart).
    pub const fn message_type(self) -> MessageType {
        match self {
            Service::Heartbeat => MessageType::Heartbeat,
            Service::Shutdown => MessageType::Shutdown,
            Service::TimeSync => MessageType::TimeSync,
            Service::Kvp => MessageType::Kvp,
            Service::FileCopy => MessageType::FileCopy,
        }
    }

    /// The framework versions both sides offer, highest first.
    pub const fn framework_versions(self) -> &'static [Version] {
        match self {
            Service::FileCopy => FCOPY_FRAMEWORK_VERSIONS,
            _ => UTIL_FRAMEWORK_VERSIONS,
        }
    }

    /// The message versions both sides offer, highest first.
    pub const fn message_versions(self) -> &'static [Version] {
        match self {
            Service::Heartbeat => HEARTBEAT_VERSIONS,
            Service::Shutdown => SHUTDOWN_VERSIONS,
            Service::TimeSync => TIMESYNC_VERSIONS,
            Service::Kvp => KVP_VERSIONS,
            Service::FileCopy => FCOPY_VERSIONS,
        }
    }
}

impl core::fmt::Display for Service {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.channel_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_distinct() {
        for s in Service::ALL {
            assert_eq!(Service::from_channel_name(s.channel_name()), Some(s));
        }
        assert_eq!(Service::from_channel_name("ic-vss"), None);
    }

    #[test]
    fn file_copy_offers_framework_3_only() {
        assert_eq!(Service::FileCopy.framework_versions(), [Version::new(3, 0)]);
        assert_eq!(Service::Kvp.framework_versions().len(), 2);
    }
}
