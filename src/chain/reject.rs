//! Answers gatehouse makes itself: a middleware's refusal, a malformed request, an upstream
//! failure, the drain. One type carries the status, a machine [`Reason`], a message and the
//! headers that go with it (a challenge, `retry-after`); [`Reject::render`] turns it into
//! the response, in one place, so every such answer has the same shape and carries the
//! request id; to a gRPC call, it is a gRPC status instead.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderName, Response, StatusCode};

use crate::protocol::h1::request;
use crate::{grpc, json};

/// Why gatehouse answered instead of the app. The code is stable: audit events
/// (`deny_reason`) and alerts key on it; docs/audit.md and docs/security.md list every one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No credentials where an authentication middleware wants some.
    MissingCredentials,
    /// Credentials that are malformed or match nothing.
    InvalidCredentials,
    /// A token past its `exp`, or before its `nbf`.
    Expired,
    /// A token whose signature does not verify.
    BadSignature,
    WrongIssuer,
    WrongAudience,
    /// A `require_claims` entry does not hold.
    ClaimMismatch,
    IpDenied,
    OriginNotAllowed,
    /// A method the resource does not take (a CORS preflight's, a CONNECT).
    MethodNotAllowed,
    BodyTooLarge,
    RateLimited,
    /// A policy rule (`authorize`), or its default, refused the request.
    PolicyDenied,
    /// `forward_auth`'s service said no.
    AuthServiceDenied,
    /// `forward_auth`'s service did not answer in time.
    AuthServiceUnavailable,
    /// A middleware's backend (Redis) failed and the middleware fails closed.
    BackendUnavailable,
    /// A malformed request (HTTP syntax, Host, path with dot-segments).
    BadRequest,
    /// A method with a lowercase letter: apps upper-case methods, so it would slip past a
    /// `methods` scope and still run the handler of the upper-case one.
    LowercaseMethod,
    /// A header name with an `_`, under `server.underscores_in_headers = "reject"`.
    UnderscoreInHeader,
    HeadersTooLarge,
    /// A transfer coding gatehouse does not forward.
    NotImplemented,
    /// The server is shutting down.
    Draining,
    /// The upstream refused the connection, reset it, or sent no valid response.
    UpstreamFailed,
    /// The upstream did not answer within `upstream.timeout` (or `connect_timeout`).
    UpstreamTimeout,
    /// Every connection `upstream.max_connections` allows was busy.
    UpstreamOverloaded,
    /// The client's request body broke off on its way to the upstream.
    ClientBodyFailed,
    /// A browser sign-in is needed: no session, or one that no longer opens.
    LoginRequired,
    /// The session ended (its lifetime is over, or its refresh failed).
    SessionExpired,
    /// Signed in, but not one of the allowed users (email domain, group).
    NotAllowed,
    /// A sign-in callback whose `state` is not the one this browser was sent with (missing,
    /// expired, replayed or from another browser).
    StateMismatch,
    /// A `wasm` plugin answered the request itself (its status, headers and body).
    PluginDenied,
    /// A `wasm` plugin failed (trapped, ran out of fuel or memory, misused the ABI).
    PluginFailed,
}

