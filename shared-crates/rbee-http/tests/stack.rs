//! The shared stack in-process: routes, extractors and layers together, as a
//! daemon assembles them.

use std::time::Duration;

use auth_min::{ApiToken, Authenticator};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use rbee_http::{ApiJson, CoreState, HttpStack, RequestContext};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const TOKEN: &str = "stack-test-token-0123456789";

#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct Echo {
    n: u32,
}

async fn echo(ApiJson(body): ApiJson<Echo>) -> ApiJson<Echo> {
    ApiJson(body)
}

async fn item(Path(id): Path<u32>) -> String {
    id.to_string()
}

/// The headers a handler would forward on its outgoing call, and the time
/// that remains to bound that call by.
async fn forward(ctx: RequestContext) -> axum::Json<Value> {
    let mut h = http::HeaderMap::new();
    ctx.forward_headers(&mut h);
    axum::Json(serde_json::json!({
        "x-request-id": h.get("x-request-id").map(|v| v.to_str().expect("header is ASCII")),
        "traceparent": h.get("traceparent").map(|v| v.to_str().expect("header is ASCII")),
        "x-deadline": h.get("x-deadline").map(|v| v.to_str().expect("header is ASCII")),
        "timeout_ms": ctx.deadline.map(|d| d.remaining().as_millis() as u64),
    }))
}

fn app(token: Option<&str>) -> (Router, HttpStack) {
    let token = token.map(|t| ApiToken::new(t.to_owned()).expect("valid test token"));
    let mut registry = Registry::default();
    let stack = HttpStack::new(
        &mut registry,
        "rbee_test",
        Authenticator::from_config(token.as_ref()),
    )
    .with_body_limit(1024);
    let core = CoreState::new(registry, CancellationToken::new(), "9.9.9");
    let router = Router::new()
        .route("/v1/echo", post(echo))
        .route("/v1/items/{id}", get(item))
        .route("/v1/forward", get(forward))
        .merge(rbee_http::core_routes().into_router())
        .with_state(core);
    (stack.apply(router), stack)
}

async fn send(router: &Router, request: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("read response body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn post_json(body: &str) -> Request<Body> {
    Request::post("/v1/echo")
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .expect("valid request")
}

fn code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["error"]["code"]
        .as_str()
        .expect("error envelope has a code")
        .to_owned()
}

