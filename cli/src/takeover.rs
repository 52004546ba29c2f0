//! Servicing `vmlink serve --socket`: while it pipes, it waits for a successor on
//! `<socket>.takeover`; `vmlink serve --socket S --take-over` connects there, takes the
//! channel and how far the pipe had come, and pipes on, while the old one exits. The
//! client notices nothing.
//!
//! The old one hands over between two packets, once its own outgoing direction is
//! finished (its stdin reached end of file and it sent the FIN): a read from stdin cannot
//! be handed to another process. Until then a successor is turned away with the reason.
//! Every packet the client sent comes out exactly once: on the old one's stdout up to the
//! hand-over, on the successor's from there.
//!
//! A secure channel (`vmlink serve --secure`) is handed over too: the old one takes the
//! secure layer off, and its keys travel with the pipe's state (to a successor of the
//! same user only: vmlink-shm's hand-over admits nobody else); the successor puts the
//! layer back on, and its first packet starts a new key epoch. It needs no key files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::{Doorbell, PacketRx, PacketTx};
use vmlink_secure::servicing::{SAVED_KEYS_LEN, SavedKeys, put_on, take_off};
use vmlink_shm::{
    Detached, Endpoint, HandOverListener, Role, ShmError, Successor, TakeOver, monitor,
};

use crate::error::{Context, Result, fail};
use crate::pipe::{receive_stdout, send_stdin};
use crate::secure::SecureShm;

/// The channel a `vmlink serve` on a socket pipes over.
pub enum Served {
    /// A plain channel.
    Plain(Box<Endpoint>),
    /// A secure channel, and the rest of the endpoint under it (for a hand-over).
    Secure(Box<SecureShm>, Box<Detached>),
}

impl Served {
    /// A secure channel over the channel of `rest`, published for `vmlink stat`.
    pub fn secure(end: SecureShm, rest: Detached) -> Self {
        monitor::publish(end.watch(), rest.service(), Role::Host, None);
        Served::Secure(Box::new(end), Box::new(rest))
    }

    /// The plain endpoint to hand over, and the application state that goes with it: the
    /// pipe's, then for a secure channel its keys.
    fn for_hand_over(self, state: &PipeState) -> Result<(Endpoint, Vec<u8>, Option<SavedKeys>)> {
        let mut app = state.encode().to_vec();
        match self {
            Served::Plain(end) => Ok((*end, app, None)),
            Served::Secure(end, rest) => {
                let (plain, keys) = take_off(*end).context("take the secure layer off")?;
                app.extend_from_slice(&keys.to_bytes()[..]);
                Ok((rest.attach(plain), app, Some(keys)))
            }
        }
    }

    /// The endpoint back from a hand-over that failed (with the secure layer back on, and
    /// a new key epoch, if it had one).
    fn back(end: Endpoint, keys: Option<SavedKeys>) -> Result<Self> {
        match keys {
            None => Ok(Served::Plain(Box::new(end))),
            Some(keys) => {
                let (channel, rest) = end.detach();
                let end = put_on(channel, &keys).context("put the secure layer back on")?;
                Ok(Served::secure(end, rest))
            }
        }
    }
}

/// How often the successor watch looks whether the pipe has finished.
const LOOK: Duration = Duration::from_millis(20);

/// Where a `vmlink serve` on `socket` waits for its successor.
pub fn takeover_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".takeover");
    PathBuf::from(name)
}

/// How far a pipe had come: what travels to the successor with the channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipeState {
    /// This side's outgoing direction is finished (its FIN was sent).
    pub outgoing_done: bool,
    /// Bytes sent so far.
    pub sent: u64,
    /// Bytes received so far.
    pub received: u64,
}

const STATE_MAGIC: &[u8; 8] = b"VMLKPIPE";
const STATE_LEN: usize = 8 + 1 + 8 + 8;

