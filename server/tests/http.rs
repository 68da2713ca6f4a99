//! The HTTP side as a browser page on another origin and a backend see it:
//! `/chorus.js` and its types, CORS on the API, error bodies.
#![allow(clippy::unwrap_used)]

use chorus_testkit::free_port;
use chorus_tests::{TestNode, wait_until};
use reqwest::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_ORIGIN, CONTENT_TYPE, HeaderMap,
};
use serde_json::{Value, json};

const PAGE: &str = "https://app.example.com";

fn allowed_origin(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(ACCESS_CONTROL_ALLOW_ORIGIN)
        .map(|v| v.to_str().unwrap())
}

/// A browser's preflight for a keyed JSON publish from `origin`.
async fn preflight(node: &TestNode, origin: &str) -> reqwest::Response {
    reqwest::Client::new()
        .request(
            reqwest::Method::OPTIONS,
            node.http("/api/v1/rooms/lobby/messages"),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap()
}

async fn get_from(node: &TestNode, path: &str, origin: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(node.http(path))
        .header("origin", origin)
        .send()
        .await
        .unwrap()
}

async fn publish_from(node: &TestNode, origin: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(node.http("/api/v1/rooms/lobby/messages"))
        .header("origin", origin)
        .json(&json!({"data": "from a page"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn chorus_js_and_its_types_can_be_imported_from_any_origin() {
    let node = TestNode::start(&[]).await;
    let js = get_from(&node, "/chorus.js", PAGE).await;
    assert_eq!(js.status(), 200);
    assert_eq!(allowed_origin(js.headers()), Some("*"));
    assert!(
        js.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert_eq!(js.headers()["x-typescript-types"], "/chorus.d.ts");
    let js = js.text().await.unwrap();

    let types = get_from(&node, "/chorus.d.ts", PAGE).await;
    assert_eq!(types.status(), 200);
    assert_eq!(allowed_origin(types.headers()), Some("*"));
    let types = types.text().await.unwrap();

    // Every public method of the client is declared (methods the client
    // only calls on itself are not part of its API).
    let internal = [
        "connect",
        "open",
        "freshToken",
        "notReady",
        "scheduleRefresh",
        "onFrame",
        "deliver",
        "onClose",
        "request",
        "resubscribe",
    ];
    for line in js.lines() {
        let Some(name) = method_name(line) else {
            continue;
        };
        if internal.contains(&name) {
            continue;
        }
        assert!(
            types.contains(&format!("  {name}(")),
            "chorus.d.ts does not declare `{name}`"
        );
    }
    for class in ["class Chorus ", "class ChorusError "] {
        assert!(js.contains(&format!("export {class}")), "{class}");
        assert!(types.contains(&format!("export {class}")), "{class}");
    }
}

/// `  async name(` or `  name(` at class-member indentation.
fn method_name(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("  ")?;
    if rest.starts_with(' ') {
        return None;
    }
    let rest = rest.strip_prefix("async ").unwrap_or(rest);
    let (name, _) = rest.split_once('(')?;
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()) && name != "constructor")
        .then_some(name)
}

#[tokio::test]
async fn by_default_pages_on_other_origins_get_no_cors_grant_for_the_api() {
    let node = TestNode::start(&[]).await;
    let pre = preflight(&node, PAGE).await;
    assert_eq!(allowed_origin(pre.headers()), None);
    let resp = publish_from(&node, PAGE).await;
    assert_eq!(
        resp.status(),
        200,
        "backends (and same-origin pages) still publish"
    );
    assert_eq!(allowed_origin(resp.headers()), None);
}

#[tokio::test]
async fn cors_origins_lets_those_pages_call_the_api_with_a_key() {
    let node = TestNode::start(&[
        "--cors-origins",
        "https://app.example.com,http://127.0.0.1:3000",
        "--api-key",
        "k",
    ])
    .await;
    let pre = preflight(&node, PAGE).await;
    assert!(pre.status().is_success(), "{}", pre.status());
    assert_eq!(allowed_origin(pre.headers()), Some(PAGE));
    let headers = pre.headers()[ACCESS_CONTROL_ALLOW_HEADERS]
        .to_str()
        .unwrap();
    assert!(headers.contains("authorization"), "{headers}");
    assert!(headers.contains("content-type"), "{headers}");

    let resp = reqwest::Client::new()
        .post(node.http("/api/v1/rooms/lobby/messages"))
        .header("origin", PAGE)
        .bearer_auth("k")
        .json(&json!({"data": "from a page"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(allowed_origin(resp.headers()), Some(PAGE));
    let history = reqwest::Client::new()
        .get(node.http("/api/v1/rooms/lobby/history"))
        .header("origin", "http://127.0.0.1:3000")
        .bearer_auth("k")
        .send()
        .await
        .unwrap();
    assert_eq!(
        allowed_origin(history.headers()),
        Some("http://127.0.0.1:3000")
    );

    // Any other origin gets nothing.
    let other = preflight(&node, "https://evil.example").await;
    assert_eq!(allowed_origin(other.headers()), None);

    let any = TestNode::start(&["--cors-origins", "*"]).await;
    assert_eq!(
        allowed_origin(preflight(&any, PAGE).await.headers()),
        Some("*")
    );
}

#[tokio::test]
async fn history_on_a_node_without_history_says_so_with_its_own_code() {
    let node = TestNode::start(&[]).await;
    let resp = reqwest::get(node.http("/api/v1/rooms/lobby/history"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_history", "{body}");
}

#[tokio::test]
async fn clients_are_not_told_where_the_broker_is() {
    // A Redis broker that is not there: the node keeps trying.
    let port = free_port();
    let broker = format!("redis://127.0.0.1:{port}");
    let node = TestNode::start(&["--broker", &broker]).await;
    wait_until("the node to give up its first connect", || async {
        node.node
            .ready()
            .is_err_and(|why| why.contains(&port.to_string()))
    })
    .await;

    let mut client = node.client().await;
    let reply = client.publish("lobby", json!("hi")).await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    let message = reply["message"].as_str().unwrap();
    assert!(!message.contains(&port.to_string()), "{message}");
    assert!(!message.contains("127.0.0.1"), "{message}");

    let resp = reqwest::Client::new()
        .post(node.http("/api/v1/rooms/lobby/messages"))
        .json(&json!({"data": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body = resp.text().await.unwrap();
    assert!(body.contains("unavailable"), "{body}");
    assert!(!body.contains(&port.to_string()), "{body}");
}
