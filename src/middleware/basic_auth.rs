//! `basic_auth`: user names and password hashes (bcrypt, argon2id) inline and/or from an
//! htpasswd file. Hashes are slow on purpose, so verification runs on tokio's blocking
//! pool, and a successful one is remembered for a minute (by a digest of user and password,
//! never the password) so that a client sending the same credentials per request pays one
//! hash, not one per request.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use http::header::AUTHORIZATION;
use http::{request, HeaderValue};
use schemars::JsonSchema;
use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::auth::{colon_entries, digest, unauthorized};
use crate::chain::{Context, Flow, Middleware, Reason};
use crate::config::value::{ConfigFile, FileContent};
use crate::config::{KeyPath, Problem};

/// How long a successful verification is remembered.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// The most remembered verifications; past it, expired ones are dropped, then all.
const CACHE_MAX: usize = 10_000;

/// `basic_auth`: HTTP Basic users with bcrypt or argon2id hashes; `401` otherwise.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The realm of the `www-authenticate` challenge.
    #[serde(default = "default_realm")]
    realm: String,
    /// The accepted users.
    #[serde(default)]
    users: Vec<User>,
    /// `user:hash` lines, read at every (re)load of the config.
    htpasswd_file: Option<ConfigFile<Vec<User>>>,
    /// Remove `authorization` before the request goes upstream.
    #[serde(default = "super::auth::yes")]
    strip: bool,
}

fn default_realm() -> String {
    "gatehouse".into()
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct User {
    /// The user name; it becomes the request's subject.
    user: String,
    /// A bcrypt (`$2y$`, `$2b$`, `$2a$`) or argon2id (`$argon2id$`) hash, as
    /// `htpasswd -nbB user password` prints; never a plaintext password.
    #[schemars(with = "String")]
    password_hash: PasswordHash,
}

/// A password hash whose scheme gatehouse can verify. Anything else (a plaintext password
/// in particular) is refused at load.
#[derive(Clone)]
enum PasswordHash {
    Bcrypt(Arc<str>),
    Argon2id(Arc<str>),
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PasswordHash::Bcrypt(_) => "bcrypt",
            PasswordHash::Argon2id(_) => "argon2id",
        })
    }
}

impl FromStr for PasswordHash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bcrypt = ["$2y$", "$2b$", "$2a$"].iter().any(|p| s.starts_with(p));
        if bcrypt && s.parse::<bcrypt::HashParts>().is_ok() {
            return Ok(PasswordHash::Bcrypt(s.into()));
        }
        if s.starts_with("$argon2id$") && argon2::PasswordHash::new(s).is_ok() {
            return Ok(PasswordHash::Argon2id(s.into()));
        }
        Err(
            "expected a bcrypt ($2y$, $2b$, $2a$) or argon2id ($argon2id$) hash; \
             plaintext passwords are not accepted (make one with `htpasswd -nbB user password`)"
                .into(),
        )
    }
}

impl<'de> Deserialize<'de> for PasswordHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

impl PasswordHash {
    /// The slow part: run it on the blocking pool.
    fn verify(&self, password: &[u8]) -> bool {
        use argon2::PasswordVerifier;
        match self {
            PasswordHash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            PasswordHash::Argon2id(h) => argon2::Argon2::default()
                .verify_password(password, &**h)
                .is_ok(),
        }
    }
}

/// An `htpasswd_file` holds `user:hash` lines; blank lines and `#` comments are skipped.
impl FileContent for Vec<User> {
    fn parse(bytes: Vec<u8>) -> Result<Self, String> {
        colon_entries(&bytes, "user:hash")?
            .map(|entry| {
                let (n, user, hash) = entry?;
                let password_hash = hash
                    .parse()
                    .map_err(|e| format!("line {n} (user {user:?}): {e}"))?;
                Ok(User {
                    user: user.to_owned(),
                    password_hash,
                })
            })
            .collect()
    }
}

