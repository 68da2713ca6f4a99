//! A scripted fake API server for tests (kube's tower-test pattern):
//! every request must come in order with the expected method and path;
//! a request that does not come fails after 1 s.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use http::{Method, Request, Response};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use tokio::time::timeout;
use tower_test::mock::{self, Handle};

/// A client talking to a fresh fake API server, and the server's handle.
pub fn pair() -> (Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// How the fake API server answers one request.
pub enum Reply {
    /// 200 with the request body (what server-side apply returns, minus status).
    Echo,
    /// 200 with the request body plus this `status`.
    EchoWithStatus(Value),
    /// 201 with the request body.
    Created,
    /// 404 NotFound `Status`.
    NotFound,
    /// This code and body.
    Json(u16, Value),
}

pub struct Expect {
    pub method: Method,
    pub path: String,
    pub reply: Reply,
}

pub fn expect(method: Method, path: &str, reply: Reply) -> Expect {
    Expect {
        method,
        path: path.to_owned(),
        reply,
    }
}

/// One request as the fake API server saw it.
#[derive(Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

pub fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

pub async fn serve(handle: &mut ApiHandle, script: Vec<Expect>) -> Vec<Seen> {
    let mut seen = Vec::new();
    for (i, step) in script.into_iter().enumerate() {
        let (request, send) = timeout(Duration::from_secs(1), handle.next_request())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "step {i}: expected {} {}, but no request came within 1 s",
                    step.method, step.path
                )
            })
            .unwrap_or_else(|| {
                panic!("step {i}: client gone before {} {}", step.method, step.path)
            });
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        assert_eq!(
            (&method, path.as_str()),
            (&step.method, step.path.as_str()),
            "step {i}"
        );
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        // A status apply carries no metadata; the API server answers with the whole object.
        let mut echo = body.clone();
        if echo.is_object() && echo.get("metadata").is_none() {
            echo["metadata"] = json!({"name": "chat", "namespace": "default"});
            echo["spec"] = json!({});
        }
        let (code, reply) = match step.reply {
            Reply::Echo => (200, echo),
            Reply::EchoWithStatus(status) => {
                let mut b = body.clone();
                b["status"] = status;
                (200, b)
            }
            Reply::Created => (201, body.clone()),
            Reply::NotFound => (404, not_found()),
            Reply::Json(code, value) => (code, value),
        };
        let response = Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap();
        send.send_response(response);
        seen.push(Seen {
            method,
            path,
            query,
            body,
        });
    }
    seen
}
