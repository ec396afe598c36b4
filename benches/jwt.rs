//! What an authentication check costs on the request path, with keys already loaded:
//! the `jwt` middleware (HS256, RS256, ES256) verifying every time (`cache_size = 0`), the
//! repeated-token case served from its cache (RS256, ES256), and, for comparison, `api_key`.
//! `cargo bench --bench jwt`.

use std::hint::black_box;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use gatehouse::chain::{Context, Flow, Middleware};
use gatehouse::config::Entries;
use gatehouse::middleware::{Build, Handles, Spec};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn build(kind: &str, settings: &str) -> Box<dyn Middleware> {
    let value: toml::Value = toml::from_str(settings).unwrap();
    Spec::parse(kind, value).unwrap().build(&Build {
        name: kind,
        handles: &Handles::offline(),
        response_headers: &[],
    })
}

fn token(alg: Algorithm, key: &EncodingKey) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({
        "sub": "alice", "iss": "https://idp.test", "aud": "api", "exp": exp, "scope": "read write",
    });
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

/// Times one request phase that must let the request through synchronously.
fn check(c: &mut Criterion, name: &str, middleware: &dyn Middleware, header: (&str, &str)) {
    c.bench_function(name, |b| {
        b.iter_batched_ref(
            || {
                let req = http::Request::get("/v1/items")
                    .header(header.0, header.1)
                    .body(())
                    .unwrap();
                let ctx = Context::new(
                    [127, 0, 0, 1].into(),
                    [127, 0, 0, 1].into(),
                    false,
                    Instant::now(),
                    0,
                );
                (req.into_parts().0, ctx)
            },
            |(parts, ctx)| match middleware.on_request(parts, ctx) {
                Flow::Continue => black_box(()),
                _ => panic!("{name}: the request was not let through"),
            },
            BatchSize::SmallInput,
        )
    });
}

fn jwt(c: &mut Criterion) {
    let common = r#"
issuer = "https://idp.test"
audiences = ["api"]
require_claims = { scope = "read" }
forward_claims = { sub = "x-auth-subject" }
"#;
    // (name, algorithm, key source, signing key, also bench the cached path)
    let cases = [
        (
            "jwt_hs256",
            Algorithm::HS256,
            "secret = \"bench-secret\"".to_owned(),
            EncodingKey::from_secret(b"bench-secret"),
            false,
        ),
        (
            "jwt_rs256",
            Algorithm::RS256,
            format!("public_key_file = \"{}\"", fixture("rsa_public.pem")),
            EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap(),
            true,
        ),
        (
            "jwt_es256",
            Algorithm::ES256,
            format!("public_key_file = \"{}\"", fixture("ec_public.pem")),
            EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_private.pem")).unwrap()).unwrap(),
            true,
        ),
    ];
    for (name, alg, source, key, cached) in cases {
        let settings = format!("algorithms = [\"{alg:?}\"]\n{source}\n{common}");
        let bearer = format!("Bearer {}", token(alg, &key));
        let m = build("jwt", &format!("{settings}cache_size = 0\n"));
        check(c, name, &*m, ("authorization", &bearer));
        if cached {
            // The same token every time, as one client sends it: verified once, then cached.
            let m = build("jwt", &settings);
            check(
                c,
                &format!("{name}_cached"),
                &*m,
                ("authorization", &bearer),
            );
        }
    }
    let m = build(
        "api_key",
        "keys = [{ id = \"bench\", key = \"k-0123456789abcdef\" }]",
    );
    check(c, "api_key", &*m, ("x-api-key", "k-0123456789abcdef"));
}

criterion_group!(benches, jwt);
criterion_main!(benches);
