//! Hop-by-hop headers (RFC 9110 §7.6.1): `Connection`, the headers it names, and the fixed
//! list below describe one connection, not the message. Each side removes what its peer
//! sent as the message is parsed, before anything else reads it: a client's
//! `Connection: x-tenant` can then never delete a header the chain sets later, and an app's
//! `Connection` header never reaches the client.

use http::header::{
    CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::list_items;

pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that are hop-by-hop whatever `Connection` says (the same list as Go's and
/// nginx's proxies).
pub static HOP_BY_HOP: [&HeaderName; 9] = [
    &CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &PROXY_AUTHENTICATE,
    &PROXY_AUTHORIZATION,
    &TE,
    &TRAILER,
    &TRANSFER_ENCODING,
    &UPGRADE,
];

/// What the `Connection` header lines of a message said.
#[derive(Debug, Default)]
pub struct Tokens {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    /// The values naming other headers, which are hop-by-hop too.
    named: Vec<HeaderValue>,
}

impl Tokens {
    /// Reads one `Connection` line.
    pub fn add(&mut self, value: &HeaderValue) {
        let mut names_others = false;
        for token in list_items(value) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else if !token.is_empty() {
                names_others = true;
            }
        }
        if names_others {
            self.named.push(value.clone());
        }
    }

    /// Removes the headers the `Connection` lines named. A name that is not a valid header
    /// name cannot be in the map. `Host` is never this hop's alone: a message names where
    /// it goes, whatever `Connection` says.
    pub fn remove_named(&self, headers: &mut HeaderMap) {
        for value in &self.named {
            for token in list_items(value) {
                match HeaderName::from_bytes(token) {
                    Ok(name) if name != http::header::HOST => {
                        headers.remove(name);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The header fields the HTTP/1 parsers treat specially, told apart in one look at the
/// name (a match on its text compiles to a length check and a compare, cheaper than a
/// dozen `HeaderName` comparisons on every header line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    ContentLength,
    TransferEncoding,
    Host,
    Connection,
    Upgrade,
    Te,
    Expect,
    /// Another header on the fixed hop-by-hop list.
    HopByHop,
    Other,
}

pub fn field(name: &HeaderName) -> Field {
    match name.as_str() {
        "content-length" => Field::ContentLength,
        "transfer-encoding" => Field::TransferEncoding,
        "host" => Field::Host,
        "connection" => Field::Connection,
        "upgrade" => Field::Upgrade,
        "te" => Field::Te,
        "expect" => Field::Expect,
        "keep-alive"
        | "proxy-connection"
        | "proxy-authenticate"
        | "proxy-authorization"
        | "trailer" => Field::HopByHop,
        _ => Field::Other,
    }
}

/// Whether `name` may travel as a request trailer field at all (RFC 9110 §6.5.1): not a
/// hop-by-hop one, nor one that frames or routes the message, authenticates it, carries
/// cookies, modifies the request (controls, conditionals, ranges), describes the content,
/// or that gatehouse itself sets on the head (`x-forwarded-*`, trace context).
pub fn may_be_trailer(name: &HeaderName) -> bool {
    !is_hop_by_hop(name)
        && !matches!(
            name.as_str(),
            "content-length"
                | "content-type"
                | "content-encoding"
                | "content-range"
                | "host"
                | "authorization"
                | "cookie"
                | "set-cookie"
                | "www-authenticate"
                | "cache-control"
                | "expect"
                | "max-forwards"
                | "pragma"
                | "range"
                | "if-match"
                | "if-none-match"
                | "if-modified-since"
                | "if-unmodified-since"
                | "if-range"
                | "forwarded"
                | "x-forwarded-for"
                | "x-forwarded-proto"
                | "x-forwarded-host"
                | "traceparent"
                | "tracestate"
        )
}

/// Whether `name` is on the fixed hop-by-hop list.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// Whether a `te` value may stay end-to-end: `trailers` alone says the recipient accepts
/// trailer fields, which gRPC relies on (and which HTTP/2 allows as the only `te`).
pub fn is_te_trailers(value: &HeaderValue) -> bool {
    value
        .as_bytes()
        .trim_ascii()
        .eq_ignore_ascii_case(b"trailers")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_told_apart_by_name() {
        for name in HOP_BY_HOP {
            let kind = field(name);
            assert!(
                !matches!(
                    kind,
                    Field::Other | Field::ContentLength | Field::Host | Field::Expect
                ),
                "{name}: {kind:?}"
            );
        }
        assert_eq!(field(&http::header::CONTENT_LENGTH), Field::ContentLength);
        assert_eq!(field(&http::header::USER_AGENT), Field::Other);
        assert_eq!(field(&HeaderName::from_static("x-te")), Field::Other);
    }

    #[test]
    fn tokens_and_named_headers() {
        let mut tokens = Tokens::default();
        tokens.add(&HeaderValue::from_static("keep-alive, X-Hop, Upgrade"));
        tokens.add(&HeaderValue::from_static("close"));
        assert!(tokens.close && tokens.keep_alive && tokens.upgrade);
        let mut headers = HeaderMap::new();
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("x-end", HeaderValue::from_static("2"));
        tokens.remove_named(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-end"));
    }

    #[test]
    fn connection_cannot_remove_host() {
        let mut tokens = Tokens::default();
        tokens.add(&HeaderValue::from_static("Host, x-a"));
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("app"));
        headers.insert("x-a", HeaderValue::from_static("1"));
        tokens.remove_named(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["host"], "app");
    }

    #[test]
    fn invalid_names_in_connection_remove_nothing() {
        let mut tokens = Tokens::default();
        tokens.add(&HeaderValue::from_static("bad name, x-a"));
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert("x-b", HeaderValue::from_static("1"));
        tokens.remove_named(&mut headers);
        assert_eq!(headers.len(), 1);
    }
}
