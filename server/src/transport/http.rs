//! Plain HTTP handlers: backend publish API, health, metrics, demo page.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use tower_http::timeout::TimeoutError;

use crate::broker::{BrokerError, PublishRequest};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::protocol::{ErrorCode, RoomName, check_key, is_json_object};

const DEMO_PAGE: &str = include_str!("../../static/index.html");
const JS_CLIENT: &str = include_str!("../../static/chorus.js");
const JS_CLIENT_TYPES: &str = include_str!("../../static/chorus.d.ts");

/// `GET /`: the demo chat; with client auth on, it says so and asks for a token.
pub async fn demo_page(State(node): State<Arc<Node>>) -> Html<String> {
    let page = if node.auth.clients_need_token() {
        DEMO_PAGE.replacen(
            r#"<body data-auth="off">"#,
            r#"<body data-auth="required">"#,
            1,
        )
    } else {
        DEMO_PAGE.to_owned()
    };
    Html(page)
}

/// `GET /chorus.js`: the browser client (an ES module), importable from
/// pages on any origin (it is public and the same for everyone).
pub async fn js_client() -> Response {
    let mut resp = public_file("text/javascript; charset=utf-8", JS_CLIENT);
    // Where Deno (and other tools that follow it) find the types.
    resp.headers_mut().insert(
        header::HeaderName::from_static("x-typescript-types"),
        header::HeaderValue::from_static("/chorus.d.ts"),
    );
    resp
}

/// `GET /chorus.d.ts`: TypeScript declarations of `/chorus.js`.
pub async fn js_client_types() -> Response {
    public_file("application/typescript; charset=utf-8", JS_CLIENT_TYPES)
}

fn public_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (
                header::HeaderName::from_static("cross-origin-resource-policy"),
                "cross-origin",
            ),
        ],
        body,
    )
        .into_response()
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(node): State<Arc<Node>>) -> Response {
    match node.ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

pub async fn metrics(State(node): State<Arc<Node>>) -> Response {
    node.metrics.broker_up.set(i64::from(node.broker_up()));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct PublishBody {
    data: Box<RawValue>,
    #[serde(default)]
    key: Option<String>,
}

/// `POST /api/v1/rooms/{room}/messages` → `{"offset", "epoch"}`.
///
/// The body is at most `--max-frame-bytes` (the router's body limit), one
/// JSON object; every refusal is the documented JSON error body.
pub async fn publish(
    State(node): State<Arc<Node>>,
    room: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let room = match backend_room(&node, &headers, room) {
        Ok(room) => room,
        Err(refused) => return refused,
    };
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return api_error(
                &node.metrics,
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                &format!("body is larger than {} bytes", node.config.max_frame_bytes),
            );
        }
        Err(e) if timed_out(&e) => {
            return api_error(
                &node.metrics,
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadFrame,
                &format!(
                    "the body did not arrive within {:?} (--http-body-timeout)",
                    node.config.http_body_timeout
                ),
            );
        }
        Err(e) => {
            return bad_frame(&node, &e.body_text());
        }
    };
    const EXPECTED: &str = r#"expected one JSON object {"data": <json>, "key"?: <string>}"#;
    if !is_json_object(&body) {
        return bad_frame(&node, EXPECTED);
    }
    let body: PublishBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return bad_frame(&node, &format!("{EXPECTED}: {e}"));
        }
    };
    if let Some(Err(why)) = body.key.as_deref().map(check_key) {
        return bad_frame(&node, &why);
    }
    if node.congested(&room) {
        let mut refused = api_error(
            &node.metrics,
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            &format!("room `{room}` is congested: its subscribers on this node are behind; retry"),
        );
        refused
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return refused;
    }
    let req = PublishRequest {
        room,
        data: body.data,
        from: None,
        key: body.key,
    };
    match node.publish(req).await {
        Ok(p) => (
            StatusCode::OK,
            axum::Json(json!({"offset": p.offset, "epoch": &*p.epoch})),
        )
            .into_response(),
        Err(e) => broker_error(&node.metrics, &e),
    }
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

/// The body of a history answer.
#[derive(Serialize)]
struct HistoryPage<'a> {
    room: &'a str,
    epoch: &'a str,
    last_offset: u64,
    complete: bool,
    messages: Vec<&'a RawValue>,
}

/// Most messages one history request returns.
const MAX_HISTORY_PAGE: usize = 1000;
/// Most bytes of message frames one history request returns (a larger
/// message comes alone): what each concurrent read may pin.
const MAX_HISTORY_PAGE_BYTES: usize = 1024 * 1024;

