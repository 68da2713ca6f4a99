//! The connection loop: reads frames, calls the session, writes replies.
//!
//! One task per connection, generic over its socket — any `Stream` of
//! WebSocket messages with a `Sink` for the library's close frames: a
//! tokio-tungstenite stream in the server, a pair of channels in the tests
//! (axum's `examples/testing-websockets`). Frames go out through the
//! connection's send queue ([`QueueRx`]), already framed, whoever writes
//! them: while this task waits with nothing in hand, the hub's fan-out
//! writes a room's message to the socket itself; otherwise the message
//! waits in the queue and this task writes it (batched: every frame waiting
//! goes out in one `writev`), with the rest of any write the socket took
//! only in part. The loop keeps up to [`MAX_INFLIGHT`] publishes in flight
//! with their replies in request order, streams replays a page at a time,
//! and obeys the session's stops (slow consumer, drain, token expiry). What
//! a connection holds beyond its socket is one batch or one replay page: a
//! write the socket does not take within `--send-timeout` makes a slow
//! consumer. Every close it initiates completes the WebSocket closing
//! handshake.

use std::time::Duration;

use std::future::poll_fn;

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, Utf8Bytes};

use crate::hub::{CloseReason, Outbound, QueueRx};
use crate::protocol::{self, Frame, ServerFrame};
use crate::session::{Pending, Session, Stop};

/// Publishes one connection may have waiting for the broker; further frames
/// are not read until one completes (backpressure on the client).
pub const MAX_INFLIGHT: usize = 64;
/// Most queued frames written in one flush.
const MAX_BATCH: usize = 256;
/// How long a closing handshake may take before the socket is dropped: the
/// close frame waits behind what the socket still holds for a slow reader.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A WebSocket as the loop uses it.
pub trait Socket:
    Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin
{
}

impl<S> Socket for S where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin
{
}

pub use tungstenite::Error as WsError;

/// Close codes the node sends.
mod close_code {
    pub const AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const INVALID: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const SIZE: u16 = 1009;
    pub const ERROR: u16 = 1011;
}

/// Runs a connection to its end: the loop, then (out of its rooms already)
/// the closing handshake. The socket and the session are borrowed so that
/// they live once, in the caller's task.
pub async fn serve<S: Socket>(socket: &mut S, session: &mut Session, queue: &mut QueueRx) {
    let (conn, name) = (session.id().0, session.name().clone());
    tracing::info!(conn, session = %name, user = session.user(), "connection opened");
    let send_timeout = session.node().config.send_timeout;
    let end = run(socket, session, queue, send_timeout).await;
    // Out of its rooms, its queue closed, before the closing handshake,
    // which may wait on a slow client: nothing more goes out but the
    // handshake (after what the socket has not taken yet).
    session.close();
    queue.close();
    if let Some((code, reason)) = end.close_frame() {
        let before = match end {
            End::Drained { after_ms, reason } => Some(protocol::encode(&ServerFrame::Reconnect {
                reason,
                after_ms,
            })),
            _ => None,
        };
        shut(socket, queue, before, code, reason).await;
    }
    queue.detach();
    let reason = end.as_str();
    session.node().metrics.closed(reason);
    match &end {
        End::SocketError(error) | End::ProtocolError { error, .. } => {
            tracing::info!(conn, session = %name, reason, %error, "connection closed")
        }
        _ => tracing::info!(conn, session = %name, reason, "connection closed"),
    }
}

/// Why a connection ended (logged once per connection), and so which close
/// frame it ends with.
#[derive(Debug)]
enum End {
    ClientClosed,
    ClientGone,
    SlowConsumer,
    /// Told to reconnect: the node drains (`draining`) or sheds the
    /// connection to balance the fleet (`rebalance`).
    Drained {
        after_ms: u64,
        reason: &'static str,
    },
    BinaryFrame,
    TokenExpired,
    /// A replay could not be read to its end (closed 1011).
    ReplayFailed,
    /// The client broke the WebSocket protocol.
    ProtocolError {
        code: u16,
        reason: &'static str,
        error: String,
    },
    SocketError(String),
}

