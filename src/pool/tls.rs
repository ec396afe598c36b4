//! TLS to side services (a JWKS URL, forward_auth's auth service, an OpenID Provider), never
//! to the app: rustls, certificates always verified against the system's roots (or those of
//! `SSL_CERT_FILE` / `SSL_CERT_DIR`), SNI from the URL's host, ALPN `http/1.1`.

use std::io;
use std::sync::{Arc, OnceLock};

use http::Uri;
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// The roots outbound TLS trusts, read on first use and then shared by every endpoint made
/// with this handle (its owner, the server, keeps it for the process): reading them means
/// parsing a few hundred certificates, which a connection must not pay for, nor a config
/// without an https URL.
#[derive(Clone, Default)]
pub struct Trust(Arc<OnceLock<Arc<ClientConfig>>>);

impl Trust {
    fn config(&self) -> Arc<ClientConfig> {
        Arc::clone(self.0.get_or_init(client_config))
    }
}

/// The client config over the system's roots. Roots that cannot be read are logged once
/// here; connections then fail verification, and say so.
fn client_config() -> Arc<ClientConfig> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "cannot read trusted root certificates (SSL_CERT_FILE, SSL_CERT_DIR or the system's store)");
    }
    let mut roots = RootCertStore::empty();
    let (added, unparsable) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!("no trusted root certificates: every https connection will fail; install the system's CA certificates or set SSL_CERT_FILE to a PEM bundle");
    } else {
        tracing::debug!(
            roots = added,
            unparsable,
            "loaded trusted root certificates"
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // The pool speaks HTTP/1.1 to side services.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// How an endpoint's connections start TLS: the shared config and the name to verify.
pub(super) struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl Tls {
    pub(super) fn new(host: &str, trust: &Trust) -> Tls {
        Tls {
            connector: TlsConnector::from(trust.config()),
            name: server_name(host).expect("validated: an https host is a server name"),
        }
    }

    pub(super) fn connector(&self) -> &TlsConnector {
        &self.connector
    }

    pub(super) fn name(&self) -> &ServerName<'static> {
        &self.name
    }
}

fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.trim_matches(['[', ']']).to_owned()).ok()
}

/// A side service's URL as the pool can reach it: `http://` or `https://`, with a host (for
/// https, one a certificate can name). `None` for anything else; the caller says what it
/// expected.
pub fn outbound_url(s: &str) -> Option<Uri> {
    let uri: Uri = s.parse().ok()?;
    let host = uri.host()?;
    match uri.scheme_str()? {
        "http" => Some(uri),
        "https" if server_name(host).is_some() => Some(uri),
        _ => None,
    }
}

/// What a failed handshake means, in words an operator can act on.
pub(super) fn describe(e: &io::Error, name: &ServerName<'_>) -> String {
    let name = name.to_str();
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return format!("TLS handshake with {name}: {e}");
    };
    let what = match tls {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "certificate not trusted (its issuer is not among the trusted roots: \
              the system's, or SSL_CERT_FILE / SSL_CERT_DIR)"
            .to_owned(),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!("certificate name mismatch ({tls})"),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("certificate expired ({tls})"),
        other => other.to_string(),
    };
    format!("TLS handshake with {name}: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_urls_are_http_or_https_with_a_host() {
        for ok in [
            "http://idp:8080/jwks",
            "https://login.microsoftonline.com/tenant/v2.0",
            "https://[::1]:8443/x",
            "https://10.0.0.1/x",
        ] {
            assert!(outbound_url(ok).is_some(), "{ok}");
        }
        for bad in ["ftp://idp/jwks", "/jwks", "https:///x", "idp:80", "unix:/s"] {
            assert!(outbound_url(bad).is_none(), "{bad}");
        }
    }
}
