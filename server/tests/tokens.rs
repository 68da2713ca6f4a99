//! Client tokens over time: no session for an expired token, `refresh` to
//! carry a connection past its token's `exp`, the bundled client's token
//! provider and backoff, the demo page saying a token is needed.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_tests::{Event, TestNode, WsClient, wait_until};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "token-test-secret";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn auth_node() -> TestNode {
    TestNode::start(&["--jwt-secret", SECRET]).await
}

async fn connect(node: &TestNode, token: &str) -> Result<WsClient, u16> {
    match WsClient::connect(&format!("{}?token={token}", node.ws_url())).await {
        Ok(c) => Ok(c),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn a_token_past_its_exp_gets_no_session() {
    let node = auth_node().await;
    // Just expired (inside the 30 s leeway that used to be given), and long
    // expired: both refused at the upgrade, not welcomed and closed at once.
    for ago in [1, 3600] {
        let expired = token(json!({"sub": "u", "exp": now() - ago}));
        match connect(&node, &expired).await {
            Err(status) => assert_eq!(status, 401, "{ago} s ago"),
            Ok(c) => panic!("{ago} s ago: welcomed as {}", c.welcome),
        }
    }
    assert!(
        connect(&node, &token(json!({"sub": "u", "exp": now() + 60})))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn refresh_carries_a_connection_and_its_rooms_past_the_first_exp() {
    let node = auth_node().await;
    let first_exp = now() + 2;
    let mut c = connect(&node, &token(json!({"sub": "u", "exp": first_exp})))
        .await
        .unwrap();
    c.subscribe("r").await;
    let ok = c
        .request(json!({"op": "refresh", "token": token(json!({"sub": "u", "exp": now() + 600}))}))
        .await;
    assert_eq!(ok["op"], "ok", "{ok}");
    wait_until("the first token to expire", || async { now() > first_exp }).await;
    // The connection lives on (it would have been closed at `first_exp`).
    c.sync().await;
    let mut publisher = connect(&node, &token(json!({"sub": "p", "exp": now() + 600})))
        .await
        .unwrap();
    publisher.publish("r", json!("still here")).await;
    assert_eq!(c.message().await["data"], "still here");
}

#[tokio::test]
async fn a_refused_refresh_leaves_the_connection_on_its_current_token() {
    let node = auth_node().await;
    let exp = now() + 2;
    let mut c = connect(
        &node,
        &token(json!({"sub": "u", "exp": exp, "rooms": ["chat:*"]})),
    )
    .await
    .unwrap();
    c.subscribe("chat:a").await;
    for (fresh, code) in [
        (json!({"sub": "u", "exp": now() - 1}), "unauthorized"),
        (json!({"sub": "mallory", "exp": now() + 600}), "forbidden"),
        (
            json!({"sub": "u", "exp": now() + 600, "rooms": ["other:*"]}),
            "forbidden",
        ),
    ] {
        let e = c
            .request(json!({"op": "refresh", "token": token(fresh.clone())}))
            .await;
        assert_eq!(
            (e["op"].as_str(), e["code"].as_str()),
            (Some("error"), Some(code)),
            "{fresh} → {e}"
        );
    }
    let e = c
        .request(json!({"op": "refresh", "token": "not a jwt"}))
        .await;
    assert_eq!(e["code"], "unauthorized", "{e}");
    // Still the first token's connection: it ends at that token's `exp`.
    c.sync().await;
    match c.read_event(Duration::from_secs(10)).await {
        Some(Event::Closed(code)) => assert_eq!(code, Some(1008)),
        other => panic!("expected the close at the first token's exp, got {other:?}"),
    }
}

#[tokio::test]
async fn the_demo_page_says_when_a_token_is_needed() {
    for (flags, required) in [(vec!["--jwt-secret", SECRET], true), (vec![], false)] {
        let node = TestNode::start(&flags).await;
        let page = node.get_text("/").await;
        let attribute = if required {
            r#"<body data-auth="required">"#
        } else {
            r#"<body data-auth="off">"#
        };
        assert!(page.contains(attribute), "{flags:?}: no {attribute}");
        assert!(page.contains("This node requires a token"));
    }
}

/// `node` with a WebSocket global (20.10 and later, with the flag until
/// 22); `None` when there is none.
fn node_with_websocket() -> Option<Vec<&'static str>> {
    [vec![], vec!["--experimental-websocket"]]
        .into_iter()
        .find(|flags| {
            Command::new("node")
                .args(flags)
                .args([
                    "-e",
                    "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
                ])
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Runs `server/tests/js/tokens.mjs` in `mode` against `node`: its JSON line.
async fn run_js_client(node: &TestNode, mode: &str) -> Option<Value> {
    let Some(flags) = node_with_websocket() else {
        eprintln!("SKIPPED: the bundled client's test needs node 20.10 or later on PATH");
        return None;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/tokens.mjs");
    let out = tokio::process::Command::new("node")
        .args(flags)
        .args([script, mode, &node.ws_url(), &node.http(""), SECRET])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    Some(
        serde_json::from_str(line).unwrap_or_else(|_| {
            panic!("{mode}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
        }),
    )
}

#[tokio::test]
async fn the_bundled_client_refreshes_its_token_and_keeps_its_connection() {
    let node = auth_node().await;
    let Some(result) = run_js_client(&node, "refresh").await else {
        return;
    };
    assert_eq!(
        result["sessions"].as_array().map(Vec::len),
        Some(1),
        "one connection throughout: {result}"
    );
    assert!(result["issued"].as_u64() >= Some(2), "{result}");
    assert_eq!(result["got"], json!(["after the first token expired"]));
}

#[tokio::test]
async fn the_bundled_client_backs_off_when_its_token_is_refused() {
    let node = auth_node().await;
    let Some(result) = run_js_client(&node, "backoff").await else {
        return;
    };
    let seen = result["seen"].as_array().unwrap();
    assert!(
        seen.iter().all(Value::is_u64),
        "never welcomed with an expired token: {result}"
    );
    // 0.5 s doubling, with jitter down to half: the fourth wait is 2 s or more.
    assert!(seen[3].as_u64() >= Some(2000), "no backoff: {result}");
}
