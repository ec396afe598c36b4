//! Who the client is: its address behind trusted proxies, and what the app is told about
//! it (`x-forwarded-*`, written by the HTTP/1 encoder, or set by [`set_headers`] for HTTP/2).

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

use crate::config::value::Cidr;
use crate::protocol::h1::request::{
    Forwarded, TRACEPARENT, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};

/// What the server knows about the client connection a request came on.
pub struct Client {
    /// The peer's address.
    pub ip: IpAddr,
    /// `ip` as an `x-forwarded-for` entry, formatted once per connection.
    pub forwarded_for: HeaderValue,
    /// `x-forwarded-proto`: `http` or `https`.
    pub proto: HeaderValue,
    pub tls: bool,
    /// The worker thread serving the connection.
    pub worker: usize,
}

impl Client {
    pub fn new(ip: IpAddr, tls: bool, worker: usize) -> Client {
        let ip = ip.to_canonical();
        Client {
            ip,
            forwarded_for: HeaderValue::from_str(&ip.to_string())
                .expect("an IP is a valid header value"),
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
            tls,
            worker,
        }
    }
}

/// Sets the `x-forwarded-*` headers (and gatehouse's `traceparent`) of a request sent as a
/// header map (HTTP/2), as the HTTP/1 encoder writes them: the peer appended to
/// `x-forwarded-for`, the others replaced.
pub fn set_headers(headers: &mut HeaderMap, forwarded: &Forwarded) {
    let mut prior = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    let value = if prior.peek().is_none() {
        forwarded.peer.clone()
    } else {
        let mut joined = Vec::new();
        for value in prior {
            joined.extend_from_slice(value.as_bytes());
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(forwarded.peer.as_bytes());
        HeaderValue::from_bytes(&joined).expect("joined header values are a header value")
    };
    headers.insert(X_FORWARDED_FOR.clone(), value);
    headers.insert(X_FORWARDED_PROTO.clone(), forwarded.proto.clone());
    match forwarded.host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };
    if let Some(traceparent) = forwarded.traceparent {
        let value = HeaderValue::from_bytes(traceparent).expect("a traceparent is a header value");
        headers.insert(TRACEPARENT.clone(), value);
    }
}

/// The client's address: the peer, unless the peer is a trusted proxy, in which case the
/// right-most `x-forwarded-for` entry that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    let values: Vec<&HeaderValue> = headers.get_all(&X_FORWARDED_FOR).iter().collect();
    for value in values.iter().rev() {
        for entry in value.to_str().unwrap_or("").rsplit(',') {
            // A malformed entry cannot be believed, nor anything left of it.
            let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                return client;
            };
            client = ip.to_canonical();
            if !is_trusted(client) {
                return client;
            }
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn client_ip_behind_trusted_proxies() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.7")]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_ip("8.8.8.8".parse().unwrap(), &h, &trusted),
            "8.8.8.8".parse::<IpAddr>().unwrap()
        );
        // Garbage stops the walk at the last trusted hop.
        let h = headers(&[("x-forwarded-for", "junk, 10.0.0.7")]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "10.0.0.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), peer);
    }

    #[test]
    fn forwarded_headers_for_http2_match_the_http1_encoder() {
        let (peer, proto) = (
            HeaderValue::from_static("10.0.0.9"),
            HeaderValue::from_static("https"),
        );
        let host = HeaderValue::from_static("api.example");
        let forwarded = Forwarded {
            peer: &peer,
            proto: &proto,
            host: Some(&host),
            traceparent: None,
        };
        let mut h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "spoofed"),
        ]);
        set_headers(&mut h, &forwarded);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 5.6.7.8, 10.0.0.9");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "api.example");
        // No Host: no x-forwarded-host, not even the client's.
        let mut h = headers(&[("x-forwarded-host", "spoofed")]);
        set_headers(
            &mut h,
            &Forwarded {
                host: None,
                ..forwarded
            },
        );
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
        // Without tracing the client's traceparent passes; with it, gatehouse's replaces it.
        let client = "00-11111111111111111111111111111111-2222222222222222-01";
        let ours = "00-11111111111111111111111111111111-3333333333333333-01";
        let mut h = headers(&[("traceparent", client)]);
        set_headers(&mut h, &forwarded);
        assert_eq!(h["traceparent"], client);
        let traced = Forwarded {
            traceparent: Some(ours.as_bytes()),
            ..forwarded
        };
        set_headers(&mut h, &traced);
        assert_eq!(h.get_all("traceparent").iter().count(), 1);
        assert_eq!(h["traceparent"], ours);
    }
}
