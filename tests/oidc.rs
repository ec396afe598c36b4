//! `oidc` against a real OpenID Provider: `oidc-provider` from npm (a certified
//! implementation), configured by tests/fixtures/oidc/provider.mjs with one client, any user
//! its development login form accepts, and 4-second access tokens (once served over https,
//! with a certificate from a test CA that gatehouse trusts through `SSL_CERT_FILE`). The sign-in is driven by
//! a plain HTTP client with a cookie jar that fills in the provider's login and consent
//! forms, and once by a real Chromium (through playwright-core): page → `302` → login form →
//! consent → callback → the app sees the user.
//!
//! The npm packages (pinned in tests/fixtures/oidc/package.json) are installed into
//! `target/oidc-node` on first use; `.ci/run` installs Node and npm. Without them the tests
//! are compiled ignored, with the reason (see build.rs), except under CI.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const CONFIG: &str = r#"[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "1s"

[upstream]
url = "{upstream}"

[admin]
listen = "127.0.0.1:{admin}"

[[middleware]]
type = "oidc"
issuer = "{issuer}"
client_id = "gatehouse"
client_secret = "gatehouse-test-secret"
cookie_secret = "{secret}"
scopes = ["openid", "email", "profile", "offline_access"]
post_logout_redirect = "http://127.0.0.1:{port}/signed-out"
allowed = { email_domains = ["example.com"] }
forward_claims = { sub = "x-user", email = "x-email", groups = "x-groups" }
{store}

# The session's claims decide under /admin/ (`authorize` reads what `oidc` verified).
[[middleware]]
type = "authorize"
paths = ["/admin/**"]
rules = [
  { name = "no-debug-for-staff", deny = "request.path == '/admin/debug' && 'staff' in claims.groups" },
  { name = "admins", allow = "'admins' in claims.groups" },
]

[audit]
[[audit.sinks]]
type = "file"
path = "{events}"
"#;

const SECRET: &str = "q83vEi1Nq2d1ZTXyYx0jxHoDhn2Fc/HpSoBpR1kz5bM=";

/// `target/oidc-node`, with the pinned packages installed (once per test run).
fn node_modules() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("target/oidc-node");
        std::fs::create_dir_all(&dir).unwrap();
        let fixtures = root.join("tests/fixtures/oidc");
        for file in ["package.json", "provider.mjs", "browser.mjs"] {
            std::fs::copy(fixtures.join(file), dir.join(file)).unwrap();
        }
        // Installed again when the pinned versions change.
        let wanted = std::fs::read(fixtures.join("package.json")).unwrap();
        let installed = dir.join("installed-package.json");
        if std::fs::read(&installed).ok().as_ref() != Some(&wanted) {
            let out = std::process::Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .output()
                .expect("npm runs");
            assert!(
                out.status.success(),
                "npm install in {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(&installed, &wanted).unwrap();
        }
        dir
    })
    .clone()
}

/// The provider, a `node` process on its own port.
struct Provider {
    port: u16,
    /// Killed on drop.
    _child: Child,
}

impl Provider {
    /// `tls`: served over https as `https://localhost:PORT` with the CA's certificate.
    async fn start(port: u16, app: u16, tls: Option<&TestCa>) -> Provider {
        let dir = node_modules();
        let mut command = Command::new("node");
        command
            .arg("provider.mjs")
            .arg(port.to_string())
            .arg(format!("http://127.0.0.1:{app}"));
        if let Some(ca) = tls {
            command.arg(&ca.leaf_file).arg(&ca.leaf_key_file);
        }
        let mut child = command
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        within(STEP, "the provider listening", async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line == "listening" {
                    return;
                }
            }
            panic!("the provider exited before listening");
        })
        .await;
        Provider {
            port,
            _child: child,
        }
    }

    /// How many grants of each type the provider answered, and revocations.
    async fn counts(&self) -> Value {
        let resp = send(
            self.port,
            request("GET", "/test/counts")
                .header("host", format!("127.0.0.1:{}", self.port))
                .body(empty())
                .unwrap(),
        )
        .await;
        resp.json()
    }
}

