#!/usr/bin/env python3
"""Writes the hand-made seed inputs in corpus/<target>/seed-*.

The targets decode structured input with `arbitrary` 1.x (derive). Its encoding, which this
script mirrors: integers little-endian; bool = low bit of a byte; Option = bool then value;
enum = u32 variant selector, variant i of n chosen by (u32 * n) >> 32; Vec = each element
preceded by a byte with the low bit set, ended by a byte with it clear. When a target's input
types change, update the encoders here, re-run `python3 make_seeds.py`, and check the result
with `cargo +nightly fuzz fmt <target> corpus/<target>/seed-...`.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def u8(v): return struct.pack("<B", v & 0xFF)
def u16(v): return struct.pack("<H", v & 0xFFFF)
def u32(v): return struct.pack("<I", v & 0xFFFFFFFF)
def u64(v): return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)
def boolean(b): return b"\x01" if b else b"\x00"
def option(x): return b"\x00" if x is None else b"\x01" + x
def vec(items): return b"".join(b"\x01" + i for i in items) + b"\x00"
def bytes_vec(bs): return vec([u8(b) for b in bs])


def variant(i, n, *fields):
    sel = -(-(i << 32) // n)  # ceil(i * 2^32 / n)
    assert (sel * n) >> 32 == i
    return u32(sel) + b"".join(fields)


# ---- shared ---------------------------------------------------------------------------
def idx_raw(v): return variant(0, 3, u32(v))
def idx_nudged(v): return variant(1, 3, u32(v))
def idx_zero(): return variant(2, 3)


def control(write, read, mask=0, pending=0, features=1):
    return write + read + u32(mask) + u32(pending) + u32(features)


def scribble(offset, data): return u16(offset) + bytes_vec(data)


# ---- ring_reader ----------------------------------------------------------------------
R_TYPES = {"inband": 0, "xfer": 1, "gpa": 2, "comp": 3}


def r_type(t):
    return variant(4, 5, u16(t)) if isinstance(t, int) else variant(R_TYPES[t], 5)


def r_flags(f):
    return variant(2, 3, u16(f)) if f > 1 else variant(f, 3)


def peer_packet(t="inband", flags=0, tid=0, header8=0, payload=8, fill=0x40,
                data_offset8=None, length8=None, dirty=False):
    return (r_type(t) + r_flags(flags) + u64(tid) + u8(header8) + u16(payload) + u8(fill)
            + option(None if data_offset8 is None else u16(data_offset8))
            + option(None if length8 is None else u16(length8)) + boolean(dirty))


def rp_set_write(i): return variant(0, 7, i)
def rp_set_read(i): return variant(1, 7, i)
def rp_mask(v): return variant(2, 7, u32(v))
def rp_scribble(off, data): return variant(5, 7, scribble(off, data))
def rp_append(pkt, publish): return variant(6, 7, pkt, boolean(publish))


def ra_peek(): return variant(0, 10)
def ra_peek_info(): return variant(1, 10)


def ra_open(source, ops, consume):
    return variant(2, 10, source, vec(ops), boolean(consume))


def src_peek(): return variant(0, 2)
def src_saved(i): return variant(1, 2, u8(i))
def op_payload(off, n): return variant(0, 3, u32(off), u16(n))
def op_header(off, n): return variant(1, 3, u32(off), u16(n))
def op_peer(p): return variant(2, 3, p)
def ra_commit(): return variant(3, 10)
def ra_revert(): return variant(4, 10)
def ra_prepare_wait(): return variant(5, 10)
def ra_mask(): return variant(6, 10)
def ra_available(): return variant(7, 10)
def ra_read_into(cap): return variant(8, 10, u16(cap))
def ra_peer(p): return variant(9, 10, p)


def reader_input(pages, ctl, fill, packets, publish, scribbles, actions):
    return (u8(pages) + ctl + u8(fill) + vec(packets) + boolean(publish)
            + vec(scribbles) + vec(actions))


# ---- ring_writer ----------------------------------------------------------------------
W_TYPES = {"inband": 0, "xfer": 1, "gpa": 2, "comp": 3}


def w_flags(f): return variant(2, 3, u16(f)) if f > 1 else variant(f, 3)
def hdr_units(n): return variant(0, 2, u8(n))
def hdr_raw(n): return variant(1, 2, u16(n))


def args(t="inband", flags=0, tid=0, header=None, parts=((8, 1),), seed=0):
    header = header if header is not None else hdr_units(0)
    return (variant(W_TYPES[t], 4) + w_flags(flags) + u64(tid) + header
            + vec([u16(n) + u8(p) for n, p in parts]) + u8(seed))


def fill(region, off, n, seed): return variant(region, 2) + u16(off) + u16(n) + u8(seed)


def wa_write(a): return variant(0, 8, a)
def wa_push(a): return variant(1, 8, a)
def wa_reserve(a, fills, end): return variant(2, 8, a, vec(fills), variant(end, 3))
def wa_commit(): return variant(3, 8)
def wa_revert(): return variant(4, 8)
def wa_prepare_wait(header, payload): return variant(5, 8, header, u16(payload))
def wa_free(): return variant(6, 8)
def wa_peer(p): return variant(7, 8, p)
def wp_consume(n): return variant(0, 8, u8(n))
def wp_consume_all(): return variant(1, 8)
def wp_set_read(i): return variant(2, 8, i)
def wp_mask(v): return variant(3, 8, u32(v))
def wp_pending(v): return variant(4, 8, u32(v))
def wp_set_write(i): return variant(5, 8, i)
def wp_scribble(off, data): return variant(7, 8, scribble(off, data))


def writer_input(pages, ctl, garbage, actions):
    return u8(pages) + ctl + u8(garbage) + vec(actions)


# ---- packet_headers -------------------------------------------------------------------
def corruption(count=None, edits=(), truncate=None, extra=b""):
    return (option(None if count is None else u32(count))
            + vec([u16(a) + u8(v) for a, v in edits])
            + option(None if truncate is None else u16(truncate)) + bytes_vec(extra))


def gpa_spec(offset, count, first_page, raw=False):
    return u32(offset) + u32(count) + u64(first_page) + boolean(raw)


def ph_input(limit, header):
    return option(None if limit is None else u64(limit)) + header


def ph_raw(data): return variant(0, 3, bytes_vec(data))
def ph_gpa(specs, c): return variant(1, 3, vec(specs), c)


def ph_xfer(pageset, owns, ranges, c):
    return variant(2, 3, u16(pageset), u8(owns), vec([u32(a) + u32(b) for a, b in ranges]), c)


SEEDS = {
    "ring_reader": {
        # An empty, freshly initialised ring.
        "seed-empty": reader_input(0, control(idx_zero(), idx_zero()), 0, [], False, [],
                                   [ra_peek(), ra_prepare_wait(), ra_read_into(64)]),
        # Three well-formed packets wrapping the end of a 2-page ring; every reader call.
        "seed-three-packets": reader_input(
            1, control(idx_zero(), idx_nudged(8000)), 0x11,
            [peer_packet("inband", 0, 0, 0, 100),
             peer_packet("gpa", 1, 7, 3, 40, dirty=True),
             peer_packet("comp", 0, 7, 0, 0)], True, [],
            [ra_peek_info(),
             ra_open(src_peek(), [op_payload(0, 100), op_header(0, 8),
                                  op_peer(rp_scribble(8100, b"\xff" * 16))], True),
             ra_open(src_saved(0), [op_payload(0, 8)], False),
             ra_commit(), ra_read_into(4096), ra_read_into(8), ra_revert(),
             ra_peer(rp_append(peer_packet("inband", 1, 9, 1, 300), True)),
             ra_available(), ra_peek(), ra_mask(), ra_commit(), ra_prepare_wait()]),
        # Corrupt descriptors and indices.
        "seed-hostile": reader_input(
            0, control(idx_nudged(64), idx_nudged(0)), 0,
            [peer_packet("inband", 0, 0, 0, 16, length8=0xFFFF),
             peer_packet(0x1234, 0x8000, 0, 0, 16, data_offset8=1)], False,
            [scribble(0, b"\x06\x00\x02\x00")],
            [ra_peek(), ra_read_into(16),
             ra_peer(rp_set_write(idx_raw(0xFFFFFFF8))), ra_peek(),
             ra_peer(rp_set_write(idx_raw(13))), ra_available(),
             ra_peer(rp_set_write(idx_nudged(24))), ra_peek(), ra_prepare_wait()]),
        # The writer's index moves backwards behind packets we consumed but not committed.
        "seed-index-backwards": reader_input(
            0, control(idx_nudged(64), idx_zero()), 0,
            [peer_packet("inband", 0, 1, 0, 8)] * 3, False, [],
            [ra_open(src_peek(), [], True), ra_open(src_peek(), [], True),
             ra_peer(rp_set_write(idx_nudged(32))), ra_peek(), ra_available(), ra_commit(),
             ra_peek(), ra_peer(rp_set_write(idx_nudged(96))), ra_read_into(8)]),
    },
    "ring_writer": {
        # Writes, pushes, an in-place packet, a wait, all read back by a well-behaved peer.
        "seed-basic": writer_input(0, control(idx_zero(), idx_zero()), 0xCC, [
            wa_write(args("inband", 0, 0, parts=((5, 0x61), (7, 0x62)))),
            wa_push(args("gpa", 1, 42, hdr_units(2), ((100, 3),))),
            wa_push(args("comp", 0, 42, parts=())),
            wa_commit(),
            wa_peer(wp_consume(2)),
            wa_reserve(args("xfer", 1, 5, hdr_units(1), ((33, 0),)),
                       [fill(0, 0, 8, 1), fill(1, 0, 33, 2), fill(1, 30, 8, 3)], 0),
            wa_free(), wa_commit(),
            wa_prepare_wait(hdr_units(0), 1000),
            wa_write(args("comp", 0, 42, parts=((3, 9),)))]),
        # Fill a 1-page ring until it is full, wait, let the peer drain it, write again.
        "seed-full": writer_input(0, control(idx_nudged(3000), idx_nudged(3000)), 0x5A, [
            *[wa_write(args(parts=((900, i),))) for i in range(5)],
            wa_prepare_wait(hdr_units(0), 900),
            wa_peer(wp_consume(1)),
            wa_write(args(parts=((900, 9),))),
            wa_peer(wp_consume_all()),
            wa_reserve(args(parts=((4000, 1),)), [fill(1, 0, 4000, 7)], 1)]),
        # A reader that breaks the rules.
        "seed-hostile": writer_input(1, control(idx_zero(), idx_zero(), mask=1, pending=77), 0, [
            wa_write(args(parts=((64, 1),))),
            wa_peer(wp_set_read(idx_raw(5))), wa_write(args(parts=((64, 2),))),
            wa_peer(wp_set_read(idx_nudged(4096))), wa_free(),
            wa_peer(wp_set_write(idx_raw(0xFFFF))), wa_peer(wp_pending(0)),
            wa_peer(wp_scribble(0, b"\x00" * 24)),
            wa_push(args(flags=0x10)), wa_push(args(header=hdr_raw(13))),
            wa_prepare_wait(hdr_units(0), 8000), wa_revert()]),
    },
    "packet_headers": {
        "seed-gpa": ph_input(100, ph_gpa([gpa_spec(100, 4096, 7), gpa_spec(0, 1, 42)],
                                         corruption())),
        "seed-gpa-corrupt": ph_input(None, ph_gpa([gpa_spec(4000, 200, 1)],
                                                  corruption(count=2, edits=[(12, 0x10)]))),
        "seed-transfer": ph_input(None, ph_xfer(3, 1, [(100, 0), (50, 4096)], corruption())),
        # 4 billion ranges claimed; one range of u32::MAX bytes with one page number.
        "seed-raw": ph_input(None, ph_raw(b"\x00\x00\x00\x00\xff\xff\xff\xff"
                                          + b"\xff\xff\xff\xff\xff\x0f\x00\x00"
                                          + b"\x05" + b"\x00" * 7)),
    },
}


# ---- channel_protocol -----------------------------------------------------------------
# Op: Send, SendPacket, TooLarge, StartRequest, Complete, Recv, RecvInPlace, RecvBatch,
# PeerPacket, Scribble, Control (11 variants).
A, B = variant(0, 2), variant(1, 2)
def cp_input(pages_ab, pages_ba, limit, ops):
    return u8(pages_ab) + u8(pages_ba) + option(None if limit is None else u16(limit)) + vec(ops)
def cp_send(side, n, fill_=1): return variant(0, 11, side, u16(n), u8(fill_))
def cp_send_packet(side, typ, flags, tid, header, n):
    return variant(1, 11, side, typ, flags, u64(tid), bytes_vec(header), u16(n))
def cp_too_large(side, extra): return variant(2, 11, side, u8(extra))
def cp_start(side, n): return variant(3, 11, side, u16(n))
def tid_raw(v): return variant(0, 3, u64(v))
def tid_issued(i): return variant(1, 3, u8(i))
def tid_last(): return variant(2, 3)
def cp_complete(side, tid, n): return variant(4, 11, side, tid, u16(n))
def cp_recv(side, n): return variant(5, 11, side, u16(n))
def rd(header, off, n): return boolean(header) + u16(off) + u16(n)
def cp_recv_in_place(side, reads): return variant(6, 11, side, vec(reads))
def cp_recv_batch(side, mx, reads): return variant(7, 11, side, u8(mx), vec(reads))
def ts(i): return variant(i, 5)                    # TypeSel: InBand, Xfer, Gpa, Comp, Raw
def ts_raw(v): return variant(4, 5, u16(v))
def fs(i): return variant(i, 3)                    # FlagSel: None, CompletionRequested
def fs_raw(v): return variant(2, 3, u16(v))
def peer_packet(typ, flags, tid, header8, n, fill_=3, off8=None, len8=None, dirty=False):
    return (typ + flags + u64(tid) + u8(header8) + u16(n) + u8(fill_)
            + option(None if off8 is None else u16(off8)) + option(None if len8 is None else u16(len8))
            + boolean(dirty))
def cp_peer(reader, pkt): return variant(8, 11, reader, pkt)
def cp_scribble(reader, off, data): return variant(9, 11, reader, u16(off), bytes_vec(data))
def cp_control(reader, word, value): return variant(10, 11, reader, variant(word, 5), value)

# ---- shm_handshake --------------------------------------------------------------------
HOST, GUEST = variant(0, 2), variant(1, 2)
def fd_memfd(pages, sealed): return variant(0, 4, u8(pages), boolean(sealed))
def fd_eventfd(): return variant(1, 4)
def fd_devnull(): return variant(2, 4)
def fd_socket(): return variant(3, 4)
def ch_raw(data): return variant(0, 7, bytes_vec(data))
def ch_msg(kind, body, version=None, declared=None, cut=None):
    return variant(1, 7, option(None if version is None else u16(version)), u16(kind), bytes_vec(body),
                   option(None if declared is None else u32(declared)),
                   option(None if cut is None else u16(cut)))
def ch_offer(g2h=2, h2g=2, buf=1, flags=0, name=None, memfd=(0, True), bells=2):
    return variant(2, 7, u8(g2h), u8(h2g), u8(buf), u32(flags),
                   option(None if name is None else bytes_vec(name)),
                   option(None if memfd is None else u8(memfd[0] & 0xFF) + boolean(memfd[1])),
                   u8(bells))
def ch_offer_set(pages=1, subs=1, name=None, memfd=(0, True), extra=()):
    return variant(3, 7, u8(pages), u8(subs), option(None if name is None else bytes_vec(name)),
                   option(None if memfd is None else u8(memfd[0] & 0xFF) + boolean(memfd[1])),
                   vec(list(extra)))
def ch_hello(name=None): return variant(4, 7, option(None if name is None else bytes_vec(name)))
def ch_hello_set(count, reserved=0, name=None):
    return variant(5, 7, u16(count), u16(reserved), option(None if name is None else bytes_vec(name)))
def ch_ready(): return variant(6, 7)
def sh_send(chunk, fds=(), split=None):
    return variant(0, 4, chunk + vec(list(fds)) + option(None if split is None else u16(split)))
def sh_read(wait_ms=10): return variant(1, 4, u8(wait_ms))
def sh_pause(us): return variant(2, 4, u16(us))
def sh_shutdown(): return variant(3, 4)
def id_own(): return variant(0, 3)
def id_other(n=0): return variant(1, 3, u8(n))
def id_raw(v): return variant(2, 3, u32(v))
POLICY_DEFAULT = variant(0, 3)
def policy_same_uid_and(uids=(), gids=()): return variant(1, 3, vec(list(uids)), vec(list(gids)))
def policy_only(uids=(), gids=()): return variant(2, 3, vec(list(uids)), vec(list(gids)))
def sh_input(role, actions, keep_open=False, policy=POLICY_DEFAULT, subs=None):
    return role + policy + vec(actions) + boolean(keep_open) + option(None if subs is None else u8(subs))

# Extra headers: GPA-direct (one range of 16 bytes on page 3), the same on page 99 (past a
# limit of 16), transfer pages (one range), and transfer pages naming no ranges.
GOOD_GPA = [0, 0, 0, 0, 1, 0, 0, 0] + [16, 0, 0, 0, 0, 0, 0, 0] + [3] + [0] * 7
BAD_GPA_PAGE = GOOD_GPA[:16] + [99] + [0] * 7
GOOD_XFER = [1, 0, 1, 0, 1, 0, 0, 0] + [16, 0, 0, 0, 0, 0, 0, 0]
BAD_XFER = [0] * 8

SEEDS["channel_protocol"] = {
    # A request, its completion, then a duplicate completion: A must fail with
    # UnknownTransaction on the second.
    "seed-request": cp_input(0, 0, None, [
        cp_start(A, 10), cp_recv(B, 64), cp_complete(B, tid_last(), 4), cp_recv(A, 64),
        cp_complete(B, tid_last(), 4), cp_recv(A, 64), cp_send(A, 5)]),
    # Stale and raw ids, in-place and batch receives with in- and out-of-bounds reads.
    "seed-stale": cp_input(1, 1, 16, [
        cp_start(A, 3), cp_start(A, 300), cp_recv_batch(B, 2, [rd(False, 0, 8), rd(False, 290, 20)]),
        cp_complete(B, tid_issued(1), 9), cp_recv_in_place(A, [rd(False, 0, 16), rd(True, 0, 1)]),
        cp_complete(B, tid_raw(0x100000001), 0), cp_recv_in_place(A, []),
        cp_complete(B, tid_issued(0), 0), cp_recv(A, 4)]),
    # Hostile writers: a GPA header, a lying descriptor, scribbles and control words.
    "seed-corrupt": cp_input(0, 2, 4, [
        cp_send_packet(A, ts(2), fs(1), 7, [0, 0, 0, 0, 1, 0, 0, 0] + [16, 0, 0, 0, 0, 0, 0, 0] + [3] + [0] * 7, 40),
        cp_recv(B, 512),
        cp_peer(B, peer_packet(ts(0), fs(0), 0, 0, 30)), cp_recv(B, 64),
        cp_peer(B, peer_packet(ts(3), fs(0), 0x1_0000_0001, 0, 8)), cp_recv_batch(B, 4, []),
        cp_peer(A, peer_packet(ts_raw(99), fs_raw(0x8000), 1, 2, 10, len8=3)), cp_recv(A, 64),
        cp_scribble(A, 0, [0xFF] * 16), cp_control(B, 0, idx_raw(13)), cp_recv(B, 64),
        cp_control(A, 3, idx_raw(0xFFFFFFFF)), cp_send(B, 100)]),
    # Whole-header reads in place and in batches: valid GPA-direct and transfer-page headers
    # (`header` and `gpa_ranges`, scratch long enough or not), `gpa_ranges` of other types;
    # malformed headers received but never read whole leave the channel open; read whole,
    # they fail it (A through `gpa_ranges` in a batch, B through `header` in place).
    "seed-header": cp_input(1, 1, 16, [
        cp_send_packet(B, ts(2), fs(0), 0, GOOD_GPA, 8),
        cp_recv_in_place(A, [rd(True, 0, 64), rd(True, 1, 64), rd(True, 0, 8), rd(True, 1, 23),
                             rd(False, 0, 8)]),
        cp_send_packet(B, ts(1), fs(0), 0, GOOD_XFER, 8),
        cp_send_packet(B, ts(0), fs(0), 0, [1] * 8, 8),
        cp_recv_batch(A, 4, [rd(True, 0, 64), rd(True, 1, 64), rd(True, 0, 4)]),
        cp_send_packet(B, ts(2), fs(0), 0, BAD_GPA_PAGE, 8),
        cp_recv_in_place(A, [rd(False, 0, 8), rd(True, 0, 4)]),
        cp_send_packet(B, ts(1), fs(0), 0, BAD_XFER, 8),
        cp_recv_batch(A, 4, [rd(False, 0, 8)]), cp_send(A, 8),
        cp_send_packet(B, ts(2), fs(0), 0, BAD_GPA_PAGE, 8), cp_send(B, 8),
        cp_recv_batch(A, 4, [rd(True, 1, 64), rd(True, 0, 64)]), cp_recv(A, 64), cp_send(A, 4),
        cp_recv(B, 64), cp_peer(B, peer_packet(ts(1), fs(0), 0, 1, 8, fill_=0)),
        cp_recv_in_place(B, [rd(True, 0, 64), rd(True, 0, 64)]), cp_recv(B, 64)]),
    # Packets larger than the ring, then fill it, bad headers, and drain.
    "seed-full": cp_input(0, 0, None, [
        cp_too_large(A, 0), cp_too_large(B, 200), *[cp_send(A, 1000, i) for i in range(6)],
        cp_send_packet(A, ts(0), fs(0), 0, [1, 2, 3], 4), cp_send_packet(A, ts(0), fs_raw(0xFFFF), 0, [], 4),
        cp_recv(B, 10), cp_recv_batch(B, 7, [rd(False, 0, 1000)]), cp_send(A, 1000)]),
}

# ---- channel_blocking -----------------------------------------------------------------
# Step: Work, Pause, WaitIdle, PeerRecv, PeerComplete, PeerSend, PeerFlood, PeerLeave,
# PeerPacket, Scribble, Control (11 variants). Work: Call, Send, Recv, RecvInPlace,
# RecvBatch, StartRequest (6 variants).
def cb_input(pages_ab, pages_ba, depth, spin, steps):
    return u8(pages_ab) + u8(pages_ba) + u8(depth) + boolean(spin) + vec(steps)
def cb_work(worker, work): return variant(0, 11, u8(worker), work)
def w_call(req, cap, ms): return variant(0, 6, u16(req), u16(cap), u8(ms))
def w_send(n, ms): return variant(1, 6, u16(n), u8(ms))
def w_recv(cap, ms): return variant(2, 6, u16(cap), u8(ms))
def w_recv_in_place(ms, reads): return variant(3, 6, u8(ms), vec(reads))
def w_recv_batch(mx, ms, reads): return variant(4, 6, u8(mx), u8(ms), vec(reads))
def w_start(n): return variant(5, 6, u16(n))
def cb_pause(us): return variant(1, 11, u16(us))
def cb_wait(worker): return variant(2, 11, u8(worker))
def cb_peer_recv(mx): return variant(3, 11, u8(mx))
def pick_pending(i): return variant(0, 3, u8(i))
def pick_received(i): return variant(1, 3, u8(i))
def pick_raw(v): return variant(2, 3, u64(v))
def cb_complete(pick, extra): return variant(4, 11, pick, u16(extra))
def cb_peer_send(n, request): return variant(5, 11, u16(n), boolean(request))
def cb_flood(n): return variant(6, 11, u8(n))
def cb_leave(): return variant(7, 11)
def cb_packet(pkt): return variant(8, 11, pkt)
def cb_scribble(off, data): return variant(9, 11, u16(off), bytes_vec(data))
OUTGOING, INCOMING = variant(0, 2), variant(1, 2)
def cb_control(ring, word, value): return variant(10, 11, ring, variant(word, 5), value)

SEEDS["channel_blocking"] = {
    # A call answered while it waits.
    "seed-call": cb_input(0, 0, 3, False, [
        cb_work(0, w_call(16, 64, 4)), cb_pause(1000), cb_peer_recv(0),
        cb_complete(pick_pending(0), 8), cb_wait(0)]),
    # Three callers; the peer floods A's ring (the queue fills, callers stop reading), a
    # receiver drains it, completions arrive in reverse order.
    "seed-callers": cb_input(1, 0, 0, False, [
        cb_work(0, w_call(8, 64, 4)), cb_work(1, w_call(40, 64, 4)), cb_work(2, w_call(100, 4, 4)),
        cb_pause(500), cb_flood(40), cb_peer_recv(7), cb_complete(pick_pending(2), 30),
        cb_complete(pick_pending(1), 0), cb_complete(pick_pending(0), 100),
        cb_work(2, w_recv(4096, 4)), cb_work(2, w_recv_batch(7, 4, [rd(False, 0, 8)])),
        cb_work(2, w_recv_in_place(4, [rd(False, 0, 40), rd(True, 0, 1)])),
        cb_wait(0), cb_wait(1), cb_wait(2)]),
    # A call times out, its completion comes late (discarded), then again (a duplicate:
    # UnknownTransaction).
    "seed-late": cb_input(0, 0, 0, True, [
        cb_work(0, w_call(8, 64, 0)), cb_wait(0), cb_peer_recv(0), cb_complete(pick_received(0), 8),
        cb_work(1, w_recv(64, 1)), cb_wait(1), cb_complete(pick_received(0), 8),
        cb_work(1, w_recv(64, 1)), cb_work(0, w_call(8, 64, 1)), cb_wait(0)]),
    # Sends waiting for space while the peer drains slowly.
    "seed-send-full": cb_input(0, 0, 0, False, [
        *[cb_work(i % 3, w_send(1500, 4)) for i in range(6)], cb_pause(1500), cb_peer_recv(2),
        cb_pause(1000), cb_peer_recv(7), cb_work(0, w_send(5000, 2)), cb_wait(0), cb_wait(1), cb_wait(2)]),
    # Polled requests completed to a waiting receiver, an unsolicited request, then the
    # peer leaves under a waiting receiver and a call.
    "seed-polled-leave": cb_input(0, 1, 1, False, [
        cb_work(0, w_start(8)), cb_work(0, w_start(20)), cb_work(1, w_recv(256, 4)), cb_wait(0),
        cb_peer_recv(3), cb_complete(pick_pending(1), 4), cb_peer_send(12, True), cb_wait(1),
        cb_work(1, w_recv_batch(3, 4, [])), cb_complete(pick_pending(0), 4), cb_wait(1),
        cb_work(2, w_call(8, 8, 4)), cb_work(1, w_recv(256, 4)), cb_pause(300), cb_leave(),
        cb_wait(2), cb_wait(1)]),
    # A call whose response buffer is too small for its completion (BufferTooSmall with the
    # completion's length, its id freed), then whole-header reads of hand-built headers: a
    # malformed GPA-direct header read with too small a scratch leaves the channel open; a
    # batch asks a transfer-page packet for GPA ranges (NotGpaDirect), then reads its
    # malformed header, which fails the channel for every later call. Queue bound: 4 KiB.
    "seed-header": cb_input(0, 0, 0x14, False, [
        cb_work(1, w_call(8, 4, 4)), cb_pause(500), cb_peer_recv(0),
        cb_complete(pick_pending(0), 100), cb_wait(1),
        cb_packet(peer_packet(ts(2), fs(0), 0, 3, 8)),
        cb_work(0, w_recv_in_place(4, [rd(False, 0, 8), rd(True, 0, 8)])), cb_wait(0),
        cb_packet(peer_packet(ts(1), fs(0), 0, 1, 8, fill_=0)),
        cb_work(2, w_recv_batch(4, 4, [rd(True, 1, 64), rd(True, 0, 64)])), cb_wait(2),
        cb_work(0, w_recv(64, 1)), cb_wait(0)]),
    # A hostile writer: a completion for a raw id, a lying descriptor, scribbles and
    # control words on both rings, while a call and a receiver wait.
    "seed-hostile": cb_input(0, 0, 1, False, [
        cb_work(0, w_call(8, 64, 4)), cb_work(1, w_recv(512, 4)),
        cb_packet(peer_packet(ts(3), fs(0), 0x1_0000_0000, 0, 8)),
        cb_packet(peer_packet(ts(0), fs(0), 0, 1, 30, len8=2)), cb_wait(0),
        cb_scribble(0, [0xFF] * 16), cb_control(OUTGOING, 1, idx_nudged(4096)),
        cb_control(INCOMING, 0, idx_raw(13)), cb_work(0, w_send(3000, 3)), cb_wait(0), cb_wait(1)]),
}

SEEDS["shm_handshake"] = {
    # Channel sets: a guest asking for two of a service that offers three; a guest asking
    # for two offered one with every fd (memfd, the primary's bells, a bell pair and a
    # socket end); the same offered three (more than asked); a set hello with reserved bits.
    "seed-host-set": sh_input(HOST, [sh_send(ch_hello_set(2)), sh_read(20), sh_send(ch_ready())], subs=3),
    "seed-guest-set": sh_input(GUEST, [sh_send(ch_offer_set(1, 1, extra=[fd_eventfd(), fd_eventfd(),
                                                                         fd_eventfd(), fd_eventfd(),
                                                                         fd_socket()]))], subs=2),
    "seed-guest-set-many": sh_input(GUEST, [sh_send(ch_offer_set(1, 3, extra=[fd_eventfd()] * 4))], subs=2),
    "seed-host-set-reserved": sh_input(HOST, [sh_send(ch_hello_set(1, reserved=7))], subs=1),
    "seed-host-ok": sh_input(HOST, [sh_send(ch_hello()), sh_send(ch_ready())]),
    "seed-host-fds": sh_input(HOST, [sh_send(ch_hello(), [fd_eventfd(), fd_devnull(), fd_socket(),
                                                           fd_memfd(1, True)])]),
    "seed-host-bad": sh_input(HOST, [sh_send(ch_msg(1, b"svc", declared=0xFFFFFFFF))]),
    "seed-host-magic": sh_input(HOST, [sh_send(ch_raw(b"VMLNKSHX\x01\x00\x01\x00\x03\x00\x00\x00svc"))]),
    "seed-host-silent": sh_input(HOST, [sh_send(ch_hello(b"other"))], keep_open=True),
    "seed-guest-ok": sh_input(GUEST, [sh_send(ch_offer())]),
    "seed-guest-unsealed": sh_input(GUEST, [sh_send(ch_offer(memfd=(0, False)))]),
    "seed-guest-size": sh_input(GUEST, [sh_send(ch_offer(memfd=(-1, True)))]),
    "seed-guest-fds": sh_input(GUEST, [sh_send(ch_offer(bells=3), [fd_eventfd(), fd_memfd(2, True)])]),
    "seed-guest-refused": sh_input(GUEST, [sh_send(ch_msg(3, b"\x02\x00\x00\x00\x00\x00\x00\x00no"))]),
    "seed-guest-silent": sh_input(GUEST, [], keep_open=True),
    # Interleaved: the peer reads our side's messages and answers them.
    "seed-host-talk": sh_input(HOST, [sh_send(ch_hello(), split=5), sh_read(20), sh_pause(100),
                                      sh_send(ch_ready())], policy=policy_only([id_other(3), id_own()])),
    "seed-host-refused": sh_input(HOST, [sh_send(ch_hello()), sh_read(20), sh_send(ch_ready())],
                                  policy=policy_only([id_other(0)], [id_raw(12345)])),
    "seed-host-gid": sh_input(HOST, [sh_send(ch_hello()), sh_read(20), sh_send(ch_ready()), sh_read(5)],
                              policy=policy_only([], [id_own()])),
    "seed-host-late-fds": sh_input(HOST, [sh_send(ch_hello()), sh_read(20),
                                          sh_send(ch_ready(), [fd_eventfd()]), sh_read(20)],
                                   keep_open=True),
    "seed-guest-talk": sh_input(GUEST, [sh_read(20), sh_send(ch_offer(), split=20), sh_read(20),
                                        sh_send(ch_raw(b"after ready")), sh_shutdown()]),
    "seed-guest-midway": sh_input(GUEST, [sh_read(20), sh_send(ch_msg(2, b"\x00" * 20, cut=18)),
                                          sh_pause(2000), sh_shutdown(), sh_read(20)]),
}

def ah_built(rings, buffer_pages, edits=(), truncate=None, other_len=None, area_len=0):
    return u64(area_len) + variant(1, 2,
        vec([u8(g) + u8(h) for g, h in rings]), u16(buffer_pages),
        vec([u16(a) + u8(v) for a, v in edits]),
        option(None if truncate is None else u16(truncate)),
        option(None if other_len is None else u64(other_len)))


SEEDS["area_header"] = {
    # A sound header: two channels of 17-page rings and a 256-page buffer area.
    "seed-sound": ah_built([(17, 17), (2, 5)], 256),
    # The same with its channel count raised past the table's end, and truncated.
    "seed-edited": ah_built([(17, 17)], 16, edits=[(24, 70), (0x2A, 1)]),
    "seed-truncated": ah_built([(3, 3)], 0, truncate=100),
    # Another area length than the header's.
    "seed-length": ah_built([(3, 3)], 4, other_len=1 << 20),
    # Raw bytes: the magic and nothing else.
    "seed-raw": u64(8192) + variant(0, 2, bytes_vec(b"VMLINKMA")),
}

# ---- ic_codec: raw payloads (no `arbitrary` encoding) -----------------------------------
def ic_msg(msgtype, body, fw=(3, 0), ver=(3, 0), tid=1, flags=3, status=0):
    """vmbuspipe_hdr (data, msgsize) + icmsg_hdr + body, sizes consistent."""
    return (u32(1) + u32(20 + len(body)) + u16(fw[0]) + u16(fw[1]) + u16(msgtype)
            + u16(ver[0]) + u16(ver[1]) + u16(len(body)) + u32(status) + u8(tid) + u8(flags)
            + b"\x00\x00" + body)


def utf16z(text, field):
    data = text.encode("utf-16-le") + b"\x00\x00"
    return data + b"\x00" * (field - len(data))


def kvp_value(vtype, key, value):
    return u32(vtype) + u32(len(key.encode("utf-16-le")) + 2) + u32(len(value.encode("utf-16-le")) + 2) \
        + utf16z(key, 512) + utf16z(value, 2048)


def ver(major, minor): return u16(major) + u16(minor)


SEEDS["ic_codec"] = {
    # A heartbeat negotiate request: frameworks 3.0 and 1.0, messages 3.0 and 1.0.
    "seed-negotiate": ic_msg(0, u16(2) + u16(2) + u32(0) + ver(3, 0) + ver(1, 0) + ver(3, 0)
                             + ver(1, 0), fw=(0, 0), ver=(0, 0), tid=0),
    "seed-heartbeat": ic_msg(1, u64(0x1234) + b"\x00" * 32),
    # Reboot by force, 30 s, "Bye".
    "seed-shutdown": ic_msg(3, u32(0) + u32(30) + u32(3) + b"Bye" + b"\x00" * 2045, ver=(3, 2)),
    "seed-timesync-v3": ic_msg(4, u64(133444736000000000) + u64(0) + u64(16) + u8(2)),
    "seed-timesync-v4": ic_msg(4, u64(133444736000000000) + u64(0x12345678) + u8(1) + u8(0)
                               + u8(2) + b"\x00" * 3, ver=(4, 0)),
    # SET in the guest pool: key "Ab", value "xyz"; the whole 7432-byte hv_kvp_msg.
    "seed-kvp-set": ic_msg(2, u8(1) + u8(1) + u16(0) + kvp_value(1, "Ab", "xyz")
                           + b"\x00" * 4856, ver=(4, 0)),
    # GET_IP_INFO for "eth0" (hv_kvp_ip_msg: no padding).
    "seed-kvp-ip": ic_msg(2, u8(4) + u8(0) + utf16z("eth0", 256) + u8(1) + u8(1)
                          + utf16z("10.0.0.2", 2048) + b"\x00" * 5120, ver=(4, 0)),
    "seed-fcopy-start": ic_msg(7, u32(0) + bytes(range(1, 17)) + b"\x00" * 16
                               + utf16z("a.txt", 520) + utf16z("/tmp", 520) + u32(3) + u64(4096),
                               ver=(1, 1)),
    "seed-fcopy-write": ic_msg(7, u32(1) + bytes(range(1, 17)) + b"\x00" * 16 + u32(0)
                               + u64(0x2000) + u32(3) + b"hi!" + b"\x00" * 6141, ver=(1, 1)),
}

# ---- hvsock_packet: raw payloads (no `arbitrary` encoding) ------------------------------
def hv_pipe(pkt_type, data_size, data):
    """vmpipe_proto_header (pkt_type, data_size) + data."""
    return u32(pkt_type) + u32(data_size) + data


SEEDS["hvsock_packet"] = {
    "seed-hello": hv_pipe(1, 5, b"hello") + b"\x00" * 3,
    "seed-fin": hv_pipe(1, 0, b""),
    # The most Linux sends in one packet, and the most it accepts.
    "seed-send-buf": hv_pipe(1, 4088, bytes(i * 7 % 256 for i in range(4088))),
    "seed-mtu": hv_pipe(1, 16384, b"\x5a" * 16384),
    # Refused: one byte past the MTU, a size past the payload, another type, no header.
    "seed-mtu-plus-one": hv_pipe(1, 16385, b"\x5a" * 16385),
    "seed-past-payload": hv_pipe(1, 100, b"short"),
    "seed-type": hv_pipe(2, 4, b"data"),
    "seed-short": u32(1),
}


# ---- stream_frames: a read size byte, then a byte stream of frames ---------------------
def frame(packet_type, tid, payload, header=b"", flags=0, reserved=0):
    """A vmlink packet framed on a stream: 24-byte header, extra header, payload (8-padded)."""
    pad = lambda b: b + b"\x00" * (-len(b) % 8)
    h, p = pad(header), pad(payload)
    return (u16(packet_type) + u16(flags) + u32(len(h)) + u32(len(p)) + u32(reserved)
            + u64(tid) + h + p)


SEEDS["stream_frames"] = {
    # Read 7 bytes at a time: an in-band packet, a completion with a header, an empty one.
    "seed-frames": b"\x06" + frame(6, 7, b"hello") + frame(11, 9, b"", header=b"\xaa" * 16, flags=1)
                   + frame(6, 10, b""),
    # One frame of the largest size the target's reader takes (4,096 bytes).
    "seed-largest": b"\xff" + frame(6, 1, b"\x5a" * (4096 - 24)),
    # Refused: a reserved word, a GPA-direct type, a length past the maximum, a cut frame.
    "seed-reserved": b"\x00" + frame(6, 1, b"x", reserved=1),
    "seed-gpa": b"\x00" + frame(9, 1, b"x"),
    "seed-too-long": b"\x00" + frame(6, 1, b"\x00" * 4096),
    "seed-cut": b"\x02" + frame(6, 1, b"hello")[:20],
}


# ---- saved_state: raw bytes (no `arbitrary` encoding) ----------------------------------
with open(os.path.join(HERE, "..", "channel", "tests", "saved-state", "v1.bin"), "rb") as f:
    GOLDEN_V1 = f.read()

SEEDS["saved_state"] = {
    # The committed golden file: a polled request, an abandoned call, two queued packets.
    "seed-v1": GOLDEN_V1,
    # The same claiming a newer version, and cut inside its queued packets.
    "seed-newer": GOLDEN_V1[:8] + u16(2) + GOLDEN_V1[10:],
    "seed-cut": GOLDEN_V1[:-5],
    # A failed endpoint (kind: protocol) with nothing queued: the golden file's config and
    # slots, zero counters.
    "seed-failed": GOLDEN_V1[:0x1A] + b"\x00\x00" * 64 + b"\x00" * 9 + b"\x02\x01" + b"\x00",
}

# ---- stats_report: raw bytes (no `arbitrary` encoding) ---------------------------------
with open(os.path.join(HERE, "..", "transport", "shm", "tests", "monitor", "report-v1.bin"), "rb") as f:
    REPORT_V1 = f.read()

SEEDS["stats_report"] = {
    # The committed golden report: one listener, one failed channel with a ring fill.
    "seed-v1": REPORT_V1,
    # The same claiming a newer version, cut short, and with a trailing byte.
    "seed-newer": REPORT_V1[:8] + u16(2) + REPORT_V1[10:],
    "seed-cut": REPORT_V1[:-3],
    "seed-trailing": REPORT_V1 + b"\x00",
    # An empty process that claims 2^32 listeners and carries none.
    "seed-huge-count": REPORT_V1[:10] + b"\x01\x01\x00\x00" + b"\x80\x80\x80\x80\x10",
}

# ---- disk_request: raw bytes (no `arbitrary` encoding) ---------------------------------
def disk_req(op, sector, sectors, flags=0):
    return u8(op) + u8(flags) + u16(0) + u32(sectors) + u64(sector)
def disk_gpa(ranges):
    out = u32(0) + u32(len(ranges))
    for offset, count, pages in ranges:
        out += u32(count) + u32(offset) + b"".join(u64(p) for p in pages)
    return out
def disk_input(ptype, flags, sectors, payload, header=b""):
    return u8(ptype) + u8(flags) + u64(sectors) + u8(len(payload)) + payload + header
G = (32 << 20) // 4096  # the first page of the guest's half
SEEDS["disk_request"] = {
    # A read of 8 sectors into one page; a write over three pages from mid-page; a
    # scattered read of two sector-sized pieces; a flush; a discard on a read-only disk; a
    # write past the end; a buffer in the host's half; a page at the top of the addresses.
    "seed-read": disk_input(1, 0, 2048, disk_req(1, 8, 8), disk_gpa([(0, 4096, [G])])),
    "seed-write": disk_input(1, 2, 1 << 20, disk_req(2, 100, 16, flags=1),
                             disk_gpa([(2048, 8192, [G + 5, G + 6, G + 7])])),
    "seed-scatter": disk_input(1, 0, 4096, disk_req(1, 0, 2),
                               disk_gpa([(512, 512, [G + 9]), (3584, 512, [G + 1])])),
    "seed-flush": disk_input(0, 0, 8, disk_req(3, 0, 0)),
    "seed-discard-ro": disk_input(0, 1, 4096, disk_req(4, 16, 8)),
    "seed-past-end": disk_input(1, 0, 16, disk_req(2, 12, 8), disk_gpa([(0, 4096, [G])])),
    "seed-host-half": disk_input(1, 0, 2048, disk_req(1, 0, 8), disk_gpa([(0, 4096, [3])])),
    # No page limit, and a sector on the last page a u64 address holds: its end is one past
    # u64::MAX (a crash the fuzz stage found, refused with BadBuffer since).
    "seed-top-page": disk_input(1, 0, 16, disk_req(1, 0, 1),
                                disk_gpa([(3584, 512, [(1 << 64) // 4096 - 1])])),
}

# ---- ivshmem_setup: raw bytes (no `arbitrary` encoding) --------------------------------
def ivs(flags, value):
    return u8(flags) + struct.pack("<q", value)
IVS_SETUP = ivs(0, 0) + ivs(0, 1) + ivs(1, -1) + ivs(1, 0) + ivs(1, 0) + ivs(1, 1) + ivs(1, 1)
SEEDS["ivshmem_setup"] = {
    # Two vectors: version 0, id 1, the memory, the server's (peer 0's) two eventfds, our
    # own two; then a peer arriving and leaving; a setup cut mid-message; a wrong version;
    # two fds on one message; the memory without its fd.
    "seed-setup": u8(1) + IVS_SETUP + ivs(1, 2) + ivs(1, 2) + ivs(0, 2),
    "seed-cut": u8(1) + IVS_SETUP[:27] + ivs(2 | (3 << 5), 0),
    "seed-version": u8(0) + ivs(0, 7) + ivs(0, 1),
    "seed-two-fds": u8(0) + ivs(0, 0) + ivs(0, 1) + ivs(4, -1),
    "seed-no-memory-fd": u8(0) + ivs(0, 0) + ivs(0, 1) + ivs(0, -1),
}

for target, seeds in SEEDS.items():
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