impl From<Stop> for End {
    fn from(stop: Stop) -> Self {
        match stop {
            Stop::Requested(CloseReason::SlowConsumer) => End::SlowConsumer,
            Stop::Requested(CloseReason::Draining { after_ms }) => End::Drained {
                after_ms,
                reason: "draining",
            },
            Stop::Requested(CloseReason::Rebalancing { after_ms }) => End::Drained {
                after_ms,
                reason: "rebalance",
            },
            Stop::TokenExpired => End::TokenExpired,
        }
    }
}

impl End {
    fn as_str(&self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::ClientGone => "client_gone",
            End::SlowConsumer => "slow_consumer",
            End::Drained {
                reason: "rebalance",
                ..
            } => "rebalanced",
            End::Drained { .. } => "drained",
            End::BinaryFrame => "binary_frame",
            End::TokenExpired => "token_expired",
            End::ReplayFailed => "replay_failed",
            End::ProtocolError { .. } => "protocol_error",
            End::SocketError(_) => "socket_error",
        }
    }

    /// The close frame the node sends (code, reason); `None` when the
    /// client closed (its close frame was answered already) or is gone.
    fn close_frame(&self) -> Option<(u16, &'static str)> {
        Some(match self {
            End::SlowConsumer => (close_code::POLICY, "slow consumer: send queue full"),
            End::Drained { .. } => (close_code::AWAY, "server draining: reconnect"),
            End::BinaryFrame => (
                close_code::UNSUPPORTED,
                "binary frames are not supported: send JSON text frames",
            ),
            End::TokenExpired => (
                close_code::POLICY,
                "token expired: reconnect with a fresh token",
            ),
            End::ReplayFailed => (
                close_code::ERROR,
                "replay interrupted: subscribe again with since",
            ),
            End::ProtocolError { code, reason, .. } => (*code, *reason),
            End::ClientClosed | End::ClientGone | End::SocketError(_) => return None,
        })
    }

    /// A failed read: the client broke the protocol — 1007 for text that is
    /// not UTF-8, 1009 for a frame or message over the size limit, 1002 for
    /// any other violation (bad continuation, reserved opcode or bits,
    /// unmasked frame, …) — or the socket failed.
    fn read_error(e: WsError) -> Self {
        use tungstenite::error::ProtocolError;
        let (code, reason) = match &e {
            // The client closed the TCP connection without a close frame.
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                return End::ClientGone;
            }
            WsError::Utf8(_) => (close_code::INVALID, "text frame is not valid UTF-8"),
            WsError::Capacity(_) => (close_code::SIZE, "frame or message too large"),
            WsError::Protocol(_) => (close_code::PROTOCOL, "WebSocket protocol violation"),
            _ => return End::SocketError(e.to_string()),
        };
        End::ProtocolError {
            code,
            reason,
            error: e.to_string(),
        }
    }
}

