//! What an `authorize` policy costs on the request path: 20 rules over a verified JWT's
//! claims, the request decided by the last one (every rule evaluated), with the claims
//! shared between requests as the `jwt` cache shares them. `cargo bench --bench authorize`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use gatehouse::chain::{Claims, Context, Flow};
use gatehouse::config::Entries;
use gatehouse::middleware::{Build, Handles, Spec};

// The server's allocator: the interpreter allocates small values as it evaluates.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// 19 rules that do not match a reader's `GET /v1/items` (each reading claims, the path
/// or the method), then the one that allows it.
fn rules() -> String {
    let mut rules = Vec::new();
    for i in 0..19 {
        let expression = match i % 4 {
            0 => format!("request.path.startsWith('/admin/{i}/') && 'admin' in claims.roles"),
            1 => format!("claims.tenant == 'tenant-{i}' && request.method == 'DELETE'"),
            2 => format!("subject == 'blocked-{i}'"),
            _ => format!("request.method == 'PATCH' && 'writer-{i}' in claims.roles"),
        };
        rules.push(format!(
            "{{ name = \"rule-{i}\", allow = \"{expression}\" }}"
        ));
    }
    rules.push(
        "{ name = \"readers\", allow = \"request.method in ['GET', 'HEAD'] && 'read' in claims.scope.split(' ')\" }"
            .to_owned(),
    );
    format!("rules = [\n{}\n]\n", rules.join(",\n"))
}

fn authorize(c: &mut Criterion) {
    let value: toml::Value = toml::from_str(&rules()).unwrap();
    let middleware = Spec::parse("authorize", value).unwrap().build(&Build {
        name: "authorize",
        handles: &Handles::offline(),
        response_headers: &[],
    });
    let claims = serde_json::json!({
        "sub": "alice", "iss": "https://idp.test", "aud": "api", "exp": 4_102_444_800u64,
        "scope": "read write", "roles": ["reader", "auditor"], "tenant": "acme",
    });
    let serde_json::Value::Object(claims) = claims else {
        unreachable!()
    };
    let claims = Arc::new(Claims::new(claims));
    c.bench_function("authorize_20_rules_jwt_claims", |b| {
        b.iter_batched_ref(
            || {
                let req = http::Request::get("/v1/items")
                    .header("authorization", "Bearer x")
                    .body(())
                    .unwrap();
                let mut ctx = Context::new(
                    [127, 0, 0, 1].into(),
                    [127, 0, 0, 1].into(),
                    false,
                    Instant::now(),
                    0,
                );
                ctx.subject = Some("alice".into());
                ctx.claims = Some(Arc::clone(&claims));
                (req.into_parts().0, ctx)
            },
            |(parts, ctx)| match middleware.on_request(parts, ctx) {
                Flow::Continue => black_box(()),
                _ => panic!("the last rule allows the request"),
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, authorize);
criterion_main!(benches);
