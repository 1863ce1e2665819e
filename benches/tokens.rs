//! The cost of a prompt-token count on the request path: Switchyard's estimator
//! (`switchyard::tokens`) against a real BPE (`tiktoken-rs`, `o200k_base`) on the same
//! 100 KiB prompt of mixed content, the old characters / 4 rule for scale, the whole
//! metadata read of a chat body carrying that prompt, and the BPE's one-time load.
//!
//! `cargo bench --bench tokens` (about a minute once built).

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use switchyard::request::RequestMeta;
use switchyard::tokens::{estimate, TokenEstimate};

/// The prompt size the README reports.
const PROMPT_BYTES: usize = 100 * 1024;

/// About 100 KiB cut at character boundaries from, in turn: the README (prose), the proxy
/// and a policy (code), the Grafana dashboard (JSON), and the multilingual and emoji
/// fixtures — a mixed prompt that is the same on every run.
fn mixed_prompt() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).expect("bench source file");
    let mut multilingual = String::new();
    for f in [
        "fr", "de", "es", "it", "pl", "ru", "el", "zh", "ja", "ko", "hi", "emoji",
    ] {
        multilingual.push_str(&read(&format!("tests/data/tokens/{f}.txt")));
    }
    // (source, share of the prompt in percent)
    let parts = [
        (read("README.md"), 40),
        (read("src/proxy.rs") + &read("policies/cost.lua"), 30),
        (read("conf/grafana/switchyard.json"), 10),
        (multilingual, 20),
    ];
    let mut prompt = String::with_capacity(PROMPT_BYTES + 64);
    for (text, percent) in parts {
        let want = PROMPT_BYTES * percent / 100;
        let mut taken = 0;
        while taken < want {
            let mut end = (want - taken).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            prompt.push_str(&text[..end]);
            taken += end;
        }
    }
    prompt
}

/// Resident memory of this process in KiB (Linux), to show what the BPE tables take.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn count_tokens(c: &mut Criterion) {
    let prompt = mixed_prompt();
    let rss_before = rss_kib();
    let started = Instant::now();
    let bpe = tiktoken_rs::o200k_base().expect("o200k_base loads");
    let load = started.elapsed();
    if let (Some(before), Some(after)) = (rss_before, rss_kib()) {
        println!(
            "o200k_base tables: {} MiB resident",
            (after.saturating_sub(before)) / 1024
        );
    }
    let truth = bpe.encode_ordinary(&prompt).len();
    let estimated = estimate(&prompt);
    println!(
        "mixed prompt: {} bytes, o200k_base {truth} tokens, estimate {estimated} ({:.3}), \
         characters / 4 {} ({:.3}); o200k_base load {load:.0?}",
        prompt.len(),
        estimated as f64 / truth as f64,
        prompt.chars().count().div_ceil(4),
        prompt.chars().count().div_ceil(4) as f64 / truth as f64,
    );

    let mut group = c.benchmark_group("tokens_100KiB");
    group.throughput(Throughput::Bytes(prompt.len() as u64));
    group.bench_function("estimate", |b| {
        b.iter(|| {
            let mut e = TokenEstimate::default();
            e.add(black_box(&prompt));
            e.tokens()
        })
    });
    group.bench_function("chars_div_4", |b| {
        b.iter(|| black_box(&prompt).chars().count().div_ceil(4))
    });
    group.bench_function("o200k_encode_ordinary", |b| {
        b.iter(|| bpe.encode_ordinary(black_box(&prompt)).len())
    });
    group.finish();

    // A small chat request: ten messages of about 400 bytes.
    let mut group = c.benchmark_group("tokens_4KiB");
    let messages: Vec<&str> = (0..10)
        .map(|i| {
            let (mut from, mut to) = (i * 10_000, i * 10_000 + 410);
            while !prompt.is_char_boundary(from) {
                from += 1;
            }
            while !prompt.is_char_boundary(to) {
                to += 1;
            }
            &prompt[from..to]
        })
        .collect();
    group.throughput(Throughput::Bytes(
        messages.iter().map(|m| m.len() as u64).sum(),
    ));
    group.bench_function("estimate_10_messages", |b| {
        b.iter(|| {
            let mut e = TokenEstimate::default();
            for m in &messages {
                e.add(black_box(m));
            }
            e.tokens()
        })
    });
    group.bench_function("o200k_10_messages", |b| {
        b.iter(|| {
            messages
                .iter()
                .map(|m| bpe.encode_ordinary(black_box(m)).len())
                .sum::<usize>()
        })
    });
    group.finish();

    // What the proxy does per request: the whole metadata read of a chat body with this
    // prompt as its one user message.
    let body: bytes::Bytes = serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "max_tokens": 512,
        "messages": [{ "role": "user", "content": prompt }],
    }))
    .expect("body serialises")
    .into();
    let head = RequestMeta::from_head(
        &http::Method::POST,
        "/v1/chat/completions",
        &http::HeaderMap::new(),
    );
    let mut check = head.clone();
    check.read_json_body(&body).expect("bench body is valid");
    assert_eq!(check.tokens(), estimated);
    let mut group = c.benchmark_group("read_json_body_100KiB_prompt");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("with_estimate", |b| {
        b.iter(|| {
            let mut meta = head.clone();
            meta.read_json_body(black_box(&body)).expect("parse");
            // Both are worked out on first use; a policy or limit would ask for them.
            black_box(meta.tokens());
            black_box(meta.session().is_some());
            meta
        })
    });
    group.finish();
}

/// The BPE tables' one-time load: parsing the embedded `o200k_base` ranks into maps and
/// compiling the pre-tokenizer regex.
fn load_bpe(c: &mut Criterion) {
    let mut group = c.benchmark_group("o200k_base_load");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("o200k_base", |b| {
        b.iter(|| tiktoken_rs::o200k_base().expect("loads"))
    });
    group.finish();
}

fn quick() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = quick();
    targets = count_tokens, load_bpe
}
criterion_main!(benches);
