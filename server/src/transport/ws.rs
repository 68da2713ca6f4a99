//! `GET /ws`: the WebSocket endpoint. It checks the drain, the token and
//! the connection limit, sizes the socket's buffers and limits, and once
//! upgraded opens a [`Session`] and runs the connection loop
//! ([`super::connection`]) on the socket.

use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::connection;
use crate::auth::bearer_token;
use crate::node::Node;
use crate::protocol::SUBPROTOCOL;
use crate::session::Session;

/// Socket read buffer. Small on purpose: it is allocated for every
/// connection up front (the library default is 128 KiB), and the library
/// zeroes it on every read attempt — including the one the connection loop
/// makes each time it wakes to write a delivery. Client frames are small;
/// a larger one is read in several chunks.
const READ_BUFFER: usize = 1024;
/// Bytes buffered before a write reaches the socket even without a flush.
const WRITE_BUFFER: usize = 64 * 1024;

#[derive(Deserialize)]
pub struct UpgradeQuery {
    token: Option<String>,
}

/// `GET /ws`: checks the drain, auth and the connection limit, then upgrades.
pub async fn upgrade(
    State(node): State<Arc<Node>>,
    Query(query): Query<UpgradeQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            node.metrics.refused("bad_request");
            return rejection.into_response();
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
    let max_frame = node.config.max_frame_bytes as usize;
    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        // Frames over the limit get `too_large` and the connection stays; far
        // larger ones are cut off by the library (close 1009) before we buffer them.
        .max_message_size(max_frame.saturating_mul(4).max(1 << 20))
        .max_frame_size(max_frame.saturating_mul(4).max(1 << 20))
        .on_upgrade(move |mut socket: WebSocket| async move {
            // The socket and the session live here, once, for the
            // connection's whole life; the loop borrows them. (An async fn
            // keeps a parameter it uses after an await twice in its state,
            // and a binding moved into an awaited future once more.)
            let (mut session, queue) = Session::open(node, grants);
            connection::serve(&mut socket, &mut session, queue).await;
            drop(session);
            drop(slot);
        })
}
