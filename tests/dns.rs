//! A backend named by host name follows its name to new addresses without a reload, and
//! keeps its last address while the name does not resolve. The proxy runs under
//! `nss_wrapper` (Debian's `libnss-wrapper`, installed by `tests/dns/setup.sh`), which
//! answers its host lookups from a hosts file the test rewrites: no real DNS is asked.
//! The two mocks listen on the same port of two loopback addresses: 127.0.0.1 and ::1
//! (127.0.0.2 where the machine has no IPv6 loopback).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const NAME: &str = "backend.switchyard.test";

fn install_nss_wrapper() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dns/setup.sh");
    let status = Command::new("bash").arg(script).status().unwrap();
    assert!(status.success(), "tests/dns/setup.sh failed ({status})");
}

/// Point `NAME` at `ip` (or at nothing), replacing the hosts file in one rename as a
/// resolver's own file would be.
fn hosts(path: &Path, ip: Option<&str>) {
    let text = match ip {
        Some(ip) => format!("{ip} {NAME}\n"),
        None => "127.0.0.1 somewhere-else.test\n".to_string(),
    };
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn mock_at(ip: &str, port: u16, name: &str) -> Proc {
    let port_s = port.to_string();
    let p = spawn(
        &["mock", "--host", ip, "--port", &port_s, "--name", name],
        port,
        None,
        &[],
    );
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    wait_ready(&format!("http://{host}:{port}/health")).await;
    p
}

/// A second loopback address for the second mock.
fn second_loopback() -> &'static str {
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        "::1"
    } else {
        "127.0.0.2"
    }
}

/// A port free on 127.0.0.1 and on `second`.
fn free_on_both(second: &str) -> u16 {
    (0..100)
        .map(|_| free_port())
        .find(|&port| std::net::TcpListener::bind((second, port)).is_ok())
        .unwrap_or_else(|| panic!("no port free on both 127.0.0.1 and {second}"))
}

/// `ip:port` as a socket address prints.
fn socket(ip: &str, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip.parse().unwrap(), port)
}

/// Which mock answered a request through the proxy.
async fn answered_by(proxy: &Proc) -> String {
    let (status, headers, body) = chat(proxy, &chat_body("m", "hi", false)).await;
    assert_eq!(status, 200, "{body}");
    headers["x-mock-backend"].to_str().unwrap().to_string()
}

async fn wait_for_mock(proxy: &Proc, mock: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while answered_by(proxy).await != mock {
        assert!(Instant::now() < deadline, "requests never reached {mock}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two mocks on one port of two loopback addresses ("first" and "second"), and a proxy
/// whose one backend is `NAME`, which the hosts file points at the first.
struct Setup {
    proxy: Proc,
    _mocks: [Proc; 2],
    _dir: tempfile::TempDir,
    hosts_file: std::path::PathBuf,
    port: u16,
    second: &'static str,
}

async fn setup(dns_refresh_seconds: u64) -> Setup {
    install_nss_wrapper();
    let second = second_loopback();
    let port = free_on_both(second);
    let mocks = [
        mock_at("127.0.0.1", port, "first").await,
        mock_at(second, port, "second").await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let hosts_file = dir.path().join("hosts");
    hosts(&hosts_file, Some("127.0.0.1"));
    let config = format!(
        "routes:\n  - policy: round_robin\nbackends:\n  - name: named\n    url: http://{NAME}:{port}\n    models: [m]\n\
         proxy:\n  threads: 2\n  grace_period_seconds: 0\n  dns_refresh_seconds: {dns_refresh_seconds}\n"
    );
    let env = [
        ("LD_PRELOAD", "libnss_wrapper.so"),
        ("NSS_WRAPPER_HOSTS", hosts_file.to_str().unwrap()),
    ];
    let proxy = proxy_with_env(&config, &[], &env).await;
    Setup {
        proxy,
        _mocks: mocks,
        _dir: dir,
        hosts_file,
        port,
        second,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_backend_follows_its_name_and_keeps_its_address_while_the_name_fails() {
    let Setup {
        proxy,
        hosts_file,
        port,
        second,
        ..
    } = &setup(1).await;
    for _ in 0..3 {
        assert_eq!(answered_by(proxy).await, "first");
    }

    // The name moves: new requests follow it, with no reload and no failed request.
    hosts(hosts_file, Some(second));
    wait_for_mock(proxy, "second").await;
    proxy
        .wait_log(&format!(
            "`{NAME}` now resolves to {} (was {})",
            socket(second, *port),
            socket("127.0.0.1", *port)
        ))
        .await;

    // The name stops resolving: the last address keeps serving, and the log says so once.
    hosts(hosts_file, None);
    proxy.wait_log(&format!("cannot resolve `{NAME}`")).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for _ in 0..3 {
        assert_eq!(answered_by(proxy).await, "second");
    }
    let log = proxy.output();
    assert_eq!(
        log.matches("cannot resolve").count(),
        1,
        "a failing name is logged once:\n{log}"
    );

    // It resolves again, to the first address.
    hosts(hosts_file, Some("127.0.0.1"));
    wait_for_mock(proxy, "first").await;
    proxy.wait_log(&format!("`{NAME}` resolves again")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_refreshing_off_the_address_of_the_load_stays_until_a_reload_turns_it_on() {
    let s = setup(0).await;
    hosts(&s.hosts_file, Some(s.second));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for _ in 0..3 {
        assert_eq!(answered_by(&s.proxy).await, "first");
    }
    // A reload keeps the address of a backend whose name and host stay the same.
    s.proxy.signal("HUP");
    s.proxy.wait_log("reloaded: 1 backend(s)").await;
    for _ in 0..3 {
        assert_eq!(answered_by(&s.proxy).await, "first");
    }

    // Refreshing turned on by editing the config: the running proxy follows the name.
    let path = s.proxy.dir().join("switchyard.yaml");
    let config = std::fs::read_to_string(&path).unwrap();
    assert!(config.contains("dns_refresh_seconds: 0"), "{config}");
    std::fs::write(
        &path,
        config.replace("dns_refresh_seconds: 0", "dns_refresh_seconds: 1"),
    )
    .unwrap();
    wait_for_mock(&s.proxy, "second").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_lists_every_host_that_does_not_resolve_and_every_failing_policy() {
    let Setup { proxy, port, .. } = &setup(60).await;
    std::fs::write(
        proxy.dir().join("policies/broken_new.lua"),
        "local P = {\nfunction P.route(req, backends) return 'x' end\nreturn P",
    )
    .unwrap();
    let config = format!(
        "routes:\n  - match: {{ path_prefix: /v2/ }}\n    policy: broken_new\n  - policy: round_robin\n\
         backends:\n  - name: named\n    url: http://{NAME}:{port}\n    models: [m]\n\
         \x20 - name: lost1\n    url: http://lost-one.switchyard.test:{port}\n    models: [m]\n\
         \x20 - name: lost2\n    url: http://lost-two.switchyard.test:{port}\n    models: [m]\n\
         proxy:\n  threads: 2\n  grace_period_seconds: 0\n  dns_refresh_seconds: 60\n"
    );
    std::fs::write(proxy.dir().join("switchyard.yaml"), config).unwrap();
    // One refusal names all three problems, and the old config keeps serving.
    let log = proxy.wait_log("broken_new.lua:2:").await;
    for problem in [
        "backends[1].url: cannot resolve `lost-one.switchyard.test`",
        "backends[2].url: cannot resolve `lost-two.switchyard.test`",
    ] {
        assert!(log.contains(problem), "{problem} missing from:\n{log}");
    }
    assert_eq!(answered_by(proxy).await, "first");
}
