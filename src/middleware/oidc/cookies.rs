//! The browser's side: the session cookie (split into chunks when large) and the sign-in's
//! `state` cookie, sealed with XChaCha20-Poly1305 under the cookie secret, the cookie's name
//! being the associated data.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use http::{request, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::middleware::auth::cookie;

/// A cookie value longer than this is split into `<name>_0`, `<name>_1`...: browsers keep
/// at most about 4 KiB per cookie, name and attributes included.
pub(super) const CHUNK: usize = 3500;
/// The most chunks a session may take (and that a request's cookies are searched for).
pub(super) const MAX_CHUNKS: usize = 8;

/// The cookies of one `oidc` middleware.
pub(super) struct Jar {
    /// The session cookie's name (`cookie_name`).
    pub(super) name: String,
    /// The sign-in's `state` cookie: `<cookie_name>_state`.
    pub(super) state: String,
    /// `; Path=/; HttpOnly; SameSite=Lax[; Secure]`.
    pub(super) attributes: String,
    /// The cookie secret's cipher first, then the previous ones'.
    pub(super) openers: Vec<XChaCha20Poly1305>,
}

impl Jar {
    /// `value` sealed for the cookie `name` (its associated data).
    pub(super) fn seal(&self, name: &str, value: &impl Serialize) -> String {
        let plain = serde_json::to_vec(value).expect("plain data serializes");
        let mut nonce = [0u8; 24];
        OsRng.fill_bytes(&mut nonce);
        let sealed = self.openers[0]
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: name.as_bytes(),
                },
            )
            .expect("sealing in memory does not fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// The value sealed in a cookie `name`, if one of the secrets opens it.
    pub(super) fn open<T: for<'de> Deserialize<'de>>(&self, name: &str, value: &str) -> Option<T> {
        let bytes = URL_SAFE_NO_PAD.decode(value).ok()?;
        if bytes.len() < 24 + 16 {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(24);
        let nonce = XNonce::from(<[u8; 24]>::try_from(nonce).expect("24 bytes"));
        let plain = self.openers.iter().find_map(|c| {
            let payload = Payload {
                msg: sealed,
                aad: name.as_bytes(),
            };
            c.decrypt(&nonce, payload).ok()
        })?;
        serde_json::from_slice(&plain).ok()
    }

    pub(super) fn set_cookie(&self, name: &str, value: &str, max_age: u64) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "{name}={value}{}; Max-Age={max_age}",
            self.attributes
        ))
        .expect("cookie names, base64 and attributes are valid header text")
    }

    fn chunk_name(&self, i: usize) -> String {
        format!("{}_{i}", self.name)
    }

    /// The request's sealed session value: the cookie itself, or its chunks joined.
    pub(super) fn session_value(&self, req: &request::Parts) -> Option<String> {
        if let Some(v) = cookie(req, &self.name) {
            return Some(v.to_owned());
        }
        let mut joined = String::new();
        for i in 0..MAX_CHUNKS {
            match cookie(req, &self.chunk_name(i)) {
                Some(part) => joined.push_str(part),
                None => break,
            }
        }
        (!joined.is_empty()).then_some(joined)
    }

    /// The `set-cookie` values that store `sealed` (split when large, for `max_age`
    /// seconds) and expire the request's other session cookies; `Err` with its size when
    /// it does not fit in [`MAX_CHUNKS`] cookies.
    pub(super) fn session(
        &self,
        req: &request::Parts,
        sealed: &str,
        max_age: u64,
    ) -> Result<Vec<HeaderValue>, usize> {
        if sealed.len() > CHUNK * MAX_CHUNKS {
            return Err(sealed.len());
        }
        let mut out = Vec::new();
        let mut written = Vec::new();
        if sealed.len() <= CHUNK {
            out.push(self.set_cookie(&self.name, sealed, max_age));
            written.push(self.name.clone());
        } else {
            for (i, part) in sealed.as_bytes().chunks(CHUNK).enumerate() {
                let name = self.chunk_name(i);
                let part = std::str::from_utf8(part).expect("base64 is ASCII");
                out.push(self.set_cookie(&name, part, max_age));
                written.push(name);
            }
        }
        out.extend(
            self.present(req)
                .filter(|name| !written.contains(name))
                .map(|name| self.set_cookie(&name, "", 0)),
        );
        Ok(out)
    }

    /// The names of the session cookies (whole or chunks) the request carries.
    fn present<'a>(&'a self, req: &'a request::Parts) -> impl Iterator<Item = String> + 'a {
        std::iter::once(self.name.clone())
            .chain((0..MAX_CHUNKS).map(|i| self.chunk_name(i)))
            .filter(|name| cookie(req, name).is_some())
    }

    /// `set-cookie` values that expire every session cookie the request carries.
    pub(super) fn clear(&self, req: &request::Parts) -> Vec<HeaderValue> {
        self.present(req)
            .map(|name| self.set_cookie(&name, "", 0))
            .collect()
    }
}
