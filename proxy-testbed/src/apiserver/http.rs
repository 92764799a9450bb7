//! Answering one HTTP request: injected failures first, then the route, then a JSON answer or a
//! watch stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use super::Shared;
use super::request::{self, Route};
use super::status::ApiError;
use super::{list, watch};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// hyper's service function for a connection of `epoch` (see
/// [`Control`](super::listener::Control)): every request gets an answer, errors included.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    epoch: u64,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // The body is not read: every request served is a GET.
    let (parts, _body) = request.into_parts();
    Ok(answer(shared, epoch, &parts).await.unwrap_or_else(|err| {
        let status = StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, &err.to_status())
    }))
}

async fn answer(
    shared: Arc<Shared>,
    epoch: u64,
    parts: &Parts,
) -> Result<Response<Body>, ApiError> {
    if shared.control.borrow().epoch != epoch {
        // This connection is being dropped: it answers nothing more.
        std::future::pending::<()>().await;
    }
    if let Some(code) = shared.failing() {
        return Err(ApiError::injected(code));
    }
    if parts.method != Method::GET {
        return Err(ApiError::method_not_allowed(parts.method.as_str()));
    }
    let (kind, namespace) = match request::route(parts.uri.path()) {
        None => return Err(ApiError::not_found()),
        Some(Route::Version) => return Ok(json_response(StatusCode::OK, &version())),
        Some(Route::Collection { kind, namespace }) => (kind, namespace),
    };
    match request::parse(namespace, parts.uri.query())? {
        request::Request::List(params) => {
            shared.lists[kind.index()].fetch_add(1, Ordering::Relaxed);
            let body = list::list(&shared.store(), kind, &params)?;
            Ok(json_response(StatusCode::OK, &body))
        }
        request::Request::Watch(params) => {
            shared.watches[kind.index()].fetch_add(1, Ordering::Relaxed);
            if shared.stalled.load(Ordering::Relaxed) {
                // A dead peer sends no response at all, not even its headers.
                std::future::pending::<()>().await;
            }
            Ok(watch_response(watch::watch(
                Arc::clone(&shared),
                epoch,
                kind,
                params,
            )))
        }
    }
}

/// What `/version` reports; the numbers match the k8s-openapi API version the agent is built
/// against.
fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-proxy-testbed",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "",
        "compiler": "",
        "platform": "linux/amd64",
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(body.to_string())).boxed_unsync();
    with_json_type(status, body)
}

/// A watch: HTTP 200 with a body of unknown length, which hyper sends chunked, one event a chunk.
fn watch_response(events: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response<Body> {
    let body = StreamBody::new(events.map(|line| Ok(Frame::data(line)))).boxed_unsync();
    with_json_type(StatusCode::OK, body)
}

fn with_json_type(status: StatusCode, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
