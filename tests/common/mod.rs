//! Test harness: the real `switchyard` binary and real `switchyard mock` backends, as child
//! processes on loopback ports, killed when dropped.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A free loopback port for a server a test starts, which binds it later.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`, 32768–60999 unless
/// changed), where the outgoing connections of every test take their local ports: a port
/// from that range (what binding port 0 gives) could be taken by one of them between this
/// check and the server's bind; one full run failed so. Each call in a test binary tries
/// a port no earlier call returned, starting at an offset of the process id, so parallel
/// tests never pick the same one.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `count` consecutive free loopback ports, found as [`free_port`] finds one.
pub fn free_ports(count: u32) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Above the default ports of `switchyard demo` (8080, 9090, 18101-18103).
    const LOWEST: u32 = 20_000;
    let all_free = |base: u32| {
        (base..base + count).all(|p| TcpListener::bind(("127.0.0.1", p as u16)).is_ok())
    };
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_from < LOWEST + 1_000 {
        // No room below the range: what the kernel gives, if the ports after it are free.
        for _ in 0..100 {
            let base = u32::from(
                TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port(),
            );
            if base + count <= 65_536 && all_free(base) {
                return base as u16;
            }
        }
        panic!("no {count} consecutive free ports");
    }
    let span = ephemeral_from - LOWEST;
    let start = std::process::id().wrapping_mul(7919) % span;
    loop {
        let n = NEXT.fetch_add(count, Ordering::Relaxed);
        assert!(n < span, "no free port left below the ephemeral range");
        let base = LOWEST + (start + n) % span;
        if base + count <= ephemeral_from && all_free(base) {
            return base as u16;
        }
    }
}

