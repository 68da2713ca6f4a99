//! `GET /ws`: the WebSocket endpoint. It checks the drain, the token and
//! the connection limit, sizes the socket's buffers and limits, and once
//! upgraded opens a [`Session`] and runs the connection loop
//! ([`super::connection`]) on the socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

use super::connection;
use crate::auth::bearer_token;
use crate::hub::Outbox;
use crate::node::Node;
use crate::protocol::SUBPROTOCOL;
use crate::session::Session;

/// Socket read buffer. Small on purpose: it is allocated for every
/// connection up front (the library default is 128 KiB). Client frames are
/// small; a larger one is read in several chunks.
const READ_BUFFER: usize = 1024;

#[derive(Deserialize)]
pub struct UpgradeQuery {
    token: Option<String>,
}

/// `GET /ws`: checks the upgrade, the drain, auth and the connection limit,
/// then upgrades.
///
/// The upgrade is answered here (the handshake's checks and accept key are
/// the WebSocket library's) rather than by axum's `WebSocketUpgrade`, so
/// that the connection keeps its TCP socket: the node writes framed bytes
/// to it itself, from the fan-out too ([`crate::hub::Wire`]).
pub async fn upgrade(
    State(node): State<Arc<Node>>,
    Query(query): Query<UpgradeQuery>,
    headers: HeaderMap,
    mut request: Request,
) -> Response {
    let accept = match tungstenite::handshake::server::create_response_with_body(&request, || ()) {
        Ok(accept) => accept,
        Err(e) => {
            node.metrics.refused("bad_request");
            return (
                StatusCode::BAD_REQUEST,
                format!("not a WebSocket upgrade: {e}\n"),
            )
                .into_response();
        }
    };
    if node.is_draining() {
        node.metrics.refused("draining");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: connect to another node\n",
        )
            .into_response();
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let grants = match node.auth.authenticate(query.token.as_deref().or(bearer)) {
        Ok(grants) => grants,
        Err(e) => {
            node.metrics.refused("auth");
            return (StatusCode::UNAUTHORIZED, format!("unauthorized: {e}\n")).into_response();
        }
    };
    let Some(slot) = node.reserve_slot() else {
        node.metrics.refused("limit");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached: connect to another node\n",
        )
            .into_response();
    };
    let upgrading = hyper::upgrade::on(&mut request);
    let max_frame = node.config.max_frame_bytes as usize;
    // Frames over the limit get `too_large` and the connection stays; far
    // larger ones are cut off by the library (close 1009) before we buffer them.
    let limit = max_frame.saturating_mul(4).max(1 << 20);
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // The library writes only pongs and close frames, each at once
        // (through the send queue, in order with the node's frames).
        .write_buffer_size(0)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    tokio::spawn(async move {
        let upgraded = match upgrading.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
            tracing::error!("WebSocket upgrade on a connection that is not a TCP socket");
            return;
        };
        // What the HTTP server read past the request is a slice of its read
        // buffer (8 KiB): copied out, so that the buffer goes now rather than
        // live as long as the connection.
        let hyper::upgrade::Parts { io, read_buf, .. } = parts;
        let pre_read = read_buf.to_vec();
        drop(read_buf);
        let (read, write) = io.into_inner().into_split();
        // The socket and the session live here, once, for the connection's
        // whole life; the loop borrows them.
        let (mut session, mut queue) = Session::open(node, grants);
        queue.attach_tcp(write);
        let io = SocketIo {
            read,
            out: queue.outbox(),
        };
        let mut socket =
            WebSocketStream::from_partially_read(io, pre_read, Role::Server, Some(config)).await;
        connection::serve(&mut socket, &mut session, &mut queue).await;
        drop(session);
        drop(slot);
    });
    let mut response = accept.map(|()| Body::empty());
    if offers_subprotocol(&headers) {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    response
}

/// Whether the client offered the `chorus.v1` sub-protocol.
fn offers_subprotocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL)
}

/// The socket as the WebSocket library sees it: it reads the socket, and
/// writes (pongs, close frames) through the connection's send queue.
struct SocketIo {
    read: OwnedReadHalf,
    out: Outbox,
}

impl AsyncRead for SocketIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for SocketIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.out.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.out.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The writing end closes when the connection lets go of it.
        self.out.poll_flush(cx)
    }
}