#[tokio::test]
async fn valid_json_passes_through() {
    let (router, _) = app(None);
    let (status, _, body) = send(&router, post_json(r#"{"n":3}"#)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, r#"{"n":3}"#);
}

#[tokio::test]
async fn malformed_json_is_400_invalid_json() {
    let (router, _) = app(None);
    let (status, _, body) = send(&router, post_json(r#"{"n":"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(code(&body), "INVALID_JSON");
}

#[tokio::test]
async fn mistyped_or_unknown_fields_are_400_naming_the_field() {
    let (router, _) = app(None);
    let (status, _, body) = send(&router, post_json(r#"{"n":"three"}"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(code(&body), "INVALID_JSON");
    assert!(body.contains('n'), "{body}");
    let (_, _, body) = send(&router, post_json(r#"{"n":1,"extra":2}"#)).await;
    assert!(body.contains("extra"), "{body}");
}

#[tokio::test]
async fn missing_content_type_is_415() {
    let (router, _) = app(None);
    let request = Request::post("/v1/echo")
        .body(Body::from(r#"{"n":1}"#))
        .unwrap();
    let (status, _, body) = send(&router, request).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(code(&body), "UNSUPPORTED_MEDIA_TYPE");
}

#[tokio::test]
async fn body_over_the_limit_is_413_with_or_without_content_length() {
    let (router, _) = app(None);
    let big = format!(r#"{{"n":1,"pad":"{}"}}"#, "x".repeat(2048));
    let (status, _, body) = send(&router, post_json(&big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code(&body), "PAYLOAD_TOO_LARGE");

    // A streamed body has no Content-Length: the limit applies while reading.
    let bytes = bytes::Bytes::from(big);
    let mid = bytes.len() / 2;
    let chunks = futures_util::stream::iter(
        [bytes.slice(..mid), bytes.slice(mid..)].map(Ok::<_, std::io::Error>),
    );
    let request = Request::post("/v1/echo")
        .header("content-type", "application/json")
        .body(Body::from_stream(chunks))
        .unwrap();
    let (status, _, body) = send(&router, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(code(&body), "PAYLOAD_TOO_LARGE");
}

#[tokio::test]
async fn metrics_label_requests_by_route_template() {
    let (router, stack) = app(None);
    for id in [1, 2, 3] {
        let request = Request::get(format!("/v1/items/{id}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&router, request).await.0, StatusCode::OK);
    }
    assert_eq!(stack.http_metrics().count("/v1/items/{id}", 200), 3);
    let (_, _, text) = send(
        &router,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert!(
        text.contains(r#"rbee_test_requests_total{route="/v1/items/{id}",status="200"} 3"#),
        "{text}"
    );
    assert!(!text.contains("/v1/items/1"), "{text}");
}

#[tokio::test]
async fn request_id_traceparent_and_deadline_are_forwarded() {
    let (router, _) = app(Some(TOKEN));
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let request = Request::get("/v1/forward")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("x-request-id", "req-abc")
        .header("traceparent", tp)
        .header("x-timeout-ms", "5000")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(&router, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["x-request-id"], "req-abc");
    let out: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(out["x-request-id"], "req-abc");
    assert_eq!(out["traceparent"], tp);
    let deadline: u64 = out["x-deadline"].as_str().unwrap().parse().unwrap();
    assert!(deadline > 1_700_000_000_000);
    let timeout = out["timeout_ms"].as_u64().unwrap();
    assert!(
        timeout > 4_000 && timeout <= 5_000,
        "outgoing call bounded by what remains: {timeout}"
    );
}

#[tokio::test]
async fn admin_shutdown_cancels_the_token_only_for_a_request_no_web_page_can_send() {
    let mut registry = Registry::default();
    let stack = HttpStack::new(&mut registry, "rbee_test", Authenticator::open());
    let shutdown = CancellationToken::new();
    let core = CoreState::new(registry, shutdown.clone(), "1");
    let router = stack.apply(rbee_http::core_routes().into_router().with_state(core));
    // What a web page can make a browser send to loopback: no custom
    // header, a form's or text/plain content type.
    for content_type in [
        None,
        Some("application/x-www-form-urlencoded"),
        Some("text/plain"),
    ] {
        let mut request = Request::post("/v1/admin/shutdown");
        if let Some(t) = content_type {
            request = request.header("content-type", t);
        }
        let (status, _, body) = send(&router, request.body(Body::empty()).unwrap()).await;
        assert_eq!(
            status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert!(body.contains("application/json"), "{body}");
        assert!(!shutdown.is_cancelled());
    }
    let request = Request::post("/v1/admin/shutdown")
        .header("content-type", "application/json")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(&router, request).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(body.contains("draining"));
    assert!(shutdown.is_cancelled());
}

#[tokio::test]
async fn drain_is_bounded_when_a_request_never_finishes() {
    async fn slow(State(()): State<()>) -> &'static str {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        "never"
    }
    let shutdown = CancellationToken::new();
    let router = Router::new().route("/slow", get(slow)).with_state(());
    let daemon = rbee_http::Daemon::bind(
        "test-daemon",
        "127.0.0.1:0".parse().unwrap(),
        router,
        shutdown.clone(),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    let addr = daemon.local_addr();
    let server = tokio::spawn(daemon.run());
    let in_flight = tokio::spawn(async move { reqwest::get(format!("http://{addr}/slow")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("run() returns within the drain bound")
        .unwrap();
    assert!(result.is_ok());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "waited for the in-flight request: {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    in_flight.abort();
}
