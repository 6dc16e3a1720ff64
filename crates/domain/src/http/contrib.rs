//! The browser node's library, served to any page that embeds it.
//!
//! `GET /contrib.js` is `web/contrib/contrib.js`; `GET /contrib/noble-ed25519.js` is the
//! vendored Ed25519 fallback it imports where WebCrypto lacks Ed25519. The routes a browser
//! node calls from its embedding page's origin (these two, blobs, and one node's public
//! stats) answer cross-origin requests: the requests carry no cookies or ambient
//! credentials (a signed request's key is in its headers), so any origin may make them.
//! The rest of the API, the dashboard's job list included, stays same-origin.

use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

const CONTRIB: &str = include_str!("../../../../web/contrib/contrib.js");
const NOBLE: &str = include_str!("../../../../web/contrib/vendor/noble-ed25519.js");

fn javascript(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn script() -> Response {
    javascript(CONTRIB)
}

pub(crate) async fn noble() -> Response {
    javascript(NOBLE)
}

/// Answers CORS preflights and lets any origin read the answers of the routes it wraps.
pub(crate) async fn any_origin(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.method() == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, PUT"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(
                "content-type, x-stardust-key, x-stardust-time, x-stardust-signature",
            ),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        return r;
    }
    let mut r = next.run(request).await;
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

/// The handler behind `OPTIONS` on cross-origin routes (the middleware answers first).
pub(crate) async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}
