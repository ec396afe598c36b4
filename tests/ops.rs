//! Operating gatehouse: the admin listener (probes, metrics), TLS termination and
//! certificate rotation, reloads and drains with requests in flight.
mod common;

use common::*;
use std::time::Duration;

/// `[admin]` on `{admin}`, probing the upstream when `upstream_check` is given.
fn admin_section(upstream_check: Option<&str>) -> String {
    let check = upstream_check.map_or(String::new(), |d| format!("upstream_check = \"{d}\"\n"));
    format!("[admin]\nlisten = \"127.0.0.1:{{admin}}\"\n{check}\n")
}

/// An upstream and a gatehouse with an admin listener; returns the admin port too.
async fn with_admin(server: &str, rest: &str) -> (Upstream, Gatehouse, u16) {
    let up = Upstream::start().await;
    let admin = free_port();
    let template = config(server, "", &format!("{}{rest}", admin_section(None)));
    let gh = Gatehouse::start(
        &template,
        &[("upstream", &up.url()), ("admin", &admin.to_string())],
    )
    .await;
    (up, gh, admin)
}

/// The value of the sample line that starts with `series` (e.g.
/// `gatehouse_requests_total{status="200"}`), 0 if the line is absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().expect("a numeric sample"))
}

async fn scrape(admin: u16) -> String {
    let resp = get(admin, "/metrics").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.text()
}

