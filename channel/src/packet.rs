//! GPA-direct and transfer-page headers: encoding what we send, validating what we receive.
//!
//! These live in the ring core, [`vmlink_ring::header`], so a `no_std` peer without this
//! crate builds and checks the same bytes; they are re-exported here under their old
//! names. Parsing works on bytes already copied out of the ring, so each value is read
//! once; every count, offset and page number is checked with checked arithmetic against
//! the header's length before it is used, and nothing is allocated.

pub use vmlink_ring::header::{
    GpaHeader, GpaRange, GpaRanges, MAX_HEADER_LEN, PacketError, ReceivedGpaRange, TransferPages,
    TransferPagesHeader, encode_gpa_header, gpa_header_len, pages_spanned, parse_gpa_header,
    parse_transfer_page_header, transfer_page_header_len, validate_gpa_header,
    validate_transfer_page_header,
};