impl PipeState {
    fn encode(&self) -> [u8; STATE_LEN] {
        let mut out = [0u8; STATE_LEN];
        out[..8].copy_from_slice(STATE_MAGIC);
        out[8] = u8::from(self.outgoing_done);
        out[9..17].copy_from_slice(&self.sent.to_le_bytes());
        out[17..].copy_from_slice(&self.received.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; STATE_LEN] = bytes.try_into().ok()?;
        if &bytes[..8] != STATE_MAGIC || bytes[8] > 1 {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        Some(Self {
            outgoing_done: bytes[8] == 1,
            sent: word(9),
            received: word(17),
        })
    }
}

/// Takes the channel of `service` over from the `vmlink serve` on `socket` (with the
/// secure layer back on, if it had one).
pub fn take_over(socket: &Path, service: &str) -> Result<(Served, PipeState)> {
    let path = takeover_path(socket);
    let mut take = TakeOver::connect(&path).or_else(|e| {
        fail(format!(
            "no vmlink serve to take over on {} ({e})",
            socket.display()
        ))
    })?;
    let incoming = match take.next_endpoint() {
        Ok(Some(i)) => i,
        Ok(None) => return fail("the serving vmlink serve handed over nothing"),
        Err(e) => return fail(format!("take over: {e}")),
    };
    let offered = incoming.endpoint().map(|e| e.service().to_owned());
    if offered.as_deref() != Some(service) {
        incoming.refuse("not the service the successor serves");
        return fail(format!(
            "the serving vmlink serve offers {offered:?}, not {service:?} (see --service)"
        ));
    }
    let app = incoming.app_state();
    let (pipe, keys) = app.split_at(app.len().min(STATE_LEN));
    let keys = match keys.len() {
        0 => None,
        SAVED_KEYS_LEN => match SavedKeys::from_bytes(keys) {
            Ok(k) => Some(k),
            Err(e) => {
                incoming.refuse("unreadable secure channel keys");
                return fail(format!("the secure channel's keys: {e}"));
            }
        },
        _ => None,
    };
    let state = match PipeState::decode(pipe) {
        Some(state) if keys.is_some() || app.len() == STATE_LEN => state,
        _ => {
            incoming.refuse("not a vmlink serve's pipe state");
            return fail("the serving process is not a vmlink serve of this version");
        }
    };
    let end = incoming.confirm().context("take over")?;
    // Its `DONE`, or its exit right after our confirm: either way the channel is ours.
    let _ = take.next_endpoint();
    let served = Served::back(end, keys)?;
    if matches!(served, Served::Secure(..)) {
        eprintln!("vmlink serve: took over a secure channel (a new key epoch follows)");
    }
    Ok((served, state))
}

/// Binds the successor socket, waiting up to 5 s for a predecessor that is still leaving.
fn bind(path: &Path) -> Result<HandOverListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match HandOverListener::bind(path) {
            Ok(l) => return Ok(l),
            Err(ShmError::SocketInUse(_)) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return fail(format!("listen for a successor on {}: {e}", path.display())),
        }
    }
}

/// Pipes over `end` from `state` on, handing the channel to a successor that asks.
pub fn serve(end: Served, mut state: PipeState, socket: &Path) -> Result<()> {
    let listener = bind(&takeover_path(socket))?;
    let mut end = end;
    loop {
        let successor = match &end {
            Served::Plain(e) => round(e.channel(), &mut state, &listener)?,
            Served::Secure(e, _) => round(e.as_ref(), &mut state, &listener)?,
        };
        let Some(mut successor) = successor else {
            return Ok(());
        };
        let peer = successor.peer();
        let (plain, app, keys) = end.for_hand_over(&state)?;
        match successor.hand_over_with(plain, &app) {
            Ok(()) => {
                // The socket file goes before the successor hears `DONE`, so that it can
                // bind the same path for its own successor.
                drop(listener);
                let _ = successor.finish();
                eprintln!("vmlink serve: handed the channel over to {peer}");
                return Ok(());
            }
            Err(failed) => {
                eprintln!(
                    "vmlink serve: the successor {peer} did not take over ({}); still serving",
                    failed.error
                );
                end = Served::back(failed.endpoint, keys)?;
            }
        }
    }
}