/// Polls `/metrics` until `series` reaches `value` (a request is counted when its response
/// ends, which may be just after the client has read it); returns that scrape.
async fn wait_sample(admin: u16, series: &str, value: f64) -> String {
    within(Duration::from_secs(10), series, async {
        loop {
            let text = scrape(admin).await;
            if sample(&text, series) >= value {
                assert_eq!(sample(&text, series), value, "{series}:\n{text}");
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Polls `/readyz` until it answers `status` (10 s at most).
async fn wait_readyz(admin: u16, status: u16) {
    within(Duration::from_secs(10), "/readyz to change", async {
        while get(admin, "/readyz").await.status != status {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn jwt_cache_lookups_are_counted_per_middleware() {
    let (_up, gh, admin) = with_admin(
        "",
        r#"
[[middleware]]
type = "jwt"
name = "users"
algorithms = ["HS256"]
secret = "metrics-secret"
"#,
    )
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": "alice", "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(b"metrics-secret"),
    )
    .unwrap();
    let text = scrape(admin).await;
    let hits = r#"gatehouse_jwt_cache_lookups_total{middleware="users",result="hit"}"#;
    let misses = r#"gatehouse_jwt_cache_lookups_total{middleware="users",result="miss"}"#;
    assert!(
        text.contains(&format!("{hits} 0")),
        "zero-valued from the start:\n{text}"
    );
    for _ in 0..3 {
        let req = request("GET", "/")
            .header("authorization", format!("Bearer {token}"))
            .body(empty())
            .unwrap();
        assert_eq!(send(gh.port, req).await.status, 200);
    }
    // The first sight of the token verifies it; the repeats are found in the cache.
    let text = wait_sample(admin, hits, 2.0).await;
    assert_eq!(sample(&text, misses), 1.0, "{text}");
}

#[tokio::test]
async fn admin_endpoints_answer_on_their_own_port() {
    let (up, gh, admin) = with_admin("", "").await;
    wait_log(&gh, "gatehouse started", 1).await;
    let started = gh.stderr();
    assert!(
        started.contains(&format!("\"admin\":\"127.0.0.1:{admin}\"")),
        "the start-up line names the admin address: {started}"
    );
    let resp = get(admin, "/healthz").await;
    assert_eq!((resp.status.as_u16(), resp.text().as_str()), (200, "ok\n"));
    let resp = get(admin, "/readyz").await;
    assert_eq!(resp.status, 200, "{resp:?}");

    let resp = get(admin, "/metrics").await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = resp.text();
    for family in [
        "gatehouse_requests",
        "gatehouse_request_duration_seconds",
        "gatehouse_upstream_duration_seconds",
        "gatehouse_rejections",
        "gatehouse_upstream_errors",
        "gatehouse_audit_events",
        "gatehouse_audit_dropped",
        "gatehouse_audit_queue_depth",
        "gatehouse_config_reloads",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing from the first scrape:\n{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"), "{text}");

    let resp = get(admin, "/nope").await;
    resp.assert_gatehouse_error(404, "not_found");
    let resp = send(admin, request("POST", "/healthz").body(full("x")).unwrap()).await;
    resp.assert_gatehouse_error(405, "method_not_allowed");
    assert_eq!(resp.header("allow").as_deref(), Some("GET, HEAD"));
    let resp = send(admin, request("HEAD", "/readyz").body(empty()).unwrap()).await;
    assert_eq!(resp.status, 200);
    assert!(resp.body.is_empty());

    // The admin paths are not served on the public port: they go to the app.
    assert_eq!(get(gh.port, "/healthz").await.json()["uri"], "/healthz");
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn metrics_count_responses_rejections_upstream_errors_and_reloads() {
    let deny = "[[middleware]]\ntype = \"ip_filter\"\ndeny = [\"0.0.0.0/0\", \"::/0\"]\npaths = [\"/denied/**\"]\n";
    let (_up, gh, admin) = with_admin("", deny).await;
    let before = scrape(admin).await;
    let ok = "gatehouse_requests_total{status=\"200\"}";
    let denied = "gatehouse_rejections_total{middleware=\"ip_filter\",status=\"403\"}";
    let refused = "gatehouse_upstream_errors_total{kind=\"connect\"}";
    let reloaded = "gatehouse_config_reloads_total{result=\"success\"}";
    let failed = "gatehouse_config_reloads_total{result=\"failure\"}";
    for series in [ok, denied, refused, reloaded, failed] {
        assert_eq!(sample(&before, series), 0.0, "{series}:\n{before}");
    }
    assert!(before.contains(failed), "{before}");

    assert_eq!(get(gh.port, "/echo").await.status, 200);
    assert_eq!(get(gh.port, "/echo").await.status, 200);
    get(gh.port, "/denied/x")
        .await
        .assert_gatehouse_error(403, "forbidden");
    let after = wait_sample(admin, ok, 2.0).await;
    assert_eq!(sample(&after, denied), 1.0, "{after}");
    assert_eq!(
        sample(&after, "gatehouse_request_duration_seconds_count"),
        3.0
    );

    // A reload to a dead upstream: one successful reload, then a 502 counted by kind.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let file = std::fs::read_to_string(&gh.config_path).unwrap();
    let live = file
        .lines()
        .find(|l| l.starts_with("url = "))
        .unwrap()
        .to_owned();
    std::fs::write(
        &gh.config_path,
        file.replace(&live, &format!("url = \"{dead}\"")),
    )
    .unwrap();
    gh.send_signal("HUP");
    wait_sample(admin, reloaded, 1.0).await;
    get(gh.port, "/echo")
        .await
        .assert_gatehouse_error(502, "bad_gateway");
    wait_sample(admin, refused, 1.0).await;

    // An invalid file counts as a failure.
    std::fs::write(&gh.config_path, "[server]\nbogus = 1\n").unwrap();
    gh.send_signal("HUP");
    let text = wait_sample(admin, failed, 1.0).await;
    assert_eq!(sample(&text, reloaded), 1.0);
}

#[tokio::test]
async fn readyz_turns_503_at_once_on_sigterm_while_shutdown_delay_keeps_serving() {
    let (up, mut gh, admin) = with_admin("shutdown_delay = \"10s\"", "").await;
    assert_eq!(get(admin, "/readyz").await.status, 200);
    gh.send_signal("TERM");
    wait_readyz(admin, 503).await;
    get(admin, "/readyz")
        .await
        .assert_gatehouse_error(503, "unavailable");
    assert_eq!(get(admin, "/healthz").await.status, 200);
    // Still inside shutdown_delay: new connections are accepted and proxied.
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(up.request_count(), 1);
    gh.assert_exits_with(0).await;
}

#[tokio::test]
async fn readyz_follows_the_upstream_when_upstream_check_is_set() {
    let port = free_port();
    let admin = free_port();
    let template = config("", "", &admin_section(Some("100ms")));
    let _gh = Gatehouse::start(
        &template,
        &[
            ("upstream", &format!("http://127.0.0.1:{port}")),
            ("admin", &admin.to_string()),
        ],
    )
    .await;
    wait_readyz(admin, 503).await;
    let resp = get(admin, "/readyz").await;
    let json = resp.assert_gatehouse_error(503, "unavailable");
    assert_eq!(json["message"], "the upstream is unreachable");

    let app = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let accepting = tokio::spawn(async move {
        while let Ok((stream, _)) = app.accept().await {
            drop(stream);
        }
    });
    wait_readyz(admin, 200).await;
    accepting.abort();
    // Listener gone: unreachable again.
    wait_readyz(admin, 503).await;
}

#[tokio::test]
async fn admin_port_taken_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap().port().to_string();
    let mut gh = Gatehouse::spawn(
        &config("", "", &admin_section(None)),
        &[("upstream", "http://127.0.0.1:9"), ("admin", &admin)],
        &[],
    );
    gh.assert_exits_with(1).await;
    assert!(gh.stderr().contains("(admin)"), "{}", gh.output());
    drop(taken);
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A test CA that issues `localhost` certificates; clients trust only the CA.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A leaf certificate as PEM files would hold it, and its DER to recognise it.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    /// The DER inside `key_pem` (PKCS#8 for generated keys).
    key_der: Vec<u8>,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn issue(&self) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &self.cert, &self.key)
            .unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
            der: cert.der().clone(),
        }
    }
}

impl Leaf {
    /// A generated (PKCS#8) EC key as SEC1 (`BEGIN EC PRIVATE KEY`), the form openssl and older tools
    /// write: the ECPrivateKey that PKCS#8 wraps in its OCTET STRING.
    fn sec1_key_pem(&self) -> String {
        let (_, info, _) = der_element(&self.key_der);
        let (_, _, rest) = der_element(info); // version
        let (_, _, rest) = der_element(rest); // algorithm
        let (tag, sec1, _) = der_element(rest);
        assert_eq!(tag, 0x04, "PKCS#8 privateKey is an OCTET STRING");
        pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1))
    }
}

/// The public half of an RSA key, for rcgen to put into a certificate.
struct RsaPublicKey(Vec<u8>);

impl rcgen::PublicKeyData for RsaPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

impl Ca {
    /// A leaf for the RSA key in `tests/fixtures/rsa-pkcs1.key` (PKCS#1, `BEGIN RSA PRIVATE
    /// KEY`, made by `openssl genrsa -traditional 2048`; ring cannot generate RSA keys).
    fn issue_rsa(&self) -> Leaf {
        let key_pem = include_str!("fixtures/rsa-pkcs1.key");
        let pkcs1 = pem::parse(key_pem).unwrap().into_contents();
        // RSAPrivateKey is SEQUENCE { version, n, e, ... }; RSAPublicKey is SEQUENCE { n, e }.
        let (_, fields, _) = der_element(&pkcs1);
        let (_, _, n_e) = der_element(fields);
        let (_, _, after_n) = der_element(n_e);
        let (_, _, after_e) = der_element(after_n);
        let n_e = &n_e[..n_e.len() - after_e.len()];
        let mut public = vec![0x30, 0x82];
        public.extend_from_slice(&u16::try_from(n_e.len()).unwrap().to_be_bytes());
        public.extend_from_slice(n_e);
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&RsaPublicKey(public), &self.cert, &self.key)
            .unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key_pem.to_owned(),
            key_der: pkcs1,
            der: cert.der().clone(),
        }
    }
}

/// Splits one DER element off `der`: (tag, content, rest).
fn der_element(der: &[u8]) -> (u8, &[u8], &[u8]) {
    let (len, header) = match der[1] {
        n if n < 0x80 => (usize::from(n), 2),
        0x81 => (usize::from(der[2]), 3),
        0x82 => (usize::from(u16::from_be_bytes([der[2], der[3]])), 4),
        _ => panic!("DER length too long for a test key"),
    };
    (der[0], &der[header..header + len], &der[header + len..])
}

/// Where gatehouse reads its certificate, laid out as the kubelet lays out a mounted
/// Secret (which cert-manager updates): `tls.crt -> ..data/tls.crt`, `..data -> ..N`.
/// An update writes a new `..N` and renames a new `..data` link over the old one, so both
/// files change at once and the visible links themselves never change.
struct CertFiles {
    dir: tempfile::TempDir,
    generation: std::cell::Cell<usize>,
}

impl CertFiles {
    fn new(leaf: &Leaf) -> CertFiles {
        let files = CertFiles {
            dir: tempfile::tempdir().unwrap(),
            generation: Default::default(),
        };
        files.write(&leaf.cert_pem, &leaf.key_pem);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), files.dir.path().join(name))
                .unwrap();
        }
        files
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    fn write(&self, cert: &str, key: &str) {
        let generation = format!("..{}", self.generation.get() + 1);
        self.generation.set(self.generation.get() + 1);
        let data = self.dir.path().join(&generation);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("tls.crt"), cert).unwrap();
        std::fs::write(data.join("tls.key"), key).unwrap();
        let link = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&generation, &link).unwrap();
        std::fs::rename(&link, self.dir.path().join("..data")).unwrap();
    }

    fn vars(&self) -> [(&'static str, String); 2] {
        [
            ("cert", self.cert().display().to_string()),
            ("key", self.key().display().to_string()),
        ]
    }
}

