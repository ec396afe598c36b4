//! TLS termination (`[server.tls]`) with rustls and its `ring` provider: TLS 1.2 and 1.3,
//! ALPN `h2` and `http/1.1`, and certificate rotation without dropping a connection.
//!
//! The certificate lives behind an `ArcSwap` that the handshake reads through a
//! [`ResolvesServerCert`]; rotation swaps it, so open connections keep the session they
//! negotiated and new handshakes get the new certificate. Rotation compares the files'
//! content, not their mtime: cert-manager replaces a Secret's files by renaming a symlinked
//! directory, which leaves the visible link's own mtime untouched.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::server::conn::http2;
use hyper_util::rt::TokioExecutor;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::conn::{self, Protocol};
use super::Shared;
use crate::config::TlsConfig;

/// What a worker needs to serve TLS connections.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
}

/// Keeps the served certificate in step with the files; owned by the control loop.
pub struct Rotation {
    current: Arc<Current>,
    provider: Arc<CryptoProvider>,
    /// The files' content last looked at (loaded or refused), to notice changes;
    /// `None` after a failed read.
    seen: Option<Pem>,
}

/// The certificate new handshakes get.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Loads the certificate and builds the TLS server. An error names the file and the problem.
pub fn setup(config: &TlsConfig) -> Result<(Tls, Rotation), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pem = read(config)?;
    let key = parse(config, &pem, &provider)?;
    let current = Arc::new(Current(ArcSwap::from_pointee(key)));
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(current.clone());
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tls = Tls {
        acceptor: TlsAcceptor::from(Arc::new(server)),
    };
    Ok((
        tls,
        Rotation {
            current,
            provider,
            seen: Some(pem),
        },
    ))
}

/// The PEM files' content: the chain and the key.
type Pem = (Vec<u8>, Vec<u8>);

fn read(config: &TlsConfig) -> Result<Pem, String> {
    let read = |path: &std::path::Path, key: &str| {
        std::fs::read(path)
            .map_err(|e| format!("cannot read {} (server.tls.{key}): {e}", path.display()))
    };
    Ok((read(&config.cert, "cert")?, read(&config.key, "key")?))
}

/// Parses and checks the chain and key; an error names the file and the problem.
fn parse(
    config: &TlsConfig,
    (cert, key): &Pem,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{} (server.tls.cert): invalid PEM: {e}",
                config.cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "{} (server.tls.cert): no CERTIFICATE block found",
            config.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        format!(
            "{} (server.tls.key): no usable private key (PKCS#8, RSA or EC PEM expected): {e}",
            config.key.display()
        )
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        format!(
            "{} and {} (server.tls): the key does not fit the certificate: {e}",
            config.cert.display(),
            config.key.display()
        )
    })
}

impl Rotation {
    /// Re-reads the files; a changed (or, with `force`, any) valid pair replaces the served
    /// certificate, an invalid one is logged and the current certificate stays. Each change
    /// is reported once, not at every poll.
    pub fn refresh(&mut self, config: &TlsConfig, force: bool) {
        let pem = match read(config) {
            Ok(pem) => pem,
            Err(e) => {
                // Reported once until the files are readable again.
                if force || self.seen.take().is_some() {
                    tracing::error!(error = %e, "TLS certificate reload failed; the previous certificate stays");
                }
                return;
            }
        };
        if !force && self.seen.as_ref() == Some(&pem) {
            return;
        }
        match parse(config, &pem, &self.provider) {
            Ok(key) => {
                self.current.0.store(Arc::new(key));
                tracing::info!(cert = %config.cert.display(), "TLS certificate loaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate reload failed; the previous certificate stays")
            }
        }
        self.seen = Some(pem);
    }
}

/// Completes the handshake (within `header_read_timeout`, so a silent client is closed),
/// then serves the protocol ALPN chose: HTTP/2 for `h2`, HTTP/1.1 otherwise. Each refuses
/// the other's first bytes: there is no h2c detection under TLS.
pub async fn serve(
    tls: Tls,
    stream: TcpStream,
    peer: SocketAddr,
    worker: usize,
    shared: Arc<Shared>,
    h2: Arc<http2::Builder<TokioExecutor>>,
) {
    let handshake = tls.acceptor.accept(stream);
    let stream = match tokio::time::timeout(shared.conn_settings.header_read_timeout, handshake)
        .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return tracing::debug!(error = %e, client = %peer, "TLS handshake failed"),
        Err(_) => return tracing::debug!(client = %peer, "TLS handshake timed out"),
    };
    let protocol = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        _ => Protocol::Http1 { h2c: false },
    };
    conn::serve(stream, peer, true, worker, shared, h2, protocol).await
}