impl Settings {
    fn all_users(&self) -> impl Iterator<Item = &User> {
        self.users
            .iter()
            .chain(self.htpasswd_file.iter().flat_map(|f| &f.content))
    }
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        let at = KeyPath::default();
        if self.all_users().next().is_none() {
            return Err((
                at.key("users"),
                "a basic_auth middleware needs `users` or a non-empty `htpasswd_file`".into(),
            ));
        }
        if let Some(i) = self.users.iter().position(|u| u.user.contains(':')) {
            let mut path = at.key("users");
            path.push_index(i);
            return Err((path.key("user"), "a user name cannot contain ':'".into()));
        }
        if HeaderValue::from_str(&challenge(&self.realm)).is_err() || self.realm.contains('"') {
            return Err((
                at.key("realm"),
                "the realm must be printable text without '\"'".into(),
            ));
        }
        Ok(())
    }

    fn summary(&self) -> String {
        let users: Vec<&str> = self.all_users().map(|u| u.user.as_str()).collect();
        let file = self.htpasswd_file.as_ref().map_or(String::new(), |f| {
            format!(" htpasswd_file={}", f.path.display())
        });
        format!(
            "realm={:?} users={}{file} strip={}",
            self.realm,
            super::list(&users),
            self.strip
        )
    }

    fn role(&self) -> super::Role {
        super::Role::authentication()
    }

    fn build(&self, _: &super::Build) -> Box<dyn Middleware> {
        let users: HashMap<Box<str>, (Arc<str>, PasswordHash)> = self
            .all_users()
            .map(|u| {
                let name: Arc<str> = u.user.as_str().into();
                (u.user.as_str().into(), (name, u.password_hash.clone()))
            })
            .collect();
        let decoy = users
            .values()
            .next()
            .expect("validated: one user at least")
            .1
            .clone();
        Box::new(BasicAuth {
            users,
            decoy,
            challenge: HeaderValue::from_str(&challenge(&self.realm)).expect("validated"),
            strip: self.strip,
            verified: Mutex::new(HashMap::new()),
        })
    }
}

fn challenge(realm: &str) -> String {
    format!("Basic realm=\"{realm}\", charset=\"UTF-8\"")
}

struct BasicAuth {
    /// User name → (the subject to set, the hash to verify).
    users: HashMap<Box<str>, (Arc<str>, PasswordHash)>,
    /// Verified instead when the user is unknown, so the answer takes as long as for a
    /// known user with a wrong password and does not reveal which users exist.
    decoy: PasswordHash,
    challenge: HeaderValue,
    strip: bool,
    /// Digest of (user, password) → when that successful verification expires.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
}

impl BasicAuth {
    fn recently_verified(&self, key: &[u8; 32]) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified
            .get(key)
            .is_some_and(|&until| Instant::now() < until)
    }

    fn remember(&self, key: [u8; 32]) {
        let now = Instant::now();
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= CACHE_MAX {
            verified.retain(|_, until| now < *until);
            if verified.len() >= CACHE_MAX {
                verified.clear();
            }
        }
        verified.insert(key, now + CACHE_TTL);
    }

    fn allow(&self, req: &mut request::Parts, ctx: &mut Context, subject: &Arc<str>) {
        ctx.subject = Some(Arc::clone(subject));
        if self.strip {
            req.headers.remove(AUTHORIZATION);
        }
    }
}

impl Middleware for BasicAuth {
    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
        let (user, password) = match credentials(req.headers.get(AUTHORIZATION)) {
            Ok(given) => given,
            Err(reason) => {
                let message = if reason == Reason::MissingCredentials {
                    "missing Basic credentials"
                } else {
                    "malformed Basic credentials"
                };
                return Flow::Reject(unauthorized(&self.challenge, reason, message));
            }
        };
        let key = digest(&[user.as_bytes(), password.as_bytes()]);
        let known = self.users.get(user.as_str());
        if let Some((subject, _)) = known.filter(|_| self.recently_verified(&key)) {
            self.allow(req, ctx, subject);
            return Flow::Continue;
        }
        let hash = known.map_or(&self.decoy, |(_, h)| h).clone();
        Flow::wait(async move {
            let ok = tokio::task::spawn_blocking(move || hash.verify(password.as_bytes()))
                .await
                .unwrap_or(false);
            match known {
                Some((subject, _)) if ok => {
                    self.remember(key);
                    self.allow(req, ctx, subject);
                    Flow::Continue
                }
                _ => Flow::Reject(unauthorized(
                    &self.challenge,
                    Reason::InvalidCredentials,
                    "invalid user name or password",
                )),
            }
        })
    }
}