impl Reason {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::MissingCredentials => "missing_credentials",
            Reason::InvalidCredentials => "invalid_credentials",
            Reason::Expired => "expired",
            Reason::BadSignature => "bad_signature",
            Reason::WrongIssuer => "wrong_issuer",
            Reason::WrongAudience => "wrong_audience",
            Reason::ClaimMismatch => "claim_mismatch",
            Reason::IpDenied => "ip_denied",
            Reason::OriginNotAllowed => "origin_not_allowed",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::BodyTooLarge => "body_too_large",
            Reason::RateLimited => "rate_limited",
            Reason::PolicyDenied => "policy_denied",
            Reason::AuthServiceDenied => "auth_service_denied",
            Reason::AuthServiceUnavailable => "auth_service_unavailable",
            Reason::BackendUnavailable => "backend_unavailable",
            Reason::BadRequest => "bad_request",
            Reason::LowercaseMethod => "lowercase_method",
            Reason::UnderscoreInHeader => "underscore_in_header",
            Reason::HeadersTooLarge => "headers_too_large",
            Reason::NotImplemented => "not_implemented",
            Reason::Draining => "draining",
            Reason::UpstreamFailed => "upstream_failed",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::UpstreamOverloaded => "upstream_overloaded",
            Reason::ClientBodyFailed => "client_body_failed",
            Reason::LoginRequired => "login_required",
            Reason::SessionExpired => "session_expired",
            Reason::NotAllowed => "not_allowed",
            Reason::StateMismatch => "state_mismatch",
            Reason::PluginDenied => "plugin_denied",
            Reason::PluginFailed => "plugin_failed",
        }
    }

    /// Whether this is the upstream failing (audit `decision: error`) rather than a
    /// refusal (`deny`).
    pub fn is_upstream_failure(self) -> bool {
        matches!(
            self,
            Reason::UpstreamFailed | Reason::UpstreamTimeout | Reason::UpstreamOverloaded
        )
    }
}

/// The documented error codes, one per status: the `error` field of the JSON body, which clients
/// parse, so it stays the same for every cause of one status; the [`Reason`] tells them apart.
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
        501 => "not_implemented",
        502 => "bad_gateway",
        503 => "unavailable",
        504 => "gateway_timeout",
        505 => "http_version_not_supported",
        _ if status.is_server_error() => "internal_error",
        _ => "error",
    }
}

/// An answer gatehouse makes itself.
#[derive(Debug)]
pub struct Reject {
    pub status: StatusCode,
    pub reason: Reason,
    pub message: Cow<'static, str>,
    /// Headers the answer carries besides the body's (`www-authenticate`, `retry-after`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A body that replaces gatehouse's JSON: an auth service's own answer, passed through
    /// (with its `content-type` among `headers`).
    pub body: Option<Bytes>,
}

impl Reject {
    pub fn new(status: StatusCode, reason: Reason, message: impl Into<Cow<'static, str>>) -> Self {
        Reject {
            status,
            reason,
            message: message.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    /// Adds a header to the answer.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The response: the documented JSON body
    /// `{"error": "<code>", "message": "<text> (<reason>)", "request_id": "<id or null>"}`
    /// (or the passed-through body), the status, and the headers. To a gRPC call (`grpc`), a
    /// trailers-only response instead, which is what its client reads: `200`,
    /// `content-type: application/grpc`, `grpc-status` (see [`grpc::status_for`]) and
    /// `grpc-message` (`<text> (<reason>)`), no body, and the same headers.
    pub fn render(self, request_id: Option<&HeaderValue>, grpc: bool) -> Response<Bytes> {
        let mut resp = match self.body {
            _ if grpc => grpc_error(self.status, &self.message, self.reason),
            Some(body) => {
                let mut resp = Response::new(body);
                *resp.status_mut() = self.status;
                resp
            }
            None => error_body(self.status, &self.message, Some(self.reason), request_id),
        };
        for (name, value) in self.headers {
            // A passed-through body's type does not describe gRPC's empty one.
            if !(grpc && name == CONTENT_TYPE) {
                resp.headers_mut().append(name, value);
            }
        }
        resp
    }
}

/// A request head the HTTP/1 parser refused: `431` for its size, `501` for a transfer
/// coding gatehouse does not forward, `400` for anything else.
impl From<request::Invalid> for Reject {
    fn from(invalid: request::Invalid) -> Reject {
        let reason = match invalid.status {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Reason::HeadersTooLarge,
            StatusCode::NOT_IMPLEMENTED => Reason::NotImplemented,
            _ => Reason::BadRequest,
        };
        Reject::new(invalid.status, reason, invalid.message)
    }
}

/// A gRPC trailers-only response for an answer with HTTP `status`, its message carrying the
/// reason as the JSON body's does.
fn grpc_error(status: StatusCode, message: &str, reason: Reason) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::new());
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    let code = grpc::status_for(status);
    headers.insert(grpc::GRPC_STATUS.clone(), HeaderValue::from(code));
    let message = format!("{message} ({})", reason.code());
    headers.insert(grpc::GRPC_MESSAGE.clone(), grpc::message(&message));
    resp
}