async fn run<S: Socket>(
    socket: &mut S,
    session: &mut Session,
    queue: &mut QueueRx,
    send_timeout: Duration,
) -> End {
    let ctl = session.control();
    // One close-request future for the connection's life: re-creating it
    // each turn of the loop would register and unregister a waiter on every
    // delivery.
    let closed = ctl.closed();
    tokio::pin!(closed);
    let mut inflight: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut out: Vec<Frame> = vec![session.welcome()];
    let mut batch: Vec<Outbound> = Vec::new();
    // Bytes wait for the socket (the rest of a write the fan-out began).
    let mut unsent = false;
    loop {
        if !out.is_empty() || unsent {
            unsent = false;
            // A client that takes nothing for `--send-timeout` is a slow
            // consumer, whether or not more traffic would overflow its
            // queue: what it holds is this batch, no more.
            tokio::select! {
                biased;
                stop = session.stopped(closed.as_mut()) => return stop.into(),
                res = write_all(queue, &mut out, send_timeout) => match res {
                    Ok(()) => {}
                    Err(WriteError::Stalled) => {
                        session.slow_consumer();
                        return End::SlowConsumer;
                    }
                    Err(WriteError::Socket(e)) => return End::SocketError(e.to_string()),
                },
            }
        } else if let Some(page) = session.next_page() {
            // The next page of a replay, now that the last one went out.
            // Live messages wait in the send queue meanwhile (a queue that
            // overflows makes a slow consumer, as ever), and the client's
            // next requests in its socket.
            let page = tokio::select! {
                biased;
                stop = session.stopped(closed.as_mut()) => return stop.into(),
                page = page => page,
            };
            if !session.take_page(page, &mut out) {
                return End::ReplayFailed;
            }
        } else {
            tokio::select! {
                biased;
                stop = session.stopped(closed.as_mut()) => return stop.into(),
                _ = queue.recv_many(&mut batch, MAX_BATCH) => {
                    out.extend(batch.drain(..).filter_map(|queued| session.outbound(queued)));
                    unsent = true;
                }
                Some(reply) = inflight.next(), if !inflight.is_empty() => {
                    queue.hold();
                    out.push(reply);
                }
                msg = socket.next(), if inflight.len() < MAX_INFLIGHT => match msg {
                    None => return End::ClientGone,
                    Some(Err(e)) => return End::read_error(e),
                    Some(Ok(Message::Text(text))) => {
                        queue.hold();
                        if let Some(reply) = session.handle(text.as_str(), &mut out).await {
                            inflight.push_back(reply);
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        session.node().metrics.bad_frames.inc();
                        return End::BinaryFrame;
                    }
                    Some(Ok(Message::Close(_))) => {
                        // The library queued the echo of the client's close
                        // frame: send it, completing the closing handshake
                        // (the server then closes the TCP connection first).
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                            socket.flush().await?;
                            poll_fn(|cx| queue.poll_flush(cx)).await?;
                            Ok::<(), WsError>(())
                        })
                        .await;
                        return End::ClientClosed;
                    }
                    // Pings are answered by the library.
                    Some(Ok(_)) => {}
                },
            }
        }
    }
}

enum WriteError {
    /// The socket took no frame for the whole send timeout.
    Stalled,
    Socket(std::io::Error),
}

/// Writes `out` (emptying it) after whatever waits for the socket; the
/// socket must take all of it within `limit`.
async fn write_all(
    queue: &QueueRx,
    out: &mut Vec<Frame>,
    limit: Duration,
) -> Result<(), WriteError> {
    queue.push(out.drain(..));
    let flushed = within(limit, poll_fn(|cx| queue.poll_flush(cx))).await?;
    flushed.map_err(WriteError::Socket)
}

/// A socket write, given at most `limit` when it cannot complete at once. The
/// timer is set only then: most writes go straight to the socket, and this
/// is on every delivery's path the fan-out could not take.
async fn within<F: Future + Unpin>(limit: Duration, mut write: F) -> Result<F::Output, WriteError> {
    match (&mut write).now_or_never() {
        Some(done) => Ok(done),
        None => tokio::time::timeout(limit, write)
            .await
            .map_err(|_| WriteError::Stalled),
    }
}

/// Sends `before` (if any) and a close frame, then completes the closing
/// handshake: reads on, discarding, until the client's close frame or the
/// end of the stream, so that the client finds the close frame behind
/// whatever its socket still holds, and the connection ends with a FIN
/// rather than a reset. All of it within [`CLOSE_TIMEOUT`] (a client that
/// reads nothing never gets the frame; its socket is dropped then).
async fn shut<S: Socket>(
    socket: &mut S,
    queue: &QueueRx,
    before: Option<Frame>,
    code: u16,
    reason: &'static str,
) {
    let handshake = async {
        queue.push(before);
        poll_fn(|cx| queue.poll_flush(cx)).await?;
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from_static(reason),
        };
        socket.send(Message::Close(Some(frame))).await?;
        while let Some(msg) = socket.next().await {
            if let Message::Close(_) = msg? {
                break;
            }
        }
        Ok::<(), WsError>(())
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

#[cfg(test)]
mod tests;
