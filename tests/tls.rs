//! TLS and HTTP/2 on the wire, with certificates generated here (rcgen):
//! - a TLS listener serves HTTP/2 (ALPN) and HTTP/1.1, plain and streamed, to curl, reqwest
//!   and h2load; the cleartext listener keeps serving HTTP/1.1;
//! - a certificate swapped on disk is served on new connections without a restart (file
//!   watcher, and `SIGHUP` for changes the watcher cannot see); a broken or mismatched one
//!   is refused and the old one keeps serving; bad files are refused at start-up by path;
//! - `https://` backends (the mock in TLS mode) are verified: an untrusted certificate or a
//!   wrong name is a 502 with a typed code and nothing reaches the backend, a CA from
//!   `ca_file` is trusted, SNI is the URL host; `http2: true` speaks HTTP/2 over TLS and h2c;
//! - an HTTP/2 client that sends no preface, or no complete request, is let go.
//!
//! Needs curl with HTTP/2 and h2load; `tests/tls/setup.sh` installs what is missing and
//! this test fails — it does not skip — when they cannot be had.

mod common;

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::Value;

use common::*;

/// A test certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate and its key, PEM, and the certificate's DER (what a client sees).
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    fn issue(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "switchyard test");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Replace a file by renaming a fully written one over it, as deploy tools do.
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write_leaf(dir: &Path, leaf: &Leaf) {
    std::fs::create_dir_all(dir).unwrap();
    replace_file(&dir.join("cert.pem"), &leaf.cert_pem);
    replace_file(&dir.join("key.pem"), &leaf.key_pem);
}

/// `tests/tls/setup.sh`: curl with HTTP/2 and h2load.
fn setup() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/setup.sh");
    let status = Command::new("bash").arg(&script).status().unwrap();
    assert!(
        status.success(),
        "tests/tls/setup.sh failed ({status}): this test needs curl with HTTP/2 and h2load \
         (apt-get install curl nghttp2-client); see its message above"
    );
}

/// The proxy with a cleartext listener (`proc.port`), a TLS listener on `tls_port` whose
/// certificate is `tls/cert.pem` and `tls/key.pem` under `dir`, and the admin API.
struct TlsProxy {
    proc: Proc,
    tls_port: u16,
    admin_port: u16,
}

impl TlsProxy {
    async fn start(dir: tempfile::TempDir, backends: &str, extra: &str) -> TlsProxy {
        TlsProxy::start_with_policy(dir, ("round_robin", None), backends, extra).await
    }

    /// With the route's policy named, and its source when it is not a shipped one.
    async fn start_with_policy(
        dir: tempfile::TempDir,
        (policy, source): (&str, Option<&str>),
        backends: &str,
        extra: &str,
    ) -> TlsProxy {
        let (plain_port, tls_port, admin_port) = (free_port(), free_port(), free_port());
        let extra_policies: Vec<(&str, &str)> = source.map(|s| (policy, s)).into_iter().collect();
        let policies = write_policies(dir.path(), &extra_policies);
        let config = format!(
            "listen:\n  - addr: \"127.0.0.1:{plain_port}\"\n  - addr: \"127.0.0.1:{tls_port}\"\n    \
             tls: {{ cert: tls/cert.pem, key: tls/key.pem }}\n\
             admin: {{ addr: \"127.0.0.1:{admin_port}\" }}\n\
             policies_dir: {}\n\
             routes:\n  - match: {{ path_prefix: /v1/ }}\n    policy: {policy}\n\
             backends:\n{backends}\
             proxy:\n  threads: 2\n  grace_period_seconds: 0\n{extra}",
            policies.display()
        );
        let path = dir.path().join("switchyard.yaml");
        std::fs::write(&path, config).unwrap();
        let path = path.to_str().unwrap().to_string();
        let proc = spawn(&["run", "--config", &path], plain_port, Some(dir), &[]);
        wait_ready(&proc.url("/v1/models")).await;
        TlsProxy {
            proc,
            tls_port,
            admin_port,
        }
    }

    fn https(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.tls_port)
    }

    async fn metrics(&self) -> String {
        metrics_text(self.admin_port).await
    }
}