/// A cookie jar and a way to follow redirects and fill in the provider's forms, as a
/// browser does (cookies are per host, whatever the port, as browsers keep them).
#[derive(Clone, Default)]
struct Browser {
    jar: HashMap<String, String>,
    /// The CA an https provider's certificate is from.
    ca: Option<rustls::pki_types::CertificateDer<'static>>,
}

impl Browser {
    fn cookie_header(&self) -> String {
        let pairs: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.join("; ")
    }

    fn keep(&mut self, resp: &Resp) {
        for set in resp.header_all("set-cookie") {
            let pair = set.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            let expired = set.to_ascii_lowercase().contains("max-age=0")
                || set
                    .to_ascii_lowercase()
                    .contains("expires=thu, 01 jan 1970");
            if expired || value.is_empty() {
                self.jar.remove(name);
            } else {
                self.jar.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    /// One request to `url` (`http://127.0.0.1:port/path`, or `https://localhost:port/path`
    /// trusting [`Browser::ca`]), as a page navigation.
    async fn go(&mut self, method: &str, url: &str, form: Option<String>) -> Resp {
        let (host, rest) = match url.strip_prefix("https://localhost:") {
            Some(rest) => ("localhost", rest),
            None => (
                "127.0.0.1",
                url.strip_prefix("http://127.0.0.1:").expect("a local URL"),
            ),
        };
        let (port, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let port: u16 = port.parse().unwrap();
        let mut req = request(method, if path.is_empty() { "/" } else { path })
            .header("host", format!("{host}:{port}"))
            .header("accept", "text/html,application/xhtml+xml");
        if !self.jar.is_empty() {
            req = req.header("cookie", self.cookie_header());
        }
        let req = match form {
            Some(body) => req
                .header("content-type", "application/x-www-form-urlencoded")
                .body(full(body)),
            None => req.body(empty()),
        }
        .unwrap();
        let resp = match host {
            "localhost" => tls_send(port, self.ca.clone().expect("a CA for https"), req).await,
            _ => send(port, req).await,
        };
        self.keep(&resp);
        resp
    }

    /// Follows redirects and fills in the provider's forms as `user` until a page answers
    /// that is neither; stops before a URL for which `stop` says so, returning it.
    async fn walk(&mut self, start: &str, user: &str, stop: impl Fn(&str) -> bool) -> Walk {
        let mut url = start.to_owned();
        for _ in 0..20 {
            if stop(&url) {
                return Walk::Stopped(url);
            }
            let resp = self.go("GET", &url, None).await;
            let resp = match self.form(&url, &resp, user) {
                Some((action, body)) => self.go("POST", &action, Some(body)).await,
                None => resp,
            };
            match resp.header("location") {
                Some(location) if resp.status.is_redirection() => {
                    url = absolute(&url, &location);
                }
                _ => return Walk::Answered(resp),
            }
        }
        panic!("more than 20 steps from {start}");
    }

    /// The provider's login or consent form on the page, filled in: its action and body.
    fn form(&self, url: &str, resp: &Resp, user: &str) -> Option<(String, String)> {
        let html = resp.text();
        let action = html
            .split("action=\"")
            .nth(1)?
            .split('"')
            .next()?
            .to_owned();
        let body = if html.contains("name=\"prompt\" value=\"login\"") {
            format!("prompt=login&login={user}&password=any")
        } else if html.contains("name=\"prompt\" value=\"consent\"") {
            "prompt=consent".to_owned()
        } else {
            return None;
        };
        Some((absolute(url, &action), body))
    }

    /// Signs in as `user` from `path` of gatehouse at `port`; the app's final answer.
    async fn sign_in(&mut self, port: u16, path: &str, user: &str) -> Resp {
        match self
            .walk(&format!("http://127.0.0.1:{port}{path}"), user, |_| false)
            .await
        {
            Walk::Answered(resp) => resp,
            Walk::Stopped(_) => unreachable!(),
        }
    }
}

enum Walk {
    Answered(Resp),
    Stopped(String),
}

/// `location` resolved against `base`.
fn absolute(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_owned();
    }
    let authority = base.find("://").unwrap() + 3;
    let origin_end = base[authority..]
        .find('/')
        .map_or(base.len(), |i| i + authority);
    format!("{}{location}", &base[..origin_end])
}

fn events(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct Setup {
    provider: Provider,
    admin: u16,
    gh: Gatehouse,
    _app: Upstream,
    events: PathBuf,
    _dir: tempfile::TempDir,
}

/// The provider, the app and gatehouse in front of it (`store`: session store keys).
async fn setup(store: &str) -> Setup {
    let (port, idp, admin) = (free_port(), free_port(), free_port());
    let provider = Provider::start(idp, port, None).await;
    let app = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let gh = Gatehouse::start(
        CONFIG,
        &[
            ("port", &port.to_string()),
            ("issuer", &format!("http://127.0.0.1:{idp}")),
            ("admin", &admin.to_string()),
            ("upstream", &app.url()),
            ("secret", SECRET),
            ("events", events.to_str().unwrap()),
            ("store", store),
        ],
    )
    .await;
    // Discovery runs in the background: a browser is sent to sign in once it is done.
    within(STEP, "discovery", async {
        loop {
            let resp = Browser::default()
                .go("GET", &format!("http://127.0.0.1:{port}/"), None)
                .await;
            if resp.status == 302 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    Setup {
        provider,
        admin,
        gh,
        _app: app,
        events,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(gatehouse_has_node),
    ignore = "needs node and npm (apt-get install nodejs npm)"
)]
async fn sign_in_refresh_and_sign_out_against_a_real_provider() {
    let Setup {
        provider,
        admin,
        mut gh,
        events: events_file,
        _app,
        _dir,
    } = setup("").await;
    let port = gh.port;
    let origin = format!("http://127.0.0.1:{port}");

    // An API client without a session gets a 401 it can read, not a redirect.
    let resp = get(port, "/echo").await;
    let body = resp.assert_gatehouse_error(401, "unauthorized");
    assert!(body["message"].as_str().unwrap().contains("login_required"));
    // A bearer token that does not verify is refused as such, not sent to sign in.
    let resp = send(
        port,
        request("GET", "/echo")
            .header("accept", "text/html")
            .header("authorization", "Bearer not.a.jwt")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 401, "{resp:?}");

    // A browser: redirected with PKCE S256, state and nonce; the state cookie is sealed.
    let mut alice = Browser::default();
    let first = alice
        .go("GET", &format!("{origin}/echo?from=start"), None)
        .await;
    assert_eq!(first.status, 302, "{first:?}");
    let location = first.header("location").unwrap();
    assert!(location.starts_with(&format!("http://127.0.0.1:{}/auth?", provider.port)));
    for part in [
        "code_challenge_method=S256",
        "state=",
        "nonce=",
        "client_id=gatehouse",
    ] {
        assert!(location.contains(part), "{part} in {location}");
    }
    let state_cookie = first.header("set-cookie").unwrap();
    assert!(state_cookie.starts_with("gatehouse_session_state="));
    for attr in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/"] {
        assert!(state_cookie.contains(attr), "{attr} in {state_cookie}");
    }

    // Through the provider's forms up to the callback, which is kept to replay later.
    let walk = alice
        .walk(&location, "alice", |u| u.contains("/oauth2/callback"))
        .await;
    let Walk::Stopped(callback) = walk else {
        panic!("the provider did not send the browser back")
    };
    // The same callback delivered to another browser: no state cookie there.
    let mut other = Browser::default();
    let resp = other.go("GET", &callback, None).await;
    assert_eq!(resp.status, 400, "{resp:?}");
    assert!(
        resp.text().contains("not started in this browser"),
        "{}",
        resp.text()
    );
    assert_eq!(
        resp.header("location"),
        None,
        "an error page, not a redirect"
    );

    // In the browser that started it: the session, and back to the page it asked for.
    let resp = alice.go("GET", &callback, None).await;
    assert_eq!(resp.status, 302, "{resp:?}");
    assert_eq!(resp.header("location").as_deref(), Some("/echo?from=start"));
    assert!(
        alice.jar.contains_key("gatehouse_session"),
        "{:?}",
        alice.jar
    );
    assert!(!alice.jar.contains_key("gatehouse_session_state"));
    let resp = alice
        .go("GET", &format!("{origin}/echo?from=start"), None)
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = resp.upstream_headers();
    assert_eq!(seen["x-user"], ["alice"]);
    assert_eq!(seen["x-email"], ["alice@example.com"]);
    assert_eq!(seen["x-groups"], [r#"["staff","admins"]"#]);
    // `authorize` decides from the session's claims.
    let resp = alice
        .go("GET", &format!("{origin}/admin/users"), None)
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let resp = alice
        .go("GET", &format!("{origin}/admin/debug"), None)
        .await;
    let body = resp.assert_gatehouse_error(403, "forbidden");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no-debug-for-staff"),
        "{body}"
    );
    assert!(
        !seen
            .get("cookie")
            .is_some_and(|c| c.iter().any(|c| c.contains("gatehouse_"))),
        "the app never gets the sealed session: {seen:?}"
    );

    // The callback replayed: its state cookie is gone.
    let resp = alice.clone().go("GET", &callback, None).await;
    assert_eq!(resp.status, 400, "{resp:?}");

    // A tampered session cookie opens nothing: signed out, sent to sign in again.
    let mut tampered = alice.clone();
    let value = tampered.jar.get_mut("gatehouse_session").unwrap();
    let flipped = if value.ends_with('A') { 'B' } else { 'A' };
    value.pop();
    value.push(flipped);
    let resp = tampered.go("GET", &format!("{origin}/echo"), None).await;
    assert_eq!(resp.status, 302, "{resp:?}");
    assert!(resp
        .header_all("set-cookie")
        .iter()
        .any(|c| c.starts_with("gatehouse_session=;") && c.contains("Max-Age=0")));

    // Someone the provider signs in but who is not allowed.
    let mut mallory = Browser::default();
    let resp = mallory.sign_in(port, "/echo", "mallory").await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert!(resp.text().contains("not_allowed"), "{}", resp.text());

    // The access token expires (4 s): 50 requests at once cause one refresh at the
    // provider, and each of them carries the re-issued cookie.
    assert_eq!(provider.counts().await["refresh_token"], 0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = alice.clone();
    let answers = futures_join((0..50).map(|_| {
        let mut b = before.clone();
        let url = format!("{origin}/echo");
        async move { b.go("GET", &url, None).await }
    }))
    .await;
    for resp in &answers {
        assert_eq!(resp.status, 200, "{resp:?}");
        assert!(
            resp.header_all("set-cookie")
                .iter()
                .any(|c| c.starts_with("gatehouse_session=")),
            "the cookie is re-issued after the refresh: {resp:?}"
        );
    }
    assert_eq!(
        provider.counts().await["refresh_token"],
        1,
        "one refresh for 50 requests"
    );
    alice.keep(&answers[0]);
    let resp = alice.go("GET", &format!("{origin}/echo"), None).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.upstream_headers()["x-user"], ["alice"]);

    // Sign-out: the cookie goes, the refresh token is revoked, and the browser goes
    // through the provider's end-session endpoint.
    let signed_in = alice.clone();
    let resp = alice
        .go("GET", &format!("{origin}/oauth2/sign_out"), None)
        .await;
    assert_eq!(resp.status, 302, "{resp:?}");
    let end = resp.header("location").unwrap();
    assert!(end.starts_with(&format!("http://127.0.0.1:{}/session/end?", provider.port)));
    assert!(end.contains("id_token_hint=") && end.contains("post_logout_redirect_uri="));
    assert!(!alice.jar.contains_key("gatehouse_session"));
    assert_eq!(provider.counts().await["revocation"], 1);

    // A copy of the signed-out cookie lives until its access token expires; then its
    // refresh fails (revoked) and the session ends cleanly.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let resp = signed_in
        .clone()
        .go("GET", &format!("{origin}/echo"), None)
        .await;
    assert_eq!(resp.status, 302, "{resp:?}");
    assert!(resp.header("location").unwrap().contains("/auth?"));
    assert!(resp
        .header_all("set-cookie")
        .iter()
        .any(|c| c.starts_with("gatehouse_session=;")));

    // An API client with the provider's ID token for this client as a bearer token.
    let token = id_token(&provider, port, "carol").await;
    let resp = send(
        port,
        request("GET", "/echo")
            .header("authorization", format!("Bearer {token}"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.upstream_headers()["x-user"], ["carol"]);

    let metrics = get(admin, "/metrics").await.text();
    for (event, n) in [
        ("login", 2),
        ("login_failed", 2),
        ("refresh", 1),
        ("refresh_failed", 1),
        ("logout", 1),
    ] {
        let line =
            format!("gatehouse_oidc_events_total{{middleware=\"oidc\",event=\"{event}\"}} {n}\n");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    gh.send_signal("TERM");
    gh.assert_exits_with(0).await;
    let events = events(&events_file);
    let reasons: Vec<&str> = events
        .iter()
        .filter_map(|e| e["deny_reason"].as_str())
        .collect();
    for reason in [
        "login_required",
        "state_mismatch",
        "not_allowed",
        "session_expired",
    ] {
        assert!(reasons.contains(&reason), "{reason} in {reasons:?}");
    }
    // Alice's requests name her session by a digest, the same one from sign-in to sign-out
    // (refreshes included), never the cookie.
    let sessions: std::collections::HashSet<&str> = events
        .iter()
        .filter(|e| e["subject"] == "alice" && e["decision"] == "allow")
        .filter_map(|e| e["session"].as_str())
        .collect();
    assert_eq!(sessions.len(), 1, "{events:#?}");
    let digest = sessions.into_iter().next().unwrap();
    assert_eq!(digest.len(), 32, "{digest}");
    assert!(!signed_in.jar["gatehouse_session"].contains(digest));
    // An API client's bearer token is no session.
    let carol = events.iter().find(|e| e["subject"] == "carol").unwrap();
    assert_eq!(carol["session"], Value::Null, "{carol}");
    // The rule that decided under /admin/, and none elsewhere.
    let rule = |path: &str| {
        let e = events.iter().find(|e| e["path"] == path).unwrap();
        (e["status"].clone(), e["policy_rule"].clone())
    };
    assert_eq!(rule("/admin/users"), (200.into(), "admins".into()));
    assert_eq!(
        rule("/admin/debug"),
        (403.into(), "no-debug-for-staff".into())
    );
    assert_eq!(rule("/echo").1, Value::Null);
}

/// An ID token for gatehouse's client, signed in as `user` by the test itself (the code
/// flow with PKCE, the code exchanged at the token endpoint), as an API client gets one.
async fn id_token(provider: &Provider, app: u16, user: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let verifier = "a-test-verifier-that-is-long-enough-for-pkce-0123456789";
    let challenge = b64.encode(sha2::Sha256::digest(verifier.as_bytes()));
    let redirect = format!("http://127.0.0.1:{app}/oauth2/callback");
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("response_type", "code")
        .append_pair("client_id", "gatehouse")
        .append_pair("redirect_uri", &redirect)
        .append_pair("scope", "openid email")
        .append_pair("nonce", "n")
        .append_pair(
            "claims",
            r#"{"id_token":{"email":null,"email_verified":null}}"#,
        )
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256")
        .finish();
    let start = format!("http://127.0.0.1:{}/auth?{query}", provider.port);
    let Walk::Stopped(callback) = Browser::default()
        .walk(&start, user, |u| u.starts_with(&redirect))
        .await
    else {
        panic!("the provider did not answer with a code")
    };
    let code = form_urlencoded::parse(callback.split_once('?').unwrap().1.as_bytes())
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "authorization_code")
        .append_pair("code", &code)
        .append_pair("redirect_uri", &redirect)
        .append_pair("code_verifier", verifier)
        .finish();
    let basic = base64::engine::general_purpose::STANDARD.encode("gatehouse:gatehouse-test-secret");
    let resp = send(
        provider.port,
        request("POST", "/token")
            .header("host", format!("127.0.0.1:{}", provider.port))
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(full(form))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.json()["id_token"].as_str().unwrap().to_owned()
}

/// Runs the futures at once and returns their outputs in order.
async fn futures_join<F: std::future::Future<Output = Resp> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<Resp> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(gatehouse_has_node),
    ignore = "needs node and npm (apt-get install nodejs npm)"
)]
async fn a_provider_that_is_down_gets_an_error_page_not_a_loop() {
    let (port, idp, admin) = (free_port(), free_port(), free_port());
    let app = Upstream::start().await;
    let store = "";
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let _gh = Gatehouse::start(
        CONFIG,
        &[
            ("port", &port.to_string()),
            ("issuer", &format!("http://127.0.0.1:{idp}")),
            ("admin", &admin.to_string()),
            ("upstream", &app.url()),
            ("secret", SECRET),
            ("events", events.to_str().unwrap()),
            ("store", store),
        ],
    )
    .await;
    let url = format!("http://127.0.0.1:{port}/echo");
    let resp = Browser::default().go("GET", &url, None).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(resp.header("location"), None);
    assert!(resp
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(
        resp.text().contains("sign-in provider has not answered"),
        "{}",
        resp.text()
    );

    // Once it is up, discovery succeeds and browsers are sent to it.
    let _provider = Provider::start(idp, port, None).await;
    within(STEP, "discovery once the provider is up", async {
        while Browser::default().go("GET", &url, None).await.status != 302 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(gatehouse_has_node),
    ignore = "needs node and npm (apt-get install nodejs npm)"
)]
async fn a_provider_over_https_is_used_when_its_ca_is_trusted_and_only_then() {
    let ca = TestCa::new();
    let (port, idp, admin) = (free_port(), free_port(), free_port());
    let _provider = Provider::start(idp, port, Some(&ca)).await;
    let app = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let (port_s, admin_s, issuer) = (
        port.to_string(),
        admin.to_string(),
        format!("https://localhost:{idp}"),
    );
    let vars = [
        ("port", port_s.as_str()),
        ("issuer", &issuer),
        ("admin", &admin_s),
        ("upstream", &app.url()),
        ("secret", SECRET),
        ("events", events.to_str().unwrap()),
        ("store", ""),
    ];
    let echo = format!("http://127.0.0.1:{port}/echo");

    // The system's roots only: the provider's certificate is not trusted, discovery fails
    // saying so, and a browser gets the error page.
    let mut gh = Gatehouse::spawn(CONFIG, &vars, &[]);
    gh.wait_ready().await;
    let output = within(STEP, "the failed discovery logged", async {
        loop {
            let output = gh.output();
            if output.contains("OpenID discovery failed") {
                return output;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        output.contains("TLS handshake with localhost: certificate not trusted"),
        "{output}"
    );
    let resp = Browser::default().go("GET", &echo, None).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    drop(gh);

    // SSL_CERT_FILE names the CA: discovery, keys, the code exchange and userinfo all go
    // over https, and the app sees the user (the email comes from userinfo).
    let mut gh = Gatehouse::spawn(CONFIG, &vars, &[ca.trusted_env()]);
    gh.wait_ready().await;
    within(STEP, "discovery over https", async {
        while Browser::default().go("GET", &echo, None).await.status != 302 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut alice = Browser {
        ca: Some(ca.cert.clone()),
        ..Browser::default()
    };
    let resp = alice.sign_in(port, "/echo", "alice").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let headers = resp.upstream_headers();
    assert_eq!(headers["x-user"], ["alice"]);
    assert_eq!(headers["x-email"], ["alice@example.com"]);
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(all(gatehouse_has_node, gatehouse_has_chromium)),
    ignore = "needs node, npm and chromium (apt-get install nodejs npm chromium)"
)]
async fn a_browser_signs_in_through_the_provider_forms() {
    let setup = setup("").await;
    let chromium = browser::find_chromium();
    let url = format!("http://127.0.0.1:{}/echo?page=1", setup.gh.port);
    let out = within(
        STEP,
        "the browser's sign-in",
        Command::new("node")
            .arg("browser.mjs")
            .arg(&chromium)
            .arg(&url)
            .arg("alice")
            .current_dir(node_modules())
            .output(),
    )
    .await
    .expect("node runs");
    assert!(
        out.status.success(),
        "browser.mjs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{report:#}");
    assert_eq!(report["final"], url.as_str(), "{report:#}");
    let visited: Vec<&str> = report["visited"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        visited.iter().any(|u| u.contains("/interaction/")),
        "{visited:?}"
    );
    let page: Value = serde_json::from_str(report["text"].as_str().unwrap()).unwrap();
    assert_eq!(page["headers"]["x-user"][0], "alice", "{page:#}");
    let session = report["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gatehouse_session")
        .expect("the session cookie is kept by the browser");
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["secure"], true);
    assert_eq!(session["sameSite"], "Lax");
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(all(gatehouse_has_node, gatehouse_has_redis)),
    ignore = "needs node, npm and redis-server (apt-get install nodejs npm redis-server)"
)]
async fn a_redis_store_signs_out_server_side_and_recovers_from_a_new_password() {
    let redis = Redis::with(free_port(), &["--requirepass", "first"]).await;
    let redis_port = redis.port;
    let store =
        format!("session_store = \"redis\"\nredis_url = \"redis://:first@127.0.0.1:{redis_port}\"");
    let Setup {
        mut gh,
        events: events_file,
        provider,
        admin: _,
        _app,
        _dir,
    } = setup(&store).await;
    let port = gh.port;
    let echo = format!("http://127.0.0.1:{port}/echo");

    // The cookie holds only the session's id; the session is in Redis.
    let mut alice = Browser::default();
    let resp = alice.sign_in(port, "/echo", "alice").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.upstream_headers()["x-user"], ["alice"]);
    let cookie = &alice.jar["gatehouse_session"];
    assert!(cookie.len() < 200, "an id, not a session: {cookie}");

    // Sign-out deletes it there: a copy of the cookie opens nothing any more.
    let copy = alice.clone();
    let resp = alice
        .go(
            "GET",
            &format!("http://127.0.0.1:{port}/oauth2/sign_out"),
            None,
        )
        .await;
    assert_eq!(resp.status, 302, "{resp:?}");
    let resp = copy.clone().go("GET", &echo, None).await;
    assert_eq!(resp.status, 302, "{resp:?}");
    assert!(resp.header("location").unwrap().contains("/auth?"));

    // Redis restarts with a new password: sessions cannot be read, and the browser gets an
    // error page (fails closed), not a redirect.
    let mut bob = Browser::default();
    assert_eq!(bob.sign_in(port, "/echo", "bob").await.status, 200);
    redis.kill();
    let _redis = Redis::with(redis_port, &["--requirepass", "second"]).await;
    let resp = bob.clone().go("GET", &echo, None).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(resp.header("location"), None);

    // The new password in the config, reloaded: the store works again, without a restart
    // (the old server's sessions are gone with it: sign in again).
    let config = std::fs::read_to_string(&gh.config_path)
        .unwrap()
        .replace(":first@", ":second@");
    std::fs::write(&gh.config_path, config).unwrap();
    gh.send_signal("HUP");
    within(STEP, "the reloaded store", async {
        while bob.clone().go("GET", &echo, None).await.status == 503 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut bob = Browser::default();
    let resp = bob.sign_in(port, "/echo", "bob").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.upstream_headers()["x-user"], ["bob"]);

    // Its access token expires: one refresh for parallel requests, kept in Redis under the
    // same id (the cookie does not change).
    let before = provider.counts().await["refresh_token"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let answers = futures_join((0..10).map(|_| {
        let mut b = bob.clone();
        let url = echo.clone();
        async move { b.go("GET", &url, None).await }
    }))
    .await;
    assert!(answers.iter().all(|r| r.status == 200), "{answers:?}");
    assert_eq!(provider.counts().await["refresh_token"], before + 1);
    let resp = bob.go("GET", &echo, None).await;
    assert_eq!(resp.status, 200, "{resp:?}");

    gh.send_signal("TERM");
    gh.assert_exits_with(0).await;
    let events = events(&events_file);
    let reasons: Vec<&str> = events
        .iter()
        .filter_map(|e| e["deny_reason"].as_str())
        .collect();
    for reason in ["session_expired", "backend_unavailable"] {
        assert!(reasons.contains(&reason), "{reason} in {reasons:?}");
    }
}