/// `GET /api/v1/rooms/{room}/history?since=<offset>&limit=<n>` → the kept
/// messages after `since` (oldest first), the room's epoch and last offset,
/// and whether the history still covers everything after `since`.
pub async fn history(
    State(node): State<Arc<Node>>,
    room: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let room = match backend_room(&node, &headers, room) {
        Ok(room) => room,
        Err(refused) => return refused,
    };
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => {
            return bad_frame(&node, &e.body_text());
        }
    };
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_HISTORY_PAGE);
    match node
        .broker
        .history(&room, query.since, limit, MAX_HISTORY_PAGE_BYTES)
        .await
    {
        Ok(Some(h)) => {
            // The kept frames go into the body as they are, borrowed.
            let body = HistoryPage {
                room: room.as_str(),
                epoch: &h.epoch,
                last_offset: h.last,
                complete: h.covers(query.since),
                messages: h
                    .messages
                    .iter()
                    .filter_map(|m| serde_json::from_str(&m.frame).ok())
                    .collect(),
            };
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Ok(None) => api_error(
            &node.metrics,
            StatusCode::NOT_FOUND,
            ErrorCode::NoHistory,
            "no history is kept: this node runs --delivery pubsub",
        ),
        Err(e) => broker_error(&node.metrics, &e),
    }
}

/// `POST /api/v1/admin/shed` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShedBody {
    /// How many connections to move.
    connections: usize,
    /// Over how many seconds to spread their `reconnect`s.
    #[serde(default = "default_shed_seconds")]
    seconds: u64,
}

fn default_shed_seconds() -> u64 {
    10
}

/// `POST /api/v1/admin/shed`: move connections elsewhere (the operator calls
/// it after a scale-out so new pods take a share). Same API key as the
/// publish API; → `{"scheduled": n}`.
pub async fn shed(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = node.auth.check_api_key(authorization) {
        return api_error(
            &node.metrics,
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            &e.to_string(),
        );
    }
    const EXPECTED: &str = r#"expected {"connections": <count>, "seconds"?: <spread>}"#;
    let body = match body {
        Ok(b) if is_json_object(&b) => b,
        _ => {
            return api_error(
                &node.metrics,
                StatusCode::BAD_REQUEST,
                ErrorCode::BadFrame,
                EXPECTED,
            );
        }
    };
    let Ok(body) = serde_json::from_slice::<ShedBody>(&body) else {
        return api_error(
            &node.metrics,
            StatusCode::BAD_REQUEST,
            ErrorCode::BadFrame,
            EXPECTED,
        );
    };
    if body.seconds > 3600 {
        return api_error(
            &node.metrics,
            StatusCode::BAD_REQUEST,
            ErrorCode::BadFrame,
            "seconds must be at most 3600",
        );
    }
    let scheduled = node.shed(
        body.connections,
        std::time::Duration::from_secs(body.seconds),
    );
    axum::Json(json!({ "scheduled": scheduled })).into_response()
}

/// Checks a backend call's API key and the room in its path (a path that
/// does not decode, e.g. bad percent-encoding, is a `bad_room` too); the
/// error is the response to send.
#[allow(clippy::result_large_err)]
fn backend_room(
    node: &Node,
    headers: &HeaderMap,
    room: Result<Path<String>, PathRejection>,
) -> Result<RoomName, Response> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = node.auth.check_api_key(authorization) {
        return Err(api_error(
            &node.metrics,
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            &e.to_string(),
        ));
    }
    let bad_room = |why: &str| {
        api_error(
            &node.metrics,
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRoom,
            why,
        )
    };
    let Path(room) = room.map_err(|e| bad_room(&e.body_text()))?;
    RoomName::parse(&room).map_err(|e| bad_room(&e.to_string()))
}

/// Whether reading a body failed on the body deadline (`--http-body-timeout`).
fn timed_out(e: &BytesRejection) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(e) = cause {
        if e.is::<TimeoutError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// 503 `unavailable` (nothing happened: retry), or 504 `outcome_unknown`
/// (a publish got no answer: retry with the same key).
fn broker_error(metrics: &Metrics, e: &BrokerError) -> Response {
    let status = match e.code() {
        ErrorCode::OutcomeUnknown => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut resp = api_error(metrics, status, e.code(), &e.public_message());
    resp.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    resp
}

/// 400 `bad_frame`.
fn bad_frame(node: &Node, why: &str) -> Response {
    api_error(
        &node.metrics,
        StatusCode::BAD_REQUEST,
        ErrorCode::BadFrame,
        why,
    )
}

/// The documented JSON error body, counted in `chorus_errors_total`.
fn api_error(metrics: &Metrics, status: StatusCode, code: ErrorCode, message: &str) -> Response {
    metrics.error(code);
    (
        status,
        axum::Json(json!({"error": {"code": code.as_str(), "message": message}})),
    )
        .into_response()
}