/// `Basic base64(user:password)` → (user, password). Otherwise the refusal's reason: no
/// header, or another scheme, is missing credentials; a Basic value that does not decode
/// to `user:password` is invalid.
fn credentials(value: Option<&HeaderValue>) -> Result<(String, String), Reason> {
    let value = value.ok_or(Reason::MissingCredentials)?;
    let text = value
        .to_str()
        .map_err(|_| Reason::InvalidCredentials)?
        .trim();
    let (scheme, encoded) = text.split_once(' ').unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(Reason::MissingCredentials);
    }
    base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|decoded| String::from_utf8(decoded).ok())
        .and_then(|decoded| {
            let (user, password) = decoded.split_once(':')?;
            Some((user.to_owned(), password.to_owned()))
        })
        .ok_or(Reason::InvalidCredentials)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse() {
        let v = |s: &'static str| credentials(Some(&HeaderValue::from_static(s)));
        assert_eq!(v("Basic YWxpY2U6cDpx"), Ok(("alice".into(), "p:q".into())));
        assert_eq!(v("basic  YWxpY2U6"), Ok(("alice".into(), "".into())));
        assert_eq!(credentials(None), Err(Reason::MissingCredentials));
        assert_eq!(v("Bearer YWxpY2U6cDpx"), Err(Reason::MissingCredentials));
        assert_eq!(v("Basic !!!"), Err(Reason::InvalidCredentials));
        assert_eq!(v("Basic"), Err(Reason::InvalidCredentials));
        assert_eq!(v("Basic YWxpY2U="), Err(Reason::InvalidCredentials)); // no colon
    }

    #[test]
    fn hashes_recognised_and_plaintext_refused() {
        let bcrypt = "$2y$04$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW";
        assert!(matches!(bcrypt.parse(), Ok(PasswordHash::Bcrypt(_))));
        assert!("hunter2".parse::<PasswordHash>().is_err());
        assert!("$2y$garbage".parse::<PasswordHash>().is_err());
        assert!("$argon2id$nope".parse::<PasswordHash>().is_err());
        assert!("$apr1$xyz$abc".parse::<PasswordHash>().is_err());
    }

    #[test]
    fn verification_cache_is_bounded() {
        let hash: PasswordHash = "$2y$04$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"
            .parse()
            .unwrap();
        let m = BasicAuth {
            users: HashMap::new(),
            decoy: hash,
            challenge: HeaderValue::from_static("Basic"),
            strip: true,
            verified: Mutex::new(HashMap::new()),
        };
        let key = |i: usize| digest(&[b"u", i.to_string().as_bytes()]);
        m.remember(key(0));
        assert!(m.recently_verified(&key(0)));
        assert!(!m.recently_verified(&key(1)));
        for i in 1..=CACHE_MAX {
            m.remember(key(i));
        }
        let len = m.verified.lock().unwrap().len();
        assert!(len <= CACHE_MAX, "{len}");
        assert!(m.recently_verified(&key(CACHE_MAX)));
    }

    fn parse_htpasswd(bytes: &[u8]) -> Result<Vec<User>, String> {
        Vec::<User>::parse(bytes.to_vec())
    }

    #[test]
    fn htpasswd_lines() {
        let users = parse_htpasswd(
            b"# team\n\nbob:$2y$04$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW\n",
        )
        .unwrap();
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].user, "bob");
        let err = parse_htpasswd(b"carol:plain\n").unwrap_err();
        assert!(
            err.starts_with("line 1 (user \"carol\"): expected a bcrypt"),
            "{err}"
        );
        assert!(parse_htpasswd(b"nocolon\n").is_err());
    }
}