/// A loopback port that refuses connections for as long as the returned socket lives:
/// bound, never listening. A port from [`free_port`] is released at once, so another
/// test's server could take it meanwhile (a "dead" backend that hangs instead).
pub fn refusing_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// A child process killed on drop.
pub struct Proc {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Proc {
    /// The proxy's working directory (config file and `policies/`).
    pub fn dir(&self) -> &Path {
        self._dir.as_ref().expect("a proxy has a directory").path()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once it holds `needle`: a thread of the proxy's own writes the log, so a
    /// line logged while a request was served may land just after the answer.
    pub async fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.output();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` in the log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The first whole log line (its newline written) containing `needle`, without the
    /// newline: a line being written may be read half-way.
    pub async fn log_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.output();
            let whole = log
                .split_inclusive('\n')
                .find(|l| l.contains(needle) && l.ends_with('\n'));
            if let Some(line) = whole {
                return line.trim_end_matches(['\r', '\n']).to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no whole line with `{needle}` in the log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The access line of the request `request_id` (an `x-request-id`), once logged.
    pub async fn access_line(&self, request_id: &str) -> String {
        self.log_line(&format!("{request_id} POST")).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal by name (TERM, QUIT, HUP).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Wait for the process to exit, up to `within`; its exit status, if it did.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `switchyard ARGS...`, its output in a log file; `port` is the one `url` uses and
/// `dir` is kept (and removed) with the process.
pub fn spawn(
    args: &[&str],
    port: u16,
    dir: Option<tempfile::TempDir>,
    env: &[(&str, &str)],
) -> Proc {
    spawn_with(Command::new(BIN), args, port, dir, env)
}

/// [`spawn`] in the working directory `cwd`.
pub fn spawn_in(cwd: &Path, args: &[&str], port: u16, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(cwd);
    spawn_with(cmd, args, port, None, env)
}

fn spawn_with(
    mut cmd: Command,
    args: &[&str],
    port: u16,
    dir: Option<tempfile::TempDir>,
    env: &[(&str, &str)],
) -> Proc {
    let log =
        std::env::temp_dir().join(format!("switchyard-test-{port}-{}.log", std::process::id()));
    let out = std::fs::File::create(&log).unwrap();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn switchyard");
    Proc {
        child,
        port,
        log,
        _dir: dir,
    }
}

/// Wait until `url` answers any HTTP status.
pub async fn wait_ready(url: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if client.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{url} did not come up in 15 s");
}

/// Start a mock backend: `switchyard mock --port P --name NAME EXTRA...`.
pub async fn mock(name: &str, extra: &[&str]) -> Proc {
    mock_on(free_port(), name, extra).await
}

/// Start a mock backend on a given port (to restart one that was killed).
pub async fn mock_on(port: u16, name: &str, extra: &[&str]) -> Proc {
    let port_s = port.to_string();
    let mut args = vec!["mock", "--port", &port_s, "--name", name];
    args.extend_from_slice(extra);
    let p = spawn(&args, port, None, &[]);
    wait_ready(&p.url("/health")).await;
    p
}

/// Start the proxy with `config` (YAML; `listen` and `policies_dir` are filled in) and the
/// repository's policies plus `extra_policies` (name, source).
pub async fn proxy(config: &str, extra_policies: &[(&str, &str)]) -> Proc {
    proxy_with_env(config, extra_policies, &[]).await
}

pub async fn proxy_with_env(
    config: &str,
    extra_policies: &[(&str, &str)],
    env: &[(&str, &str)],
) -> Proc {
    proxy_on(free_port(), config, extra_policies, env, &[]).await
}

/// Start the proxy on a given port, with extra command-line arguments (with `--upgrade`
/// it is not waited for: it takes its sockets over from the running instance).
pub async fn proxy_on(
    port: u16,
    config: &str,
    extra_policies: &[(&str, &str)],
    env: &[(&str, &str)],
    args: &[&str],
) -> Proc {
    let p = spawn_proxy(port, config, extra_policies, env, args);
    if !args.contains(&"--upgrade") {
        wait_ready(&p.url("/v1/models")).await;
        // The admin listener is a service of its own, which may bind a moment later.
        if let Some(admin) = admin_port(config) {
            wait_ready(&format!("http://127.0.0.1:{admin}/healthz")).await;
        }
    }
    p
}

/// The port of the admin listener a config names on 127.0.0.1, if it names one.
fn admin_port(config: &str) -> Option<u16> {
    let admin = &config[config.find("admin:")?..];
    // `admin: { addr: "127.0.0.1:P" }`, or `admin:` then `addr:` on the next line.
    let addr = &admin[..admin.len().min(80)];
    let addr = &addr[addr.find("addr:")?..];
    let port = addr
        .strip_prefix("addr:")?
        .trim_start()
        .trim_start_matches('"');
    let port = port.strip_prefix("127.0.0.1:")?;
    let digits: String = port.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Start the proxy on a given port without waiting for it to serve.
pub fn spawn_proxy(
    port: u16,
    config: &str,
    extra_policies: &[(&str, &str)],
    env: &[(&str, &str)],
    args: &[&str],
) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let policies = write_policies(dir.path(), extra_policies);
    let full = format!(
        "listen: [{{ addr: \"127.0.0.1:{port}\" }}]\npolicies_dir: {}\n{config}\n{}",
        policies.display(),
        if config.contains("\nproxy:") || config.starts_with("proxy:") {
            ""
        } else {
            "proxy:\n  threads: 2\n  grace_period_seconds: 0\n"
        }
    );
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, full).unwrap();
    let mut argv = vec!["run", "--config", path.to_str().unwrap()];
    argv.extend_from_slice(args);
    spawn(&argv, port, Some(dir), env)
}

/// What a mock says about itself (`GET /mock/stats`).
pub async fn mock_stats(mock: &Proc) -> Value {
    get_json(mock.url("/mock/stats")).await
}

/// Copy the repository's policies and write extra ones; returns the directory.
pub fn write_policies(dir: &Path, extra: &[(&str, &str)]) -> PathBuf {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for entry in std::fs::read_dir(repo).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "lua") {
            std::fs::copy(&path, policies.join(path.file_name().unwrap())).unwrap();
        }
    }
    for (name, source) in extra {
        std::fs::write(policies.join(format!("{name}.lua")), source).unwrap();
    }
    policies
}

/// A `backends:` entry for a mock.
pub fn backend(name: &str, mock_port: u16, models: &str) -> String {
    format!("  - name: {name}\n    url: http://127.0.0.1:{mock_port}\n    models: {models}\n")
}

/// `config`'s backends (written by [`backend`]) reached over HTTP/2 when `http2`: h2c,
/// with prior knowledge.
pub fn backends_over_http2(config: String, http2: bool) -> String {
    if http2 {
        config.replace("\n    models: ", "\n    http2: true\n    models: ")
    } else {
        config
    }
}

pub fn chat_body(model: &str, content: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{ "role": "user", "content": content }],
    })
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// POST a chat body with `headers` added.
pub async fn post_chat(proxy: &Proc, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    post_chat_bytes(proxy, serde_json::to_vec(body).unwrap(), headers).await
}

/// POST an already encoded chat body (bytes, or a streamed body without a length) as JSON,
/// with `headers` added.
pub async fn post_chat_bytes(
    proxy: &Proc,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("request reaches the proxy")
}

/// POST a chat body; returns (status, headers, body text).
pub async fn chat(proxy: &Proc, body: &Value) -> (u16, reqwest::header::HeaderMap, String) {
    let r = client()
        .post(proxy.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("request reaches the proxy");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

/// What a mock received (`GET /mock/requests`).
pub async fn received(mock: &Proc) -> Vec<Value> {
    serde_json::from_value(get_json(mock.url("/mock/requests")).await).expect("a JSON array")
}

/// The SHA-256 (hex) of each body `mock` received, in order.
pub async fn received_body_sha256s(mock: &Proc) -> Vec<String> {
    received(mock)
        .await
        .iter()
        .map(|r| r["body_sha256"].as_str().unwrap().to_string())
        .collect()
}

/// `body` sent as a stream of `part_bytes`-byte parts, with no length: chunked over
/// HTTP/1.1, DATA frames without `content-length` over HTTP/2.
pub fn body_without_length(body: &[u8], part_bytes: usize) -> reqwest::Body {
    let parts: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(part_bytes).map(|c| Ok(c.to_vec())).collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(parts))
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

pub fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

/// Run `switchyard run` on a config (with the repository's policies) that must be refused;
/// returns what it wrote to stderr. `env_remove` names variables to unset.
pub fn refused_config(yaml: &str, env_remove: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let policies = write_policies(dir.path(), &[]);
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!("policies_dir: {}\n{yaml}", policies.display()),
    )
    .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"]).arg(&path);
    for var in env_remove {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "the config was accepted");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Read a response body to its end; the text, and whether it ended abnormally (the
/// connection broke before the body was complete).
pub async fn read_stream(r: reqwest::Response) -> (String, bool) {
    use futures_util::StreamExt;
    let mut text = String::new();
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => return (text, true),
        }
    }
    (text, false)
}

/// What a bounded load saw.
pub struct LoadResult {
    pub sent: usize,
    pub ok: usize,
    /// One line per failed request (status or transport error).
    pub errors: Vec<String>,
    /// The backend that served each successful request, in order.
    pub served: Vec<String>,
}

/// Bounded load: `workers` clients posting plain chat requests to `url` until stopped,
/// `max` requests were sent, or 60 s passed.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    errors: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    served: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: String, workers: usize, max: usize) -> Load {
        use std::sync::atomic::Ordering;
        let load = Load {
            stop: Default::default(),
            sent: Default::default(),
            errors: Default::default(),
            served: Default::default(),
            tasks: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let tasks = (0..workers)
            .map(|_| {
                let (url, stop, sent) = (url.clone(), load.stop.clone(), load.sent.clone());
                let (errors, served) = (load.errors.clone(), load.served.clone());
                tokio::spawn(async move {
                    let c = client();
                    while !stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                        && sent.fetch_add(1, Ordering::Relaxed) < max
                    {
                        match c.post(&url).json(&chat_body("m", "hi", false)).send().await {
                            Ok(r) if r.status() == 200 => {
                                let name = r.headers()["x-switchyard-backend"]
                                    .to_str()
                                    .unwrap()
                                    .to_string();
                                served.lock().unwrap().push(name);
                            }
                            Ok(r) => errors
                                .lock()
                                .unwrap()
                                .push(format!("status {}", r.status())),
                            Err(e) => errors.lock().unwrap().push(format!("{e:?}")),
                        }
                    }
                })
            })
            .collect();
        Load { tasks, ..load }
    }

    /// Requests started so far.
    pub fn sent(&self) -> usize {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The backend that served the latest successful request.
    pub fn last_served(&self) -> String {
        self.served
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }

    /// Wait until traffic is served by `backend` (seen twice, 50 ms apart, so a request
    /// already in flight before a change does not count); how long it took.
    pub async fn wait_for(&self, backend: &str, within: Duration) -> Duration {
        let started = Instant::now();
        while started.elapsed() < within {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.last_served() == backend {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.last_served() == backend {
                    return started.elapsed();
                }
            }
        }
        panic!("traffic did not move to {backend} within {within:?}");
    }

    pub async fn finish(self) -> LoadResult {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let served = std::mem::take(&mut *self.served.lock().unwrap());
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        let sent = self
            .sent
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(served.len() + errors.len());
        LoadResult {
            sent,
            ok: served.len(),
            errors,
            served,
        }
    }
}

/// GET a URL and parse its JSON body.
/// Through the admin API on port `admin`: drain backend `name` (no new requests), or
/// put it back in rotation; the call must succeed.
pub async fn set_draining(admin: u16, name: &str, draining: bool) {
    let action = if draining { "drain" } else { "undrain" };
    let r = client()
        .post(format!(
            "http://127.0.0.1:{admin}/admin/backends/{name}/{action}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{action} {name}");
}

pub async fn get_json(url: impl reqwest::IntoUrl) -> Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The latest routing decision for a request id, once its audit record exists.
pub async fn decision(admin: u16, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let d = get_json(format!("http://127.0.0.1:{admin}/admin/decisions?limit=50")).await;
        let found = d["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["request_id"] == request_id)
            .cloned();
        if let Some(r) = found {
            return r;
        }
        assert!(Instant::now() < deadline, "no decision for {request_id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The backend that served a response (`x-switchyard-backend`).
pub fn served_by(headers: &reqwest::header::HeaderMap) -> String {
    headers["x-switchyard-backend"]
        .to_str()
        .unwrap()
        .to_string()
}

/// The admin listener's `/metrics` text.
pub async fn metrics_text(admin_port: u16) -> String {
    metrics_text_with(admin_port, None).await
}

/// The admin listener's `/metrics` text, with the admin token when it has one.
pub async fn metrics_text_with(admin_port: u16, token: Option<&str>) -> String {
    let mut request = client().get(format!("http://127.0.0.1:{admin_port}/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().text().await.unwrap()
}

/// A chat request (model `m`) sent in the background.
pub fn chat_in_background(p: &Proc) -> tokio::task::JoinHandle<reqwest::Response> {
    let url = p.url("/v1/chat/completions");
    tokio::spawn(async move {
        client()
            .post(url)
            .json(&chat_body("m", "hi", false))
            .send()
            .await
            .unwrap()
    })
}

/// The value of one series (name and labels, exactly as exposed) in a `/metrics` text; 0
/// when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The status of a raw HTTP answer (`HTTP/1.1 200 OK…`).
pub fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}
