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
        Arc::clone(
            self.0
                .get_or_init(|| client_config(rustls_native_certs::load_native_certs())),
        )
    }

    /// Trust in the certificates of one PEM file only, as `SSL_CERT_FILE` alone gives, without
    /// changing the test process's environment.
    #[cfg(test)]
    fn of_file(path: &std::path::Path) -> Trust {
        let found = rustls_native_certs::load_certs_from_paths(Some(path), None);
        Trust(Arc::new(OnceLock::from(client_config(found))))
    }
}

/// The client config over the roots `found` (the system's). Roots that cannot be read are
/// logged once here; connections then fail verification, and say so.
fn client_config(found: rustls_native_certs::CertificateResult) -> Arc<ClientConfig> {
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
    use crate::pool::Endpoint;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A keep-alive HTTP/1.1 server over TLS for `localhost`, from a fresh CA written to
    /// `ca_file`; answers `ok` to every request and counts connections.
    async fn tls_app(ca_file: &std::path::Path) -> (u16, Arc<AtomicUsize>) {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(ca_file, ca.pem()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Relaxed);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut stream = BufReader::new(tls);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.get_mut().write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (port, connections)
    }

    async fn get(endpoint: &Endpoint) -> Result<http::Response<Bytes>, String> {
        let req = http::Request::get("/x").body(Bytes::new()).unwrap();
        endpoint.fetch(0, req, Duration::from_secs(10), 1024).await
    }

    #[tokio::test]
    async fn an_https_endpoint_verifies_its_peer_and_reuses_its_connections() {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        let (port, connections) = tls_app(&ca_file).await;
        let trust = Trust::of_file(&ca_file);
        let endpoint = |host: &str| {
            let url: Uri = format!("https://{host}:{port}/x").parse().unwrap();
            let timeout = Duration::from_secs(10);
            Endpoint::for_url(&url, &trust, timeout, Duration::from_secs(60), 1)
        };
        let localhost = endpoint("localhost");
        for _ in 0..3 {
            assert_eq!(get(&localhost).await.unwrap().body(), "ok");
        }
        assert_eq!(connections.load(Relaxed), 1, "one connection, kept alive");

        // The same server by another name than its certificate's.
        let error = get(&endpoint("127.0.0.1")).await.unwrap_err();
        assert!(
            error.contains("TLS handshake with 127.0.0.1: certificate name mismatch"),
            "{error}"
        );
        // Roots without its CA (another file's).
        let other = tempfile::tempdir().unwrap();
        let (_, _) = tls_app(&other.path().join("ca.pem")).await;
        let untrusting = Trust::of_file(&other.path().join("ca.pem"));
        let url: Uri = format!("https://localhost:{port}/x").parse().unwrap();
        let timeout = Duration::from_secs(10);
        let stranger = Endpoint::for_url(&url, &untrusting, timeout, timeout, 1);
        let error = get(&stranger).await.unwrap_err();
        assert!(
            error.contains("TLS handshake with localhost: certificate not trusted"),
            "{error}"
        );
    }

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