/// A client that trusts only `cas` (PEM) and reports the server certificate it saw.
fn https_client(cas: &[&str]) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .tls_info(true)
        .timeout(Duration::from_secs(30));
    for ca in cas {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

/// The certificate a response's connection was made with (DER).
fn peer_cert(r: &reqwest::Response) -> Vec<u8> {
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("a TLS response carries the peer certificate")
        .to_vec()
}

/// The certificate a brand-new connection to `url` is served with.
/// Wait (10 s at most) until a new connection to `url` is served `expected`; `what` says
/// what should have brought it.
async fn wait_for_cert(url: &str, cas: &[&str], expected: &[u8], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while fresh_connection_cert(url, cas).await != expected {
        assert!(Instant::now() < deadline, "{what} within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fresh_connection_cert(url: &str, cas: &[&str]) -> Vec<u8> {
    let r = https_client(cas).get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    peer_cert(&r)
}

/// Run curl; its stdout. `-w` output is appended after the body.
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A chat body as a file (for curl and h2load).
fn body_file(dir: &Path, name: &str, stream: bool) -> PathBuf {
    let path = dir.join(name);
    let body = chat_body("m", "hello over tls", stream);
    std::fs::write(&path, serde_json::to_vec(&body).unwrap()).unwrap();
    path
}

/// Read a stream; when each read arrived, and the whole text.
async fn timed_stream(r: reqwest::Response) -> (Vec<Duration>, String) {
    let started = Instant::now();
    let mut stream = r.bytes_stream();
    let (mut arrivals, mut text) = (Vec::new(), String::new());
    while let Some(chunk) = stream.next().await {
        arrivals.push(started.elapsed());
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    (arrivals, text)
}

/// Streamed with 5 chunks 200 ms apart: the reads must be spread over the stream's life,
/// not arrive together at its end.
fn assert_chunk_by_chunk(arrivals: &[Duration], text: &str) {
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        arrivals.len() >= 4,
        "expected separate reads, got {}: {text}",
        arrivals.len()
    );
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread >= Duration::from_millis(600),
        "reads {arrivals:?}: the stream was buffered"
    );
}

const SLOW_STREAM: [(&str, &str); 2] = [("x-mock-chunks", "5"), ("x-mock-chunk-delay-ms", "200")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_http2_and_http1_plain_and_streamed_to_curl_reqwest_and_h2load() {
    setup();
    let ca = Ca::new("client-facing test CA");
    let dir = tempfile::tempdir().unwrap();
    write_leaf(
        &dir.path().join("tls"),
        &ca.issue(&["localhost", "127.0.0.1"]),
    );
    let files = tempfile::tempdir().unwrap();
    let ca_file = files.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let ca_arg = ca_file.to_str().unwrap();
    let plain = body_file(files.path(), "plain.json", false);
    let streamed = body_file(files.path(), "stream.json", true);

    let m = mock("m1", &[]).await;
    let p = TlsProxy::start(dir, &backend("m1", m.port, "[m]"), "").await;
    let url = p.https("/v1/chat/completions");

    // curl: HTTP/2 by ALPN, and HTTP/1.1 for a client that asks for it; plain and streamed.
    // A POST of the body in `file`; `shown` is `-i` (with headers) or `-N` (unbuffered).
    let post = |flag: &str, shown: &str, file: &Path| {
        let body_arg = format!("@{}", file.display());
        curl(&[
            flag,
            "--cacert",
            ca_arg,
            shown,
            "-H",
            "content-type: application/json",
            "-d",
            &body_arg,
            "-w",
            "\n%{http_version} %{http_code}",
            &url,
        ])
    };
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = post(flag, "-i", &plain);
        assert!(out.ends_with(&format!("\n{version} 200")), "{flag}: {out}");
        assert!(
            out.to_ascii_lowercase()
                .contains("x-switchyard-backend: m1"),
            "{out}"
        );
        assert!(out.contains("\"object\":\"chat.completion\""), "{out}");

        let out = post(flag, "-N", &streamed);
        assert!(out.ends_with(&format!("\n{version} 200")), "{flag}: {out}");
        let events = out.lines().filter(|l| l.starts_with("data: {")).count();
        assert!(events >= 8, "{flag}: {events} events in {out}");
        assert!(out.contains("data: [DONE]"), "{out}");
    }

    // The cleartext listener still speaks HTTP/1.1.
    let out = curl(&[
        "-w",
        "\n%{http_version} %{http_code}",
        &p.proc.url("/v1/models"),
    ]);
    assert!(out.ends_with("\n1.1 200"), "{out}");

    // reqwest over HTTP/2: a slow stream arrives chunk by chunk, not at its end.
    let https = https_client(&[&ca.pem()]);
    let mut req = https.post(&url).json(&chat_body("m", "hi", true));
    for (k, v) in SLOW_STREAM {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let (arrivals, text) = timed_stream(r).await;
    assert_chunk_by_chunk(&arrivals, &text);

    // h2load: short bounded runs, plain and streamed, over a few multiplexed connections.
    for (body, requests) in [(&plain, "200"), (&streamed, "40")] {
        let out = Command::new("timeout")
            .args(["60", "h2load", "-n", requests, "-c", "4", "-m", "4"])
            .args(["-H", "content-type: application/json", "-d"])
            .arg(body)
            .arg(&url)
            .output()
            .expect("run h2load");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "h2load failed: {text}");
        assert!(text.contains("Application protocol: h2"), "{text}");
        assert!(
            text.contains(&format!(
                "requests: {requests} total, {requests} started, {requests} done, {requests} succeeded, 0 failed"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("status codes: {requests} 2xx")),
            "{text}"
        );
    }
    let served = mock_stats(&m).await;
    // 4 curl requests, 1 reqwest stream and 240 from h2load, each reaching the mock once.
    assert_eq!(served["requests"], 245, "{served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_serves_new_connections_and_a_bad_one_is_refused() {
    let (ca1, ca2) = (Ca::new("first test CA"), Ca::new("second test CA"));
    let (first, second) = (ca1.issue(&["localhost"]), ca2.issue(&["localhost"]));
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    write_leaf(&tls_dir, &first);
    let m = mock("m1", &[]).await;
    let p = TlsProxy::start(dir, &backend("m1", m.port, "[m]"), "").await;
    let models = p.https("/v1/models");
    let (pem1, pem2) = (ca1.pem(), ca2.pem());
    let both: [&str; 2] = [&pem1, &pem2];
    assert_eq!(fresh_connection_cert(&models, &both).await, first.der);

    // A stream open across the swap keeps its connection and finishes intact.
    let mut req = https_client(&both)
        .post(p.https("/v1/chat/completions"))
        .json(&chat_body("m", "hi", true));
    for (k, v) in SLOW_STREAM {
        req = req.header(k, v);
    }
    let open = req.send().await.unwrap();
    assert_eq!(peer_cert(&open), first.der);
    let open = tokio::spawn(timed_stream(open));

    write_leaf(&tls_dir, &second);
    wait_for_cert(
        &models,
        &both,
        &second.der,
        "the new certificate was not served",
    )
    .await;
    // A client trusting only the new CA connects; one trusting only the old CA no longer does.
    assert_eq!(fresh_connection_cert(&models, &[&pem2]).await, second.der);
    assert!(https_client(&[&pem1]).get(&models).send().await.is_err());
    let (arrivals, text) = open.await.unwrap();
    assert_chunk_by_chunk(&arrivals, &text);

    // A broken certificate file, then a certificate whose key is not the one on disk: both
    // refused and logged, the second pair keeps serving.
    let refusals = |why: &str| p.proc.output().matches(why).count();
    for (bad_cert, why) in [
        (
            "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n".to_string(),
            "no usable PEM certificate",
        ),
        (
            ca1.issue(&["localhost"]).cert_pem,
            "does not belong to the certificate",
        ),
    ] {
        let before = refusals(why);
        replace_file(&tls_dir.join("cert.pem"), &bad_cert);
        let deadline = Instant::now() + Duration::from_secs(10);
        while refusals(why) == before {
            assert!(
                Instant::now() < deadline,
                "no refusal logged:\n{}",
                p.proc.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            p.proc
                .output()
                .contains("certificate refused, the old one keeps serving"),
            "{}",
            p.proc.output()
        );
        assert_eq!(fresh_connection_cert(&models, &both).await, second.der);
    }
    let metrics = p.metrics().await;
    let listener = format!("127.0.0.1:{}", p.tls_port);
    let count = |result: &str| -> u64 {
        let series = format!(
            "switchyard_tls_certificate_reloads_total{{listener=\"{listener}\",result=\"{result}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    assert_eq!(count("loaded"), 1, "{metrics}");
    // Two refusals, plus possibly the moment between the swap's two renames.
    assert!((2..=3).contains(&count("rejected")), "{metrics}");

    // The refused pair on disk does not hold back a config change: listeners do not change
    // on a reload, so their files are not the config's to judge.
    let config = p.proc.dir().join("switchyard.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("models: [m]", "models: [m, m2]")).unwrap();
    let report: Value = client()
        .post(format!("http://127.0.0.1:{}/admin/reload", p.admin_port))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["config_errors"], serde_json::json!([]), "{report}");
    // The pair still refused is reported as such on every reload, not only the first.
    assert!(
        report["certificate_errors"]
            .to_string()
            .contains("does not belong to the certificate"),
        "{report}"
    );
    let listed = get_json(p.proc.url("/v1/models")).await.to_string();
    assert!(listed.contains("\"m2\""), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_certificate_files_the_watcher_cannot_see() {
    // The listener's files are symlinks into a directory that is not watched (how secret
    // volumes are often mounted): only SIGHUP makes the proxy look again.
    let ca = Ca::new("test CA");
    let (first, second) = (ca.issue(&["localhost"]), ca.issue(&["localhost"]));
    let dir = tempfile::tempdir().unwrap();
    let real = tempfile::tempdir().unwrap();
    write_leaf(real.path(), &first);
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    for name in ["cert.pem", "key.pem"] {
        std::os::unix::fs::symlink(real.path().join(name), tls_dir.join(name)).unwrap();
    }
    let m = mock("m1", &[]).await;
    let p = TlsProxy::start(dir, &backend("m1", m.port, "[m]"), "").await;
    let models = p.https("/v1/models");
    let pem = ca.pem();
    assert_eq!(fresh_connection_cert(&models, &[&pem]).await, first.der);
    // Once the proxy watches its files, it has looked at them once more and will not again
    // until told.
    p.proc.wait_log("watching ").await;

    write_leaf(real.path(), &second);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        fresh_connection_cert(&models, &[&pem]).await,
        first.der,
        "nothing should have noticed the change yet"
    );
    p.proc.signal("HUP");
    wait_for_cert(
        &models,
        &[&pem],
        &second.der,
        "SIGHUP did not bring the new certificate",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_volume_swap_brings_the_new_certificate_without_a_signal() {
    // As the kubelet lays out a Secret volume: the visible files are symlinks through
    // `..data`, a symlink to a hidden directory; an update renames a new `..data` over it.
    let ca = Ca::new("test CA");
    let (first, second) = (ca.issue(&["localhost"]), ca.issue(&["localhost"]));
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    for (version, leaf) in [("..v1", &first), ("..v2", &second)] {
        std::fs::create_dir_all(tls_dir.join(version)).unwrap();
        write_leaf(&tls_dir.join(version), leaf);
    }
    std::os::unix::fs::symlink("..v1", tls_dir.join("..data")).unwrap();
    for name in ["cert.pem", "key.pem"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), tls_dir.join(name)).unwrap();
    }
    let m = mock("m1", &[]).await;
    let p = TlsProxy::start(dir, &backend("m1", m.port, "[m]"), "").await;
    let models = p.https("/v1/models");
    let pem = ca.pem();
    assert_eq!(fresh_connection_cert(&models, &[&pem]).await, first.der);

    std::os::unix::fs::symlink("..v2", tls_dir.join("..data_tmp")).unwrap();
    std::fs::rename(tls_dir.join("..data_tmp"), tls_dir.join("..data")).unwrap();
    wait_for_cert(
        &models,
        &[&pem],
        &second.der,
        "the volume swap did not bring the new certificate",
    )
    .await;
}

#[test]
fn unreadable_or_mismatched_certificate_files_are_refused_at_start_by_path() {
    let ca = Ca::new("test CA");
    let (a, b) = (ca.issue(&["localhost"]), ca.issue(&["localhost"]));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("a.pem"), &a.cert_pem).unwrap();
    std::fs::write(d.join("b.key"), &b.key_pem).unwrap();
    std::fs::write(d.join("garbage.pem"), "hello\n").unwrap();
    let yaml = |listen_tls: &str, backend_extra: &str| {
        format!(
            "listen:\n  - addr: 127.0.0.1:1\n    tls: {listen_tls}\n\
             routes:\n  - policy: round_robin\n\
             backends:\n  - name: a\n    url: https://127.0.0.1:9\n    models: [m]\n{backend_extra}"
        )
    };
    let missing = d.join("missing.pem");
    let err = refused_config(
        &yaml(
            &format!(
                "{{ cert: {}, key: {} }}",
                missing.display(),
                d.join("b.key").display()
            ),
            &format!("    ca_file: {}\n", d.join("garbage.pem").display()),
        ),
        &[],
    );
    assert!(
        err.contains(&format!("listen[0].tls: cannot read {}", missing.display())),
        "{err}"
    );
    assert!(
        err.contains("backends[0].ca_file:") && err.contains("garbage.pem"),
        "{err}"
    );

    let err = refused_config(
        &yaml(
            &format!(
                "{{ cert: {}, key: {} }}",
                d.join("a.pem").display(),
                d.join("b.key").display()
            ),
            "",
        ),
        &[],
    );
    assert!(
        err.contains("listen[0].tls:") && err.contains("does not belong"),
        "{err}"
    );

    let err = refused_config(
        &format!(
            "routes:\n  - policy: round_robin\nbackends:\n  - name: a\n    url: http://127.0.0.1:9\n    \
             models: [m]\n    ca_file: {}\n",
            d.join("a.pem").display()
        ),
        &[],
    );
    assert!(
        err.contains("backends[0].ca_file: only an https:// backend"),
        "{err}"
    );
}

/// Where `localhost` resolves first, as the proxy resolves a backend's host: a TLS mock
/// listens there.
fn localhost_ip() -> std::net::IpAddr {
    ("localhost", 0)
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap()
        .ip()
}

/// Start the mock in TLS mode with `leaf`; waits until it answers over TLS.
async fn tls_mock(name: &str, leaf: &Leaf, ca_pem: &str, files: &Path) -> Proc {
    let (cert, key) = (
        files.join(format!("{name}.pem")),
        files.join(format!("{name}.key")),
    );
    std::fs::write(&cert, &leaf.cert_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    let port = free_port();
    let port_s = port.to_string();
    let host = localhost_ip().to_string();
    let m = spawn(
        &[
            "mock",
            "--port",
            &port_s,
            "--host",
            &host,
            "--name",
            name,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        port,
        None,
        &[],
    );
    let c = https_client(&[ca_pem]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while c
        .get(format!("https://localhost:{port}/health"))
        .send()
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "TLS mock did not come up:\n{}",
            m.output()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backends_are_verified_an_untrusted_one_is_502_and_a_configured_ca_works() {
    let listener_ca = Ca::new("client-facing test CA");
    let backend_ca = Ca::new("backend test CA");
    let files = tempfile::tempdir().unwrap();
    let ca_file = files.path().join("backend-ca.pem");
    std::fs::write(&ca_file, backend_ca.pem()).unwrap();
    let secure = tls_mock(
        "secure",
        &backend_ca.issue(&["localhost"]),
        &backend_ca.pem(),
        files.path(),
    )
    .await;
    let cleartext = mock("cleartext", &[]).await;
    let backend_pem = backend_ca.pem();
    let secure_stats = format!("https://localhost:{}/mock/stats", secure.port);
    let secure_requests = || async {
        let v: Value = https_client(&[&backend_pem])
            .get(&secure_stats)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["requests"].as_u64().unwrap()
    };

    let ca = ca_file.display();
    let s = secure.port;
    // The mock's address by IP: its certificate names only `localhost`.
    let ip = match localhost_ip() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let backends = format!(
        "  - {{ name: untrusted, url: \"https://localhost:{s}\", models: [untrusted] }}\n\
         \x20 - {{ name: wrong-name, url: \"https://{ip}:{s}\", models: [wrong-name], ca_file: \"{ca}\" }}\n\
         \x20 - {{ name: trusted, url: \"https://localhost:{s}\", models: [trusted], ca_file: \"{ca}\" }}\n\
         \x20 - {{ name: trusted-h2, url: \"https://localhost:{s}\", models: [trusted-h2], ca_file: \"{ca}\", http2: true }}\n\
         \x20 - {{ name: h2c, url: \"http://127.0.0.1:{}\", models: [h2c], http2: true }}\n",
        cleartext.port
    );
    let dir = tempfile::tempdir().unwrap();
    write_leaf(&dir.path().join("tls"), &listener_ca.issue(&["localhost"]));
    let p = TlsProxy::start(dir, &backends, "").await;

    // Not trusted by the system roots, or trusted but for another name: 502 with a typed
    // code, and no request reached the backend (no fallback to cleartext).
    for model in ["untrusted", "wrong-name"] {
        let (status, _, body) = chat(&p.proc, &chat_body(model, "hi", false)).await;
        assert_eq!(status, 502, "{model}: {body}");
        assert_eq!(error_code(&body), "upstream_certificate_invalid", "{body}");
        assert!(
            !body.contains("UnknownIssuer") && !body.contains("localhost"),
            "{body}"
        );
    }
    assert_eq!(
        secure_requests().await,
        0,
        "nothing may reach an unverified backend"
    );
    // The log says why.
    p.proc.wait_log("UnknownIssuer").await;
    p.proc.wait_log("not valid for name").await;

    // Trusted through ca_file: answered over HTTP/1.1 with the URL host as SNI.
    let (status, headers, body) = chat(&p.proc, &chat_body("trusted", "hi", false)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(served_by(&headers), "trusted");
    assert_eq!(headers["x-mock-tls-sni"], "localhost");
    assert_eq!(headers["x-mock-http-version"], "HTTP/1.1");
    assert_eq!(secure_requests().await, 1);

    // http2: true — HTTP/2 over TLS by ALPN, and h2c in cleartext.
    for model in ["trusted-h2", "h2c"] {
        let (status, headers, body) = chat(&p.proc, &chat_body(model, "hi", false)).await;
        assert_eq!(status, 200, "{model}: {body}");
        assert_eq!(served_by(&headers), model);
        assert_eq!(headers["x-mock-http-version"], "HTTP/2.0", "{model}");
    }

    // HTTP/2 end to end (client → TLS listener → TLS backend): a stream chunk by chunk.
    let mut req = https_client(&[&listener_ca.pem()])
        .post(p.https("/v1/chat/completions"))
        .json(&chat_body("trusted-h2", "hi", true));
    for (k, v) in SLOW_STREAM {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.headers()["x-mock-http-version"], "HTTP/2.0");
    let (arrivals, text) = timed_stream(r).await;
    assert_chunk_by_chunk(&arrivals, &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_reach_https_backends_with_the_same_trust_as_requests() {
    let backend_ca = Ca::new("backend test CA");
    let files = tempfile::tempdir().unwrap();
    let ca_file = files.path().join("backend-ca.pem");
    std::fs::write(&ca_file, backend_ca.pem()).unwrap();
    let secure = tls_mock(
        "secure",
        &backend_ca.issue(&["localhost"]),
        &backend_ca.pem(),
        files.path(),
    )
    .await;
    let s = secure.port;
    let backends = format!(
        "  - {{ name: untrusted, url: \"https://localhost:{s}\", models: [m] }}\n\
         \x20 - {{ name: trusted, url: \"https://localhost:{s}\", models: [m], ca_file: \"{}\", http2: true }}\n",
        ca_file.display()
    );
    let dir = tempfile::tempdir().unwrap();
    write_leaf(
        &dir.path().join("tls"),
        &Ca::new("listener CA").issue(&["localhost"]),
    );
    let health =
        "health: { path: /health, interval_ms: 100, timeout_ms: 1000, rise: 1, fall: 1 }\n";
    let p = TlsProxy::start(dir, &backends, health).await;
    let admin = format!("http://127.0.0.1:{}/admin/backends", p.admin_port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = get_json(&admin).await;
        let healthy = |name: &str| {
            v["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == name)
                .unwrap()["healthy"]
                .as_bool()
                .unwrap()
        };
        if !healthy("untrusted") && healthy("trusted") {
            break;
        }
        assert!(Instant::now() < deadline, "health did not settle: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every request now goes to the backend whose certificate verifies.
    for _ in 0..4 {
        let (status, headers, body) = chat(&p.proc, &chat_body("m", "hi", false)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(served_by(&headers), "trusted");
    }
}

/// `first` then `second`, except that model `direct` goes straight to `second`.
const FIXED_ORDER: &str = r#"
local P = {}
function P.route(req, backends)
  if req.model == "direct" then return { "second" } end
  return { "first", "second" }
end
return P
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_kib_prompt_over_http2_reaches_the_backend_byte_for_byte_first_try_and_on_failover() {
    let ca = Ca::new("client-facing test CA");
    let failing = mock("failing", &["--fail-rate", "1"]).await;
    let good = mock("good", &[]).await;
    // The good backend is reached over h2c, so the body crosses HTTP/2 on both sides.
    let backends = format!(
        "{}  - {{ name: second, url: \"http://127.0.0.1:{}\", models: [m, direct], http2: true }}\n",
        backend("first", failing.port, "[m]"),
        good.port
    );
    let dir = tempfile::tempdir().unwrap();
    write_leaf(&dir.path().join("tls"), &ca.issue(&["localhost"]));
    let p =
        TlsProxy::start_with_policy(dir, ("fixed_order", Some(FIXED_ORDER)), &backends, "").await;
    let https = https_client(&[&ca.pem()]);
    let prompt = "lorem ipsum dolor sit amet ".repeat(200 * 1024 / 27);
    let mut sent_to_failing = Vec::new();
    // With a length, and without one: an HTTP/2 body sent as a stream has no
    // Content-Length, like a chunked HTTP/1.1 body.
    for (label, model, with_length) in [
        ("first try", "direct", true),
        ("after a 503", "m", true),
        ("first try, no length", "direct", false),
        ("after a 503, no length", "m", false),
    ] {
        let body = serde_json::to_vec(&chat_body(model, &prompt, false)).unwrap();
        assert!(body.len() > 200 * 1024);
        let sent = if with_length {
            reqwest::Body::from(body.clone())
        } else {
            body_without_length(&body, 16 * 1024)
        };
        let r = https
            .post(p.https("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(sent)
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200, "{label}");
        assert_eq!(r.headers()["x-mock-backend"], "good", "{label}");
        assert_eq!(r.headers()["x-mock-http-version"], "HTTP/2.0", "{label}");
        assert_eq!(
            r.headers()["x-mock-body-sha256"],
            sha256_hex(&body).as_str(),
            "{label}: body changed on the way"
        );
        if model == "m" {
            sent_to_failing.push(sha256_hex(&body));
        }
    }
    assert_eq!(
        received_body_sha256s(&failing).await,
        sent_to_failing,
        "the failing backend got each body whole"
    );
    assert_eq!(received(&good).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_mid_way_ends_abnormally_over_http2_never_with_a_made_up_end() {
    let ca = Ca::new("client-facing test CA");
    let h1 = mock("h1", &["--chunks", "6"]).await;
    let h2 = mock("h2", &["--chunks", "6"]).await;
    // `direct` goes to the h2c backend alone, `m` to the HTTP/1.1 one alone.
    let backends = format!(
        "{}  - {{ name: second, url: \"http://127.0.0.1:{}\", models: [direct], http2: true }}\n",
        backend("first", h1.port, "[m]"),
        h2.port
    );
    let dir = tempfile::tempdir().unwrap();
    write_leaf(&dir.path().join("tls"), &ca.issue(&["localhost"]));
    let p = TlsProxy::start_with_policy(
        dir,
        ("fixed_order", Some(FIXED_ORDER)),
        &backends,
        "  idle_timeout_ms: 1000\n",
    )
    .await;
    let https = https_client(&[&ca.pem()]);
    for (model, fault) in [
        ("m", "reset-mid-stream"),
        ("direct", "reset-mid-stream"),
        ("m", "stall-mid-stream"),
        ("direct", "stall-mid-stream"),
    ] {
        let label = format!("{fault} from the {model} backend");
        let r = https
            .post(p.https("/v1/chat/completions"))
            .header("x-mock-fault", fault)
            // Chunks apart, so the head is through before the break (an HTTP/2 reset that
            // overtakes the head is a failure before any byte: 503).
            .header("x-mock-chunk-delay-ms", "50")
            .json(&chat_body(model, "hi", true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2, "{label}");
        assert_eq!(r.status(), 200, "{label}");
        let (text, broken) = tokio::time::timeout(Duration::from_secs(20), read_stream(r))
            .await
            .expect(&label);
        // (What had arrived may be lost with the reset: HTTP/2 lets a client drop data it
        // had not read when the stream is reset, so only the end is checked.)
        assert!(broken, "{label}: the stream ended as if complete:\n{text}");
        assert!(!text.contains("[DONE]"), "{label}: a made-up end:\n{text}");
    }
}

/// A TLS connection to `port` that asks for HTTP/2 only, trusting `ca_pem`; fails unless
/// the proxy chose HTTP/2.
async fn h2_tls_connection(
    port: u16,
    ca_pem: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// How long until the proxy closes `conn` (reading and dropping what it sends), or
/// `None` if it is still open after `within`.
async fn closed_after(
    conn: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    within: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_http2_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let ca = Ca::new("client-facing test CA");
    let dir = tempfile::tempdir().unwrap();
    write_leaf(&dir.path().join("tls"), &ca.issue(&["localhost"]));
    let m = mock("m1", &[]).await;
    let p = TlsProxy::start(
        dir,
        &backend("m1", m.port, "[m]"),
        "  header_timeout_ms: 500\n  keepalive_timeout_seconds: 2\n",
    )
    .await;

    // A client that never sends the HTTP/2 preface is let go after the header timeout.
    let mut silent = h2_tls_connection(p.tls_port, &ca.pem()).await;
    let closed = closed_after(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent HTTP/2 connection is closed");
    assert!(closed >= Duration::from_millis(400), "after {closed:?}");
    let closed_for_slow_heads = metric(
        &p.metrics().await,
        "switchyard_client_connections_closed_total{reason=\"header_timeout\"}",
    );
    assert_eq!(closed_for_slow_heads, 1.0);

    // One that sends the preface and its settings, then no request, is closed as idle
    // after the keep-alive timeout; the header timeout no longer applies to it.
    let mut idle = h2_tls_connection(p.tls_port, &ca.pem()).await;
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    idle.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // empty SETTINGS
    let closed = closed_after(&mut idle, Duration::from_secs(6))
        .await
        .expect("an idle HTTP/2 connection is closed");
    assert!(closed >= Duration::from_millis(1500), "after {closed:?}");

    // So is one whose request headers never complete (a HEADERS frame without
    // END_HEADERS, and no CONTINUATION): a request counts only once its headers are in.
    let mut slow = h2_tls_connection(p.tls_port, &ca.pem()).await;
    slow.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    slow.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    // HEADERS, 1 byte (`:method: POST`, indexed), flags 0, stream 1.
    slow.write_all(&[0, 0, 1, 1, 0, 0, 0, 0, 1, 0x83])
        .await
        .unwrap();
    let closed = closed_after(&mut slow, Duration::from_secs(6))
        .await
        .expect("an HTTP/2 connection whose headers never complete is closed");
    assert!(closed >= Duration::from_millis(1500), "after {closed:?}");

    // A client that speaks is served over HTTP/2, and the backend got only its request.
    let r = https_client(&[&ca.pem()])
        .post(p.https("/v1/chat/completions"))
        .json(&chat_body("m", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(received(&m).await.len(), 1);
}