/// Pipes until both directions finish (`None`) or a successor asks once this side's
/// outgoing direction is finished (the successor, with the pipe stopped between packets).
fn round<T: PacketTx + Send, R: PacketRx + Send, D: Doorbell + Send + Sync>(
    ch: &vmlink_channel::Endpoint<T, R, D>,
    state: &mut PipeState,
    listener: &HandOverListener,
) -> Result<Option<Successor>> {
    let sent = AtomicU64::new(state.sent);
    let received = AtomicU64::new(state.received);
    let out_done = AtomicBool::new(state.outgoing_done);
    let in_done = AtomicBool::new(false);
    let quiesce = AtomicBool::new(false);
    let outcome = thread::scope(|s| {
        let outgoing = (!state.outgoing_done).then(|| {
            s.spawn(|| {
                let r = send_stdin(ch, &sent);
                out_done.store(true, Ordering::Release);
                r
            })
        });
        let watcher = s.spawn(|| watch(listener, &out_done, &in_done, &quiesce));
        let incoming = receive_stdout(ch, &received, Some(&quiesce));
        if matches!(incoming, Ok(true)) {
            in_done.store(true, Ordering::Release);
        } else {
            // Stopped for a successor, or failed: the watcher must end too.
            quiesce.store(true, Ordering::Release);
        }
        let outgoing = outgoing.map_or(Ok(()), |t| {
            t.join()
                .unwrap_or_else(|_| fail("the stdin thread panicked"))
        });
        let successor = watcher
            .join()
            .unwrap_or_else(|_| fail("the successor thread panicked"));
        (incoming, outgoing, successor)
    });
    let (incoming, outgoing, successor) = outcome;
    outgoing?;
    let finished = incoming?;
    let successor = successor?;
    state.sent = sent.load(Ordering::Relaxed);
    state.received = received.load(Ordering::Relaxed);
    state.outgoing_done = out_done.load(Ordering::Acquire);
    match successor {
        Some(s) if finished => {
            s.refuse("the pipe has finished");
            Ok(None)
        }
        other => Ok(other),
    }
}

/// Waits for a successor while the pipe runs: turns it away while stdin is still being
/// read; once it may take over, stops the receiving loop and returns it. Ends with `None`
/// when the pipe has finished or the receiving loop stopped on its own.
fn watch(
    listener: &HandOverListener,
    out_done: &AtomicBool,
    in_done: &AtomicBool,
    quiesce: &AtomicBool,
) -> Result<Option<Successor>> {
    loop {
        if quiesce.load(Ordering::Acquire)
            || (in_done.load(Ordering::Acquire) && out_done.load(Ordering::Acquire))
        {
            return Ok(None);
        }
        let Some(successor) = listener
            .accept_until(Some(Instant::now() + LOOK))
            .context("wait for a successor")?
        else {
            continue;
        };
        if out_done.load(Ordering::Acquire) {
            quiesce.store(true, Ordering::Release);
            return Ok(Some(successor));
        }
        eprintln!(
            "vmlink serve: turned away a successor ({}): stdin is still being sent",
            successor.peer()
        );
        successor.refuse("this vmlink serve is still sending its stdin; try when it is done");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_state_round_trips_and_refuses_anything_else() {
        let s = PipeState {
            outgoing_done: true,
            sent: 7,
            received: 1 << 40,
        };
        assert_eq!(PipeState::decode(&s.encode()), Some(s));
        let mut bad = s.encode();
        bad[8] = 2;
        assert_eq!(PipeState::decode(&bad), None);
        assert_eq!(PipeState::decode(&s.encode()[..24]), None);
        assert_eq!(PipeState::decode(b""), None);
        bad = s.encode();
        bad[0] = b'X';
        assert_eq!(PipeState::decode(&bad), None);
    }

    #[test]
    fn the_takeover_socket_sits_beside_the_service_socket() {
        assert_eq!(
            takeover_path(Path::new("/run/x/s.sock")),
            Path::new("/run/x/s.sock.takeover")
        );
    }
}
