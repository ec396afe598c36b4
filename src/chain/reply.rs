//! Responses that gatehouse makes itself. One helper builds all of them, so every
//! rejection, 502 and 431 has the same JSON shape and carries the request id.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

/// SPEC's error codes, one per status that gatehouse answers with itself.
pub fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "payload_too_large",
        429 => "rate_limited",
        431 => "headers_too_large",
        502 => "bad_gateway",
        503 => "unavailable",
        504 => "gateway_timeout",
        _ if status.is_server_error() => "internal_error",
        _ => "error",
    }
}

/// `{"error": "<code>", "message": "<text>", "request_id": "<id or null>"}` with `status`.
pub fn error(
    status: StatusCode,
    message: &str,
    request_id: Option<&HeaderValue>,
) -> Response<Bytes> {
    let body = serde_json::json!({
        "error": code_for(status),
        "message": message,
        "request_id": request_id.and_then(|v| v.to_str().ok()),
    });
    let mut resp = Response::new(Bytes::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_shape() {
        let id = HeaderValue::from_static("abc\"1");
        let resp = error(StatusCode::TOO_MANY_REQUESTS, "slow down", Some(&id));
        assert_eq!(resp.status(), 429);
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "rate_limited", "message": "slow down", "request_id": "abc\"1"})
        );
        let none = error(StatusCode::BAD_GATEWAY, "x", None);
        let v: serde_json::Value = serde_json::from_slice(none.body()).unwrap();
        assert!(v["request_id"].is_null());
    }
}
