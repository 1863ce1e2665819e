//! Micro-benchmarks of the per-request work Switchyard adds before it picks an upstream:
//! one Lua policy decision over 32 candidates, and reading the routing fields out of a
//! chat-completions body.
//!
//! `cargo bench --bench policy` (under a minute once built). Target: the median of a
//! decision over 32 candidates ≤ 5 µs.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use switchyard::backends::{BackendSet, InflightGuard};
use switchyard::config::Config;
use switchyard::policy::{decide, Decision, Policy};
use switchyard::request::RequestMeta;
use switchyard::routes::Params;

/// Candidate backends in the decision benchmarks: the target case (32), and a small pool
/// like the load test's (3) to separate the per-call cost from the per-backend one.
const BACKEND_COUNTS: [usize; 2] = [32, 3];

/// A config with `backends` backends `b0..` serving model `m`, routed by `policy`.
fn config(policy: &str, backends: usize) -> Config {
    let mut yaml = format!(
        "listen: [{{ addr: \"127.0.0.1:8080\" }}]\n\
         policies_dir: {}/policies\n\
         routes:\n  - policy: {policy}\n\
         backends:\n",
        env!("CARGO_MANIFEST_DIR")
    );
    for i in 0..backends {
        yaml.push_str(&format!(
            "  - {{ name: b{i}, url: \"http://127.0.0.1:{}\", models: [m] }}\n",
            9000 + i
        ));
    }
    Config::parse(&yaml).expect("bench config is valid")
}

/// A small chat request, as the proxy would have read it.
fn small_request() -> Arc<RequestMeta> {
    let mut meta = RequestMeta::from_head(
        &http::Method::POST,
        "/v1/chat/completions",
        &http::HeaderMap::new(),
    );
    meta.read_json_body(&bytes::Bytes::from_static(
        br#"{"model":"m","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"hello there"}]}"#,
    ))
    .expect("bench body is valid");
    Arc::new(meta)
}

fn policy_decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    for (name, n) in ["round_robin", "least_inflight"]
        .into_iter()
        .flat_map(|p| BACKEND_COUNTS.map(|n| (p, n)))
    {
        let config = config(name, n);
        let set = Arc::new(BackendSet::build(&config, None).expect("backends build"));
        // Uneven, repeating in-flight counts (0..=10) so least_inflight has ties to break and
        // an order to sort; held for the whole benchmark.
        let _inflight: Vec<InflightGuard> = set
            .backends
            .iter()
            .enumerate()
            .flat_map(|(i, b)| (0..(i * 7) % 11).map(|_| b.stats.start()))
            .collect();
        let candidates = set.serving(Some("m"));
        assert_eq!(candidates.len(), n);
        let path = config.policies_dir.join(format!("{name}.lua"));
        let policy = Policy::read(&path).expect("policy file reads");
        let req = small_request();
        // The route has no `params`, as in the bench config.
        let params = Params::new(Default::default());

        // As the proxy calls it: a route with the default 3 attempts reads 3 + 2 names.
        let max_names = 5;
        // One call outside the timing loop: loads the policy into this thread's VM and
        // checks the decision is what a proxy would act on.
        match decide(
            &policy,
            &req,
            &params,
            &candidates,
            &set,
            &config.lua,
            max_names,
        ) {
            Ok(Decision::Candidates(chosen)) => assert_eq!(chosen.len(), n.min(4)),
            other => panic!("{name}: unexpected decision {other:?}"),
        }

        group.bench_function(BenchmarkId::new(name, format!("{n}_backends")), |b| {
            b.iter(|| {
                decide(
                    black_box(&policy),
                    black_box(&req),
                    &params,
                    black_box(&candidates),
                    &set,
                    &config.lua,
                    max_names,
                )
                .expect("decision")
            })
        });
    }
    group.finish();
}

/// A deterministic chat body of about `target_bytes`: a system prompt, then alternating
/// user and assistant turns of English-like prose.
fn chat_body(target_bytes: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the",
        "of",
        "and",
        "to",
        "a",
        "in",
        "is",
        "that",
        "for",
        "it",
        "as",
        "with",
        "on",
        "be",
        "this",
        "by",
        "are",
        "from",
        "or",
        "an",
        "which",
        "can",
        "request",
        "model",
        "backend",
        "latency",
        "throughput",
        "routing",
        "policy",
        "answer",
        "question",
        "please",
        "explain",
        "why",
        "because",
        "server",
        "token",
        "stream",
        "example",
        "function",
        "however",
        "usually",
        "between",
        "several",
        "different",
        "results",
        "\"quoted\"",
        "line\nbreak",
        "café",
        "naïve",
        "100%",
        "x/y",
    ];
    // xorshift: cheap, and the same text on every run.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next_word = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        WORDS[(state % WORDS.len() as u64) as usize]
    };
    let mut sentence_block = |bytes: usize| {
        let mut text = String::with_capacity(bytes + 16);
        let mut in_sentence = 0;
        while text.len() < bytes {
            let w = next_word();
            if in_sentence == 0 {
                let mut cs = w.chars();
                if let Some(f) = cs.next() {
                    text.extend(f.to_uppercase());
                    text.push_str(cs.as_str());
                }
            } else {
                text.push_str(w);
            }
            in_sentence += 1;
            if in_sentence > 12 && w.len() > 3 {
                text.push_str(". ");
                in_sentence = 0;
            } else {
                text.push(' ');
            }
        }
        text
    };

    let mut messages = vec![serde_json::json!({
        "role": "system",
        "content": sentence_block(600),
    })];
    // Eight turns, so the message array stays realistic whatever the target size.
    let turn_bytes = target_bytes.saturating_sub(800) / 8;
    for turn in 0..8 {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        messages.push(serde_json::json!({ "role": role, "content": sentence_block(turn_bytes) }));
    }
    let body = serde_json::json!({
        "model": "m",
        "messages": messages,
        "temperature": 0.2,
        "max_tokens": 512,
        "stream": false,
    });
    serde_json::to_vec(&body).expect("body serialises")
}

fn request_metadata(c: &mut Criterion) {
    let mut group = c.benchmark_group("read_json_body");
    let head = RequestMeta::from_head(
        &http::Method::POST,
        "/v1/chat/completions",
        &http::HeaderMap::new(),
    );
    for (label, size) in [("4KiB", 4 * 1024), ("256KiB", 256 * 1024)] {
        let body = bytes::Bytes::from(chat_body(size));
        let mut check = head.clone();
        check.read_json_body(&body).expect("bench body is valid");
        assert_eq!(check.model.as_deref(), Some("m"));
        assert!(check.tokens() > 0 && check.session().is_some());

        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(BenchmarkId::new(label, body.len()), |b| {
            b.iter(|| {
                let mut meta = head.clone();
                meta.read_json_body(black_box(&body)).expect("parse");
                // The estimate and the session key are worked out on first use; a policy
                // or limit would ask for them.
                black_box(meta.tokens());
                black_box(meta.session().is_some());
                meta
            })
        });
    }
    group.finish();
}

fn quick() -> Criterion {
    Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = quick();
    targets = policy_decision, request_metadata
}
criterion_main!(benches);