/// The documented JSON error response, the shape of every answer gatehouse makes itself.
pub fn json_error(
    status: StatusCode,
    message: &str,
    request_id: Option<&HeaderValue>,
) -> Response<Bytes> {
    error_body(status, message, None, request_id)
}

/// [`json_error`], with the refusal's reason code after the message, so a client (and
/// whoever reads its logs) learns why without the audit event: `"invalid token (expired)"`.
fn error_body(
    status: StatusCode,
    message: &str,
    reason: Option<Reason>,
    request_id: Option<&HeaderValue>,
) -> Response<Bytes> {
    let mut out = Vec::with_capacity(128 + message.len());
    out.extend_from_slice(b"{\"error\":\"");
    out.extend_from_slice(code_for(status).as_bytes());
    out.extend_from_slice(b"\",\"message\":");
    json::push_str(&mut out, message);
    if let Some(reason) = reason {
        // Codes are plain ASCII words: they go inside the closing quote unescaped.
        out.pop();
        out.extend_from_slice(b" (");
        out.extend_from_slice(reason.code().as_bytes());
        out.extend_from_slice(b")\"");
    }
    out.extend_from_slice(b",\"request_id\":");
    json::push_header(&mut out, request_id);
    out.push(b'}');
    let mut resp = Response::new(Bytes::from(out));
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
        let resp = Reject::new(
            StatusCode::TOO_MANY_REQUESTS,
            Reason::RateLimited,
            "slow down",
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))
        .render(Some(&id), false);
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "1");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "rate_limited", "message": "slow down (rate_limited)", "request_id": "abc\"1"})
        );
        let none =
            Reject::new(StatusCode::BAD_GATEWAY, Reason::UpstreamFailed, "x").render(None, false);
        let v: serde_json::Value = serde_json::from_slice(none.body()).unwrap();
        assert!(v["request_id"].is_null());
        assert_eq!(v["message"], "x (upstream_failed)");
        // Answers that are no refusal (the admin's) carry the message alone.
        let plain = json_error(StatusCode::SERVICE_UNAVAILABLE, "a \"quoted\" text", None);
        let v: serde_json::Value = serde_json::from_slice(plain.body()).unwrap();
        assert_eq!(v["message"], "a \"quoted\" text");
    }

    #[test]
    fn a_passed_through_body_keeps_its_content_type() {
        let mut reject = Reject::new(StatusCode::FORBIDDEN, Reason::AuthServiceDenied, "denied")
            .with_header(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        reject.body = Some(Bytes::from_static(b"nope"));
        let resp = reject.render(None, false);
        assert_eq!(resp.headers().get_all(CONTENT_TYPE).iter().count(), 1);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/plain");
        assert_eq!(resp.body(), "nope");
    }

    #[test]
    fn a_grpc_call_gets_a_trailers_only_status() {
        let mut reject = Reject::new(
            StatusCode::TOO_MANY_REQUESTS,
            Reason::RateLimited,
            "slow down: 100%",
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))
        .with_header(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        reject.body = Some(Bytes::from_static(b"an auth service's page"));
        let resp = reject.render(Some(&HeaderValue::from_static("r1")), true);
        assert_eq!(resp.status(), 200);
        let h = resp.headers();
        assert_eq!(h.get_all(CONTENT_TYPE).iter().count(), 1);
        assert_eq!(h[CONTENT_TYPE], "application/grpc");
        assert_eq!(h["grpc-status"], "8");
        assert_eq!(h["grpc-message"], "slow down: 100%25 (rate_limited)");
        assert_eq!(h["retry-after"], "1");
        assert!(resp.body().is_empty());
    }
}