const TLS_SECTION: &str = "[server.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n";

/// A gatehouse terminating TLS with `files`, in front of a test upstream.
async fn with_tls(files: &CertFiles, server: &str) -> (Upstream, Gatehouse) {
    let up = Upstream::start().await;
    let [(c, cert), (k, key)] = files.vars();
    let gh = Gatehouse::start(
        &config(server, "", TLS_SECTION),
        &[("upstream", &up.url()), (c, &cert), (k, &key)],
    )
    .await;
    (up, gh)
}

/// A TLS client connection trusting `ca`, offering `alpn`, limited to `versions`.
async fn tls_connect(
    port: u16,
    ca: &Ca,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    within(
        STEP,
        "TLS handshake",
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("TLS handshake with gatehouse")
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The certificate gatehouse presented on `stream`.
fn served(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// An HTTP client on a TLS connection, speaking what ALPN chose.
enum TlsClient {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl TlsClient {
    async fn new(stream: TlsStream<TcpStream>) -> TlsClient {
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = hyper_util::rt::TokioIo::new(stream);
        if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            TlsClient::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            TlsClient::H1(sender)
        }
    }

    async fn get(&mut self, path: &str) -> Resp {
        let resp = match self {
            TlsClient::H1(sender) => {
                let req = request("GET", path)
                    .header("host", "localhost")
                    .body(empty())
                    .unwrap();
                within(STEP, "sender ready", sender.ready()).await.unwrap();
                within(STEP, "h1 response", sender.send_request(req)).await
            }
            TlsClient::H2(sender) => {
                let req = request("GET", &format!("https://localhost{path}"))
                    .body(empty())
                    .unwrap();
                within(STEP, "h2 response", sender.send_request(req)).await
            }
        };
        collect(resp.expect("a response over TLS")).await
    }
}

/// One GET on a new TLS connection; also returns the certificate it was served with.
async fn tls_get(port: u16, ca: &Ca, path: &str) -> (Resp, CertificateDer<'static>) {
    let stream = tls_connect(port, ca, &[b"h2", b"http/1.1"], BOTH).await;
    let cert = served(&stream);
    (TlsClient::new(stream).await.get(path).await, cert)
}

#[tokio::test]
async fn tls_serves_h2_and_http1_by_alpn_with_forwarded_proto_https() {
    let ca = Ca::new();
    let leaf = ca.issue();
    let files = CertFiles::new(&leaf);
    let (up, gh) = with_tls(&files, "").await;

    for (alpn, versions, version) in [
        (&[&b"h2"[..], b"http/1.1"][..], BOTH, http::Version::HTTP_2),
        (&[&b"http/1.1"[..]][..], BOTH, http::Version::HTTP_11),
        (&[][..], BOTH, http::Version::HTTP_11),
        (
            &[&b"h2"[..]][..],
            &[&rustls::version::TLS12][..],
            http::Version::HTTP_2,
        ),
    ] {
        let stream = tls_connect(gh.port, &ca, alpn, versions).await;
        assert_eq!(served(&stream), leaf.der);
        let mut client = TlsClient::new(stream).await;
        let resp = client.get("/echo").await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.version, version, "ALPN {alpn:?}");
        let seen = resp.upstream_headers();
        assert_eq!(seen["x-forwarded-proto"], ["https"], "{seen:?}");
        // The connection stays usable (keep-alive, or further h2 streams).
        assert_eq!(client.get("/echo").await.status, 200);
    }
    assert_eq!(up.request_count(), 8);

    // Plain HTTP on the TLS port gets no HTTP answer.
    let (reply, closed) = raw_exchange(
        gh.port,
        b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(closed && !reply.starts_with(b"HTTP/"), "{reply:?}");
    assert_eq!(up.request_count(), 8);
}

/// Writes `bytes` on a TLS connection offering `alpn` and reads until it closes.
async fn tls_exchange(port: u16, ca: &Ca, alpn: &[&[u8]], bytes: &[u8]) -> Vec<u8> {
    let mut stream = tls_connect(port, ca, alpn, BOTH).await;
    stream.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    let _ = within(STEP, "the server to close", stream.read_to_end(&mut reply)).await;
    reply
}

#[tokio::test]
async fn alpn_decides_the_protocol_and_each_refuses_the_other() {
    let ca = Ca::new();
    let files = CertFiles::new(&ca.issue());
    let (up, gh) = with_tls(&files, "").await;
    // ALPN chose h2: an HTTP/1.1 request, or any other preface, is a bad preface.
    for bytes in [
        &b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"INVALID CONNECTION PREFACE\r\n\r\n",
    ] {
        let reply = tls_exchange(gh.port, &ca, &[b"h2"], bytes).await;
        // An empty SETTINGS frame, then GOAWAY (type 7) with PROTOCOL_ERROR (1).
        assert_eq!(reply.len(), 9 + 17, "{reply:?}");
        assert_eq!(
            (reply[12], &reply[22..26]),
            (0x7, &[0, 0, 0, 1][..]),
            "{reply:?}"
        );
    }
    // ALPN chose HTTP/1.1 (or nothing): the HTTP/2 preface is refused as HTTP/1.
    for alpn in [&[&b"http/1.1"[..]][..], &[][..]] {
        let reply = tls_exchange(gh.port, &ca, alpn, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 505"), "{text}");
    }
    assert_eq!(up.request_count(), 0);
}

#[tokio::test]
async fn sec1_ec_and_pkcs1_rsa_keys_are_accepted() {
    let ca = Ca::new();
    let ec = ca.issue();
    let sec1 = ec.sec1_key_pem();
    assert!(sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"), "{sec1}");
    let rsa = ca.issue_rsa();
    assert!(rsa.key_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    for (leaf, key_pem) in [(&ec, &sec1), (&rsa, &rsa.key_pem)] {
        let files = CertFiles::new(leaf);
        files.write(&leaf.cert_pem, key_pem);
        let (_up, gh) = with_tls(&files, "").await;
        let (resp, cert) = tls_get(gh.port, &ca, "/echo").await;
        assert_eq!((resp.status.as_u16(), cert), (200, leaf.der.clone()));
    }
}

#[tokio::test]
async fn tls_client_that_sends_nothing_is_closed() {
    let files = CertFiles::new(&Ca::new().issue());
    let (_up, gh) = with_tls(&files, "header_read_timeout = \"1s\"").await;
    let mut stream = TcpStream::connect(("127.0.0.1", gh.port)).await.unwrap();
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(closed, "a TLS handshake that never starts must be cut off");
}

/// Polls until `gh`'s stderr has `n` lines containing `text` (10 s at most).
async fn wait_log(gh: &Gatehouse, text: &str, n: usize) {
    within(Duration::from_secs(10), text, async {
        while gh.stderr().matches(text).count() < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn certificate_rotates_on_file_change_and_sighup_keeping_open_connections() {
    let ca = Ca::new();
    let (first, second, third) = (ca.issue(), ca.issue(), ca.issue());
    let files = CertFiles::new(&first);
    let (_up, gh) = with_tls(&files, "").await;

    let old = tls_connect(gh.port, &ca, &[b"http/1.1"], BOTH).await;
    assert_eq!(served(&old), first.der);
    let mut old = TlsClient::new(old).await;
    assert_eq!(old.get("/echo").await.status, 200);

    // The files change: new connections get the new certificate...
    files.write(&second.cert_pem, &second.key_pem);
    within(Duration::from_secs(10), "the new certificate", async {
        while tls_get(gh.port, &ca, "/echo").await.1 != second.der {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // ...and the connection opened before keeps working.
    assert_eq!(old.get("/echo").await.status, 200);

    // A bad new certificate (a key that does not fit it) is logged; the last good one stays.
    let failed = gh.stderr().matches("TLS certificate reload failed").count();
    files.write(&third.cert_pem, &second.key_pem);
    wait_log(&gh, "TLS certificate reload failed", failed + 1).await;
    assert!(
        gh.stderr().contains("does not fit the certificate"),
        "{}",
        gh.output()
    );
    let (resp, cert) = tls_get(gh.port, &ca, "/echo").await;
    assert_eq!((resp.status.as_u16(), cert), (200, second.der.clone()));
    assert_eq!(old.get("/echo").await.status, 200);

    // Fixed, and SIGHUP re-reads the files at once (besides the poll).
    files.write(&third.cert_pem, &third.key_pem);
    gh.send_signal("HUP");
    within(Duration::from_secs(10), "the third certificate", async {
        while tls_get(gh.port, &ca, "/echo").await.1 != third.der {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let loaded = gh.stderr().matches("TLS certificate loaded").count();
    gh.send_signal("HUP");
    wait_log(&gh, "TLS certificate loaded", loaded + 1).await;
    assert_eq!(old.get("/echo").await.status, 200);
}

/// `gatehouse run` with `[server.tls]` at `cert` and `key` exits 1 naming `expected`.
async fn assert_tls_start_fails(cert: &Path, key: &Path, expected: &str) {
    let mut gh = Gatehouse::spawn(
        &config("", "", TLS_SECTION),
        &[
            ("upstream", "http://127.0.0.1:9"),
            ("cert", &cert.display().to_string()),
            ("key", &key.display().to_string()),
        ],
        &[],
    );
    gh.assert_exits_with(1).await;
    let err = gh.stderr();
    assert!(
        err.contains("cannot load the TLS certificate") && err.contains(expected),
        "expected {expected:?}:\n{}",
        gh.output()
    );
}

#[tokio::test]
async fn unreadable_or_invalid_certificate_at_start_exits_1() {
    let ca = Ca::new();
    let (a, b) = (ca.issue(), ca.issue());
    let files = CertFiles::new(&a);
    let missing = files.dir.path().join("missing.crt");
    assert_tls_start_fails(&missing, &files.key(), "missing.crt (server.tls.cert)").await;

    let garbage = files.dir.path().join("garbage.crt");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    assert_tls_start_fails(&garbage, &files.key(), "no CERTIFICATE block").await;
    assert_tls_start_fails(&files.cert(), &garbage, "no usable private key").await;

    files.write(&a.cert_pem, &b.key_pem);
    assert_tls_start_fails(&files.cert(), &files.key(), "does not fit the certificate").await;
}

// ---------------------------------------------------------------------------------------------
// Reload and drain with requests in flight
// ---------------------------------------------------------------------------------------------

/// A `headers` middleware stamping responses with `x-generation: {generation}`.
fn generation(generation: &str) -> String {
    format!("[[middleware]]\ntype = \"headers\"\nresponse = {{ set = {{ \"x-generation\" = \"{generation}\" }} }}\n")
}

async fn generation_of(port: u16) -> Option<String> {
    get(port, "/echo").await.header("x-generation")
}

#[tokio::test]
async fn reload_with_a_request_in_flight_finishes_it_on_the_old_chain() {
    let (up, gh, admin) = with_admin("", &generation("1")).await;
    let port = gh.port;
    let slow = tokio::spawn(async move { get(port, "/slow?ms=6000").await });
    up.wait_for_requests(1).await;

    // A failed reload while it is in flight changes nothing.
    let valid = std::fs::read_to_string(&gh.config_path).unwrap();
    std::fs::write(&gh.config_path, format!("{valid}\nbogus = 1\n")).unwrap();
    gh.send_signal("HUP");
    wait_sample(
        admin,
        "gatehouse_config_reloads_total{result=\"failure\"}",
        1.0,
    )
    .await;
    assert_eq!(generation_of(port).await.as_deref(), Some("1"));

    // A successful one: new requests get the new chain...
    std::fs::write(&gh.config_path, valid.replace("\"1\"", "\"2\"")).unwrap();
    gh.send_signal("HUP");
    wait_sample(
        admin,
        "gatehouse_config_reloads_total{result=\"success\"}",
        1.0,
    )
    .await;
    assert_eq!(generation_of(port).await.as_deref(), Some("2"));
    assert!(
        !slow.is_finished(),
        "the slow request must still be in flight across both reloads"
    );
    // ...and the one in flight finishes on the chain it started with.
    let resp = within(Duration::from_secs(30), "the slow response", slow)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), "slow done");
    assert_eq!(resp.header("x-generation").as_deref(), Some("1"));
}

#[tokio::test]
async fn sigterm_lets_a_slow_request_and_a_stream_finish_and_closes_idle_connections() {
    let (up, mut gh, admin) = with_admin("shutdown_grace = \"30s\"", "").await;
    let port = gh.port;
    let slow = tokio::spawn(async move { get(port, "/slow?ms=6000").await });
    let stream =
        tokio::spawn(
            async move { h2_send(port, "GET", "/stream?chunks=10&ms=600", empty()).await },
        );
    // Idle connections: HTTP/1.1 keep-alive and HTTP/2, each after one request.
    let mut idle_h1 = H1::connect(port).await;
    assert_eq!(
        idle_h1
            .send(request("GET", "/echo").body(empty()).unwrap())
            .await
            .status,
        200
    );
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut idle_h2, h2_conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let h2_conn = tokio::spawn(h2_conn);
    let req = request("GET", &format!("http://127.0.0.1:{port}/echo"))
        .body(empty())
        .unwrap();
    assert_eq!(idle_h2.send_request(req).await.unwrap().status(), 200);
    up.wait_for_requests(4).await;

    gh.send_signal("TERM");
    wait_readyz(admin, 503).await;
    // Idle connections are closed (HTTP/2 by GOAWAY) while the others are still busy.
    assert!(
        idle_h1.closed_within(Duration::from_secs(10)).await,
        "an idle keep-alive connection must be closed by the drain"
    );
    within(
        Duration::from_secs(10),
        "GOAWAY on the idle h2 connection",
        h2_conn,
    )
    .await
    .unwrap()
    .expect("a graceful HTTP/2 close");
    assert!(
        !slow.is_finished() && !stream.is_finished(),
        "both requests must still be in flight"
    );
    // The admin listener answers through the drain.
    assert_eq!(get(admin, "/healthz").await.status, 200);

    let resp = within(Duration::from_secs(30), "the slow response", slow)
        .await
        .unwrap();
    assert_eq!(
        (resp.status.as_u16(), resp.text().as_str()),
        (200, "slow done")
    );
    let resp = within(Duration::from_secs(30), "the stream", stream)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    let expected: String = (0..10).map(|i| format!("data: {i}\n\n")).collect();
    assert_eq!(resp.text(), expected);
    gh.assert_exits_with(0).await;
    assert_eq!(up.request_count(), 4);
}

// ---------------------------------------------------------------------------------------------
// Idle connections to the app
// ---------------------------------------------------------------------------------------------

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

/// An app (HTTP/1.1 and h2c) that holds every request until released, counting the requests
/// that arrived and the connections open on its side.
struct HoldingApp {
    url: String,
    arrived: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    release: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldingApp {
    async fn start() -> HoldingApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (arrived, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let release = tokio::sync::watch::channel(false).0;
        let (counted, opened, released) = (arrived.clone(), open.clone(), release.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                opened.fetch_add(1, SeqCst);
                let (counted, opened, released) =
                    (counted.clone(), opened.clone(), released.clone());
                let service = hyper::service::service_fn(move |_req| {
                    counted.fetch_add(1, SeqCst);
                    let mut released = released.subscribe();
                    async move {
                        let _ = released.wait_for(|r| *r).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(full("held")))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                    opened.fetch_sub(1, SeqCst);
                });
            }
        });
        HoldingApp {
            url,
            arrived,
            open,
            release,
            task,
        }
    }
}

impl Drop for HoldingApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// After a burst, with no request since to notice them, the app's connections are closed
/// once idle past `upstream.idle_timeout`, and the gauge of open connections follows.
#[tokio::test]
async fn idle_upstream_connections_close_after_idle_timeout_and_the_gauge_follows() {
    const BURST: usize = 8;
    let gauge = "gatehouse_upstream_connections";
    for protocol in ["http1", "h2c"] {
        let app = HoldingApp::start().await;
        let admin = free_port();
        let template = config(
            "workers = 2",
            &format!("idle_timeout = \"300ms\"\nprotocol = \"{protocol}\""),
            &admin_section(None),
        );
        let gh = Gatehouse::start(
            &template,
            &[("upstream", &app.url), ("admin", &admin.to_string())],
        )
        .await;
        let port = gh.port;
        let burst: Vec<_> = (0..BURST)
            .map(|_| tokio::spawn(async move { get(port, "/held").await }))
            .collect();
        within(STEP, "the burst to reach the app", async {
            while app.arrived.load(SeqCst) < BURST {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        // While the requests are held, every connection is open and counted.
        let open = app.open.load(SeqCst);
        let expected = if protocol == "http1" { BURST } else { 1 };
        assert!(open >= expected, "{protocol}: {open} connections");
        wait_sample(admin, gauge, open as f64).await;
        app.release.send_replace(true);
        for answer in burst {
            assert_eq!(answer.await.unwrap().status, 200, "{protocol}");
        }
        // Nothing more reaches the app: its idle connections are closed all the same.
        within(
            Duration::from_secs(20),
            "the idle connections to close",
            async {
                loop {
                    let text = scrape(admin).await;
                    if app.open.load(SeqCst) == 0 && sample(&text, gauge) == 0.0 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        )
        .await;
        assert_eq!(app.arrived.load(SeqCst), BURST, "{protocol}");
    }
}

// ---------------------------------------------------------------------------------------------
// Logs under overload
// ---------------------------------------------------------------------------------------------

/// The JSON log lines of `stderr` whose message starts with `message`.
fn log_lines(stderr: &str, message: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .collect()
}

/// A saturated app fails every request alike: rather than a line per request, the log gets
/// one per interval, and the next one counts those it left out.
#[tokio::test]
async fn overloaded_requests_log_one_line_per_interval_with_a_count_of_the_rest() {
    const FAILED: &str = "upstream request failed";
    let (up, gh) = proxy_with(
        "",
        "max_connections = 1\nmax_pending = 0\ntimeout = \"5m\"",
        "",
    )
    .await;
    let port = gh.port;
    // One request holds the only connection for the whole test.
    let _held = tokio::spawn(async move { get(port, "/slow?ms=300000").await });
    up.wait_for_requests(1).await;
    // One at a time, so each failure is logged (or counted) before the next is sent.
    let (sent, lines) = within(Duration::from_secs(120), "a line with a count", async {
        let mut sent = 0u64;
        loop {
            get(port, "/echo")
                .await
                .assert_gatehouse_error(503, "unavailable");
            sent += 1;
            let lines = log_lines(&gh.stderr(), FAILED);
            if sent >= 50 && lines.iter().any(|l| l["suppressed"].as_u64() > Some(0)) {
                return (sent, lines);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(lines.len() <= 3, "{sent} failures, {} lines", lines.len());
    assert!(
        lines.iter().all(|l| l["kind"] == "overloaded"),
        "{lines:#?}"
    );
    // Every failure is either a line or counted in the next one.
    let accounted: u64 = lines
        .iter()
        .map(|l| 1 + l["suppressed"].as_u64().expect("a count on every line"))
        .sum();
    assert_eq!(accounted, sent, "{lines:#?}");
    assert_eq!(up.request_count(), 1, "no failure reached the app");
}
