//! The container and deployment files in `docker/`, checked against the repository and the
//! real binary, since no container engine runs here: every path the Dockerfile copies and
//! everything the build embeds; the compose file's mounts, ports and commands (and then the
//! whole compose set-up run on loopback, service names rewritten to 127.0.0.1); the
//! Kubernetes manifests' ConfigMap, probes, ports, Services and security settings. Every
//! shipped config passes `switchyard check --config` where the container would see it.
//! Last, a ConfigMap update delivered the way the kubelet delivers it (a new hidden
//! directory and an atomic `..data` symlink swap) routes traffic without a restart.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_yaml::Value as Yaml;
use switchyard::config::Config;

use common::*;

// ---- reading the files -------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a YAML file.
fn yaml_docs(rel: &str) -> Vec<Yaml> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(&read(rel))
        .map(|d| Yaml::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

fn yaml(rel: &str) -> Yaml {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: one document");
    docs.remove(0)
}

fn text(v: &Yaml) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn texts(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(|s| text(s).to_string())
        .collect()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').unwrap().0
}

/// `http://host:port` of a backend URL.
fn url_host_port(url: &str) -> (String, u16) {
    let rest = url.strip_prefix("http://").expect("an http:// backend");
    let authority = rest.split('/').next().unwrap();
    (host_of(authority).to_string(), port_of(authority))
}

/// The value following `flag` in an argument list.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// `args` with the value after `flag` replaced.
fn with_flag(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut out = args.to_vec();
    let i = out.iter().position(|a| a == flag).unwrap();
    out[i + 1] = value.to_string();
    out
}

/// Copy a file or a directory tree.
fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
}

/// Every file under `path` (or `path` itself), relative to the repository.
fn files_under(rel: &str) -> Vec<String> {
    let full = repo().join(rel);
    if full.is_file() {
        return vec![rel.to_string()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&full).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        out.extend(files_under(&format!("{rel}/{name}")));
    }
    out
}

/// `switchyard ARGS` run to its end in `cwd`: success, and what it printed.
fn run_binary(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

/// `switchyard check --config FILE` passes: the config is valid and its policies compile
/// and pass their tests.
fn assert_check_passes(config: &Path) {
    let (ok, printed) = run_binary(
        &["check", "--config", config.to_str().unwrap()],
        config.parent().unwrap(),
    );
    assert!(
        ok,
        "switchyard check --config {}:\n{printed}",
        config.display()
    );
    assert!(printed.contains("ok   config"), "{printed}");
    assert!(printed.contains(" 0 failed"), "{printed}");
}

/// The repository's policies, by file name.
fn repo_policies() -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(repo().join("policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "lua"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

// ---- the Dockerfile ----------------------------------------------------------------------

struct Stage {
    name: Option<String>,
    /// (instruction, arguments), continuation lines joined, comments dropped.
    steps: Vec<(String, String)>,
}

impl Stage {
    fn all(&self, op: &str) -> impl Iterator<Item = &str> + '_ {
        let op = op.to_string();
        self.steps
            .iter()
            .filter(move |(o, _)| *o == op)
            .map(|(_, a)| a.as_str())
    }

    fn one(&self, op: &str) -> &str {
        let all: Vec<&str> = self.all(op).collect();
        assert_eq!(all.len(), 1, "one {op} in the stage");
        all[0]
    }

    /// `COPY [--from=STAGE] [--flags] SRC... DEST`: (from, sources, dest).
    fn copies(&self) -> Vec<(Option<String>, Vec<String>, String)> {
        self.all("COPY")
            .map(|args| {
                let mut from = None;
                let mut words: Vec<String> = Vec::new();
                for w in args.split_whitespace() {
                    if let Some(f) = w.strip_prefix("--from=") {
                        from = Some(f.to_string());
                    } else if !w.starts_with("--") {
                        words.push(w.to_string());
                    }
                }
                let dest = words.pop().expect("COPY has a destination");
                assert!(!words.is_empty(), "COPY has a source: {args}");
                (from, words, dest)
            })
            .collect()
    }
}

fn dockerfile() -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    let mut logical = String::new();
    let mut lines = Vec::new();
    for line in read("docker/Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && logical.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                logical.push_str(part);
                logical.push(' ');
            }
            None => {
                logical.push_str(trimmed);
                lines.push(std::mem::take(&mut logical));
            }
        }
    }
    for line in lines {
        let (op, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let (op, args) = (op.to_ascii_uppercase(), args.trim().to_string());
        if op == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                name,
                steps: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .expect("FROM comes first")
                .steps
                .push((op, args));
        }
    }
    stages
}

/// The exec form of CMD / ENTRYPOINT.
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not the exec form: {args}: {e}"))
}

/// Whether `.dockerignore` keeps `rel` (a path relative to the build context, the
/// repository root) out of the build context.
fn docker_ignored(rel: &str) -> bool {
    read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .any(|pattern| {
            assert!(!pattern.starts_with('!'), "exceptions are not checked here");
            let pattern = pattern.trim_start_matches('/');
            let plain = !pattern.contains(['*', '?', '[']);
            if plain {
                rel == pattern || rel.starts_with(&format!("{pattern}/"))
            } else {
                let anywhere = pattern.strip_prefix("**/").unwrap_or(pattern);
                wildmatch::WildMatch::new(pattern).matches(rel)
                    || wildmatch::WildMatch::new(anywhere).matches(rel)
            }
        })
}

/// Paths the sources embed with `include_str!`/`include_bytes!`, relative to the repository.
fn embedded_files() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in files_under("src") {
        let source = read(&file);
        let dir = repo().join(&file).parent().unwrap().to_path_buf();
        for marker in ["include_str!(\"", "include_bytes!(\""] {
            for piece in source.split(marker).skip(1) {
                let target = &piece[..piece.find('"').unwrap()];
                let full = dir.join(target).canonicalize().unwrap_or_else(|e| {
                    panic!("{file} embeds {target}, which does not exist: {e}")
                });
                let rel = full.strip_prefix(repo()).unwrap();
                out.insert(rel.to_string_lossy().to_string());
            }
        }
    }
    out
}

/// The uid the image runs as (`USER uid:gid`).
fn image_uid() -> u32 {
    let stages = dockerfile();
    let user = stages.last().unwrap().one("USER").to_string();
    user.split(':').next().unwrap().parse().unwrap_or_else(|_| {
        panic!("USER `{user}` must be numeric, so Kubernetes can verify runAsNonRoot")
    })
}

#[test]
fn dockerfile_copies_what_exists_and_the_build_needs() {
    let stages = dockerfile();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let (build, runtime) = (&stages[0], &stages[1]);
    let build_name = build.name.as_deref().expect("the build stage is named");

    // What the build stage copies exists and is in the build context.
    let mut copied = Vec::new();
    for (from, sources, _) in build.copies() {
        assert!(from.is_none());
        for src in sources {
            assert!(
                repo().join(&src).exists(),
                "COPY {src}: not in the repository"
            );
            assert!(
                !docker_ignored(&src),
                "COPY {src}: excluded by .dockerignore"
            );
            copied.extend(files_under(&src).into_iter().filter(|f| !docker_ignored(f)));
        }
    }
    // ... and covers what cargo reads: the manifest, the lock file, the sources, the files
    // they embed, and the benchmark targets Cargo.toml declares.
    let mut needed: BTreeSet<String> = ["Cargo.toml", "Cargo.lock"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    needed.extend(files_under("src"));
    needed.extend(embedded_files());
    let manifest = read("Cargo.toml");
    for section in manifest.split("[[bench]]").skip(1) {
        let name = section
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = "))
            .unwrap()
            .trim_matches('"');
        needed.insert(format!("benches/{name}.rs"));
    }
    // Crates Cargo.toml takes from the repository (`path = "..."`, the patched Pingora).
    for line in manifest.lines() {
        if let Some((_, rest)) = line.split_once("path = \"") {
            let dir = rest.split('"').next().unwrap();
            assert!(
                !files_under(dir).is_empty(),
                "{dir} (a path crate) has no files"
            );
            needed.extend(files_under(dir));
        }
    }
    assert!(needed.contains("conf/demo.yaml") && needed.contains("src/dashboard.html"));
    assert!(needed.contains("vendor/pingora-proxy/src/proxy_h1.rs"));
    for file in &needed {
        assert!(
            copied.contains(file),
            "the build needs {file}, which the build stage does not copy"
        );
    }
    // The image is built with the `dist` profile (whole-program LTO), which Cargo.toml
    // must define: what the benchmarks measure is what the image runs.
    let build_runs: Vec<&str> = build.all("RUN").collect();
    assert!(
        build_runs
            .iter()
            .any(|r| r.contains("cargo build --profile dist --locked")),
        "{build_runs:?}"
    );
    let manifest = read("Cargo.toml");
    assert!(
        manifest.contains("\n[profile.dist]\n"),
        "Cargo.toml defines no dist profile"
    );
    assert!(
        build_runs.iter().any(|r| r.contains("cmake")),
        "Pingora's zlib-ng needs cmake (tests/setup.sh)"
    );

    // The runtime stage takes the binary the build stage installed, and runs it by name.
    let binaries: Vec<_> = runtime
        .copies()
        .into_iter()
        .filter(|(from, _, _)| from.is_some())
        .collect();
    assert_eq!(binaries.len(), 1);
    let (from, sources, dest) = &binaries[0];
    assert_eq!(from.as_deref(), Some(build_name));
    assert!(
        build_runs
            .iter()
            .any(|r| r.contains(&format!("target/dist/switchyard {}", sources[0]))),
        "the build stage installs the binary at {}",
        sources[0]
    );
    let entrypoint = exec_form(runtime.one("ENTRYPOINT"));
    let dest = Path::new(dest);
    assert_eq!(
        entrypoint,
        vec![dest.file_name().unwrap().to_string_lossy()]
    );
    assert!(
        ["/usr/local/bin", "/usr/bin"].contains(&dest.parent().unwrap().to_str().unwrap()),
        "{} is on the image's PATH",
        dest.display()
    );
    assert!(image_uid() > 0, "the image runs as a non-root user");
}

#[test]
fn dockerfile_image_serves_its_shipped_config() {
    let stages = dockerfile();
    let runtime = stages.last().unwrap();
    // The runtime image's files, as its COPY lines lay them out.
    let root = tempfile::tempdir().unwrap();
    for (from, sources, dest) in runtime.copies() {
        if from.is_some() {
            continue;
        }
        assert_eq!(
            sources.len(),
            1,
            "one source per COPY into the runtime image"
        );
        assert!(
            !docker_ignored(&sources[0]),
            "{} excluded by .dockerignore",
            sources[0]
        );
        copy_tree(
            &repo().join(&sources[0]),
            &root.path().join(dest.trim_start_matches('/')),
        );
    }
    let cmd = exec_form(runtime.one("CMD"));
    assert_eq!(cmd[..2], ["run", "--config"], "{cmd:?}");
    assert_eq!(cmd.len(), 3);
    let config_path = root.path().join(cmd[2].trim_start_matches('/'));
    assert!(config_path.is_file(), "the image has no {}", cmd[2]);
    assert_check_passes(&config_path);

    // EXPOSE names exactly the listener and admin ports of that config.
    let config = Config::load(&config_path).unwrap();
    let mut ports: BTreeSet<u16> = config.listen.iter().map(|l| port_of(&l.addr)).collect();
    ports.insert(port_of(
        &config.admin.as_ref().expect("an admin listener").addr,
    ));
    let exposed: BTreeSet<u16> = runtime
        .one("EXPOSE")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(exposed, ports);

    // `switchyard check` with no arguments, in the WORKDIR, checks the image's policies.
    let workdir = root
        .path()
        .join(runtime.one("WORKDIR").trim_start_matches('/'));
    let (ok, printed) = run_binary(&["check"], &workdir);
    assert!(ok, "{printed}");
    assert!(
        printed.contains(&format!("{} passed, 0 failed", repo_policies().len())),
        "{printed}"
    );
}

// ---- docker compose ----------------------------------------------------------------------

/// A compose service, as the tests need it.
struct Service {
    command: Vec<String>,
    /// Container path → host path (relative paths resolved against `docker/`).
    mounts: Vec<(String, PathBuf)>,
}

impl Service {
    /// The host file a container path comes from, through the service's mounts.
    fn host_path(&self, container: &str) -> PathBuf {
        self.mounts
            .iter()
            .find_map(|(c, host)| {
                let rest = Path::new(container).strip_prefix(c).ok()?;
                Some(if rest.as_os_str().is_empty() {
                    host.clone()
                } else {
                    host.join(rest)
                })
            })
            .unwrap_or_else(|| panic!("{container} is not mounted"))
    }

    /// The container's mounted files, laid out under `root`.
    fn materialise(&self, root: &Path) {
        for (container, host) in &self.mounts {
            copy_tree(host, &root.join(container.trim_start_matches('/')));
        }
    }
}

fn compose() -> (Yaml, BTreeMap<String, Service>) {
    let doc = yaml("docker/compose.yaml");
    let base = repo().join("docker");
    let mut services = BTreeMap::new();
    for (name, svc) in doc["services"].as_mapping().unwrap() {
        let mounts = svc
            .get("volumes")
            .map(texts)
            .unwrap_or_default()
            .iter()
            .map(|v| {
                let parts: Vec<&str> = v.split(':').collect();
                assert!(
                    parts.len() == 2 || (parts.len() == 3 && parts[2] == "ro"),
                    "{v}: host:container[:ro]"
                );
                let host = base.join(parts[0]);
                assert!(
                    host.exists(),
                    "{name:?} mounts {}, which does not exist",
                    parts[0]
                );
                (parts[1].to_string(), host)
            })
            .collect();
        let command = svc.get("command").map(texts).unwrap_or_default();
        services.insert(text(name).to_string(), Service { command, mounts });
    }
    (doc, services)
}

/// Seconds of a compose duration like `15s` or `1m30s`.
fn duration_s(d: &str) -> u64 {
    let (mut total, mut n) = (0, 0);
    for c in d.chars() {
        match c {
            '0'..='9' => n = n * 10 + c.to_digit(10).unwrap() as u64,
            'm' => (total, n) = (total + n * 60, 0),
            's' => (total, n) = (total + n, 0),
            _ => panic!("duration {d}"),
        }
    }
    total
}

#[test]
fn compose_mounts_ports_and_commands_agree_with_its_configs() {
    let (doc, services) = compose();
    let sy = &services["switchyard"];
    let spec = &doc["services"]["switchyard"];

    // Every service running our image builds it from the Dockerfile tested above.
    let image = text(&spec["image"]);
    for (name, s) in doc["services"].as_mapping().unwrap() {
        if s["image"].as_str() == Some(image) {
            let build = &s["build"];
            let file = repo()
                .join("docker")
                .join(text(&build["context"]))
                .join(text(&build["dockerfile"]));
            assert_eq!(
                file.canonicalize().unwrap(),
                repo().join("docker/Dockerfile"),
                "{name:?}"
            );
        }
    }

    // The config it runs is mounted from docker/, and passes `check` where it is mounted.
    assert_eq!(sy.command[..2], ["run", "--config"]);
    let image_cmd = exec_form(dockerfile().last().unwrap().one("CMD"));
    assert_eq!(
        sy.command, image_cmd,
        "the image's default command, run below"
    );
    let config_host = sy.host_path(&sy.command[2]);
    assert_eq!(
        config_host.canonicalize().unwrap(),
        repo().join("docker/config.yaml")
    );
    let root = tempfile::tempdir().unwrap();
    sy.materialise(root.path());
    let config_path = root.path().join(sy.command[2].trim_start_matches('/'));
    assert_check_passes(&config_path);
    let config = Config::load(&config_path).unwrap();

    // Published ports are exactly the listener and admin ports, on the host's loopback;
    // inside the container both listen on every interface.
    let admin = config.admin.as_ref().unwrap().addr.clone();
    let mut wanted: BTreeSet<u16> = config.listen.iter().map(|l| port_of(&l.addr)).collect();
    wanted.insert(port_of(&admin));
    let mut published = BTreeSet::new();
    for p in texts(&spec["ports"]) {
        let parts: Vec<&str> = p.split(':').collect();
        assert_eq!(parts.len(), 3, "{p}: host-ip:host-port:container-port");
        assert_eq!(parts[0], "127.0.0.1", "{p}: published on loopback only");
        published.insert(parts[2].parse::<u16>().unwrap());
    }
    assert_eq!(published, wanted);
    for addr in config.listen.iter().map(|l| &l.addr).chain([&admin]) {
        assert_eq!(
            host_of(addr),
            "0.0.0.0",
            "{addr} is unreachable from outside"
        );
    }

    // Each backend is a compose service running the mock on the URL's port, named as the
    // backend, started before Switchyard (which resolves the names once, at start).
    let depends = texts(&spec["depends_on"]);
    for b in &config.backends {
        let (host, port) = url_host_port(&b.url);
        let mock = services
            .get(&host)
            .unwrap_or_else(|| panic!("backend {} points at {host}, no such service", b.name));
        assert_eq!(mock.command[0], "mock");
        assert_eq!(flag(&mock.command, "--host"), Some("0.0.0.0"));
        assert_eq!(
            flag(&mock.command, "--port"),
            Some(port.to_string().as_str())
        );
        assert_eq!(flag(&mock.command, "--name"), Some(b.name.as_str()));
        assert!(depends.contains(&host), "switchyard depends_on {host}");
    }

    // Prometheus scrapes the admin listener, with the repository's alert rules.
    let prom = &services["prometheus"];
    let prom_config_at = "/etc/prometheus/prometheus.yml";
    let prom_config: Yaml =
        serde_yaml::from_str(&std::fs::read_to_string(prom.host_path(prom_config_at)).unwrap())
            .unwrap();
    let jobs = prom_config["scrape_configs"].as_sequence().unwrap();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(text(&job["metrics_path"]), "/metrics");
    let targets: Vec<String> = job["static_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|c| texts(&c["targets"]))
        .collect();
    assert_eq!(targets, vec![format!("switchyard:{}", port_of(&admin))]);
    let alerts = read("conf/prometheus/alerts.yml");
    assert!(
        alerts.contains(&format!("job=\"{}\"", text(&job["job_name"]))),
        "alerts.yml's `up` alert uses the scrape job's name"
    );
    let rule_files = texts(&prom_config["rule_files"]);
    assert!(
        !rule_files.is_empty(),
        "the Prometheus config loads no rule file"
    );
    for rules in rule_files {
        let at = Path::new(prom_config_at).parent().unwrap().join(rules);
        let host = prom.host_path(at.to_str().unwrap());
        assert_eq!(
            host.canonicalize().unwrap(),
            repo().join("conf/prometheus/alerts.yml")
        );
    }

    // docker compose stop waits long enough for Pingora's shutdown: the grace period, then
    // as long again for the runtimes (src/server.rs sets both from grace_period_seconds).
    let stop = duration_s(text(&spec["stop_grace_period"]));
    assert!(
        stop > 2 * config.proxy.grace_period_seconds,
        "stop_grace_period {stop}s"
    );
}

/// The compose set-up, run for real on loopback: the mocks with their compose commands and
/// Switchyard with the mounted config, compose service names replaced by 127.0.0.1 and
/// ports by free ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_setup_serves_on_loopback() {
    let (_, services) = compose();
    let sy = &services["switchyard"];
    let root = tempfile::tempdir().unwrap();
    sy.materialise(root.path());
    let config_path = root.path().join(sy.command[2].trim_start_matches('/'));
    let mut config: Yaml =
        serde_yaml::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();

    let mut mocks = Vec::new();
    for backend in config["backends"].as_sequence_mut().unwrap() {
        let (host, _) = url_host_port(text(&backend["url"]));
        let port = free_port();
        let args = with_flag(&services[&host].command, "--host", "127.0.0.1");
        let args = with_flag(&args, "--port", &port.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mock = spawn(&args, port, None, &[]);
        wait_ready(&mock.url("/health")).await;
        mocks.push(mock);
        backend["url"] = format!("http://127.0.0.1:{port}").into();
    }
    let (port, admin) = (free_port(), free_port());
    config["listen"][0]["addr"] = format!("127.0.0.1:{port}").into();
    config["admin"]["addr"] = format!("127.0.0.1:{admin}").into();
    config["proxy"]["grace_period_seconds"] = 0.into();
    std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();

    let mut args = sy.command.clone();
    args[2] = config_path.to_string_lossy().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = spawn(&args, port, None, &[]);
    wait_ready(&p.url("/v1/models")).await;

    // demo-small is served by both mocks, each answering under its backend's name.
    let mut seen = BTreeSet::new();
    for i in 0..8 {
        let (status, headers, body) = chat(&p, &chat_body("demo-small", "hi", i % 2 == 0)).await;
        assert_eq!(status, 200, "{body}\n{}", p.output());
        let backend = served_by(&headers);
        assert_eq!(headers["x-mock-backend"].to_str().unwrap(), backend);
        seen.insert(backend);
    }
    assert_eq!(seen, ["mock-a", "mock-b"].map(String::from).into());

    // What the compose file says Prometheus and an operator reach on the admin listener.
    let health = get_json(format!("http://127.0.0.1:{admin}/healthz")).await;
    assert_eq!(health["status"], "ok");
    let metrics = metrics_text(admin).await;
    assert!(
        metrics.contains("switchyard_requests_total{backend=\"mock-a\""),
        "{metrics}"
    );
}

// ---- Kubernetes --------------------------------------------------------------------------

/// The objects of the kustomization (and the optional extras), by kind and name.
struct Cluster {
    objects: BTreeMap<(String, String), Yaml>,
}

impl Cluster {
    fn load(files: &[String]) -> Cluster {
        let mut objects = BTreeMap::new();
        for file in files {
            for doc in yaml_docs(&format!("docker/k8s/{file}")) {
                let key = (
                    text(&doc["kind"]).to_string(),
                    text(&doc["metadata"]["name"]).to_string(),
                );
                assert!(objects.insert(key.clone(), doc).is_none(), "{key:?} twice");
            }
        }
        Cluster { objects }
    }

    fn get(&self, kind: &str, name: &str) -> &Yaml {
        self.objects
            .get(&(kind.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    /// The Deployment whose pods a Service selects (exactly one).
    fn selected_deployment(&self, service: &Yaml) -> &Yaml {
        let selector = service["spec"]["selector"].as_mapping().unwrap();
        let matching: Vec<&Yaml> = self
            .objects
            .iter()
            .filter(|((kind, _), _)| kind == "Deployment")
            .map(|(_, d)| d)
            .filter(|d| {
                let labels = &d["spec"]["template"]["metadata"]["labels"];
                selector.iter().all(|(k, v)| &labels[k] == v)
            })
            .collect();
        assert_eq!(matching.len(), 1, "{service:?}");
        matching[0]
    }

    /// The container behind a backend URL `http://SERVICE:PORT`, and the container port
    /// the Service sends that port to.
    fn backend_container(&self, url: &str) -> (&Yaml, u16) {
        let (host, port) = url_host_port(url);
        let svc = self.get("Service", &host);
        let sp = svc["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["port"].as_u64() == Some(port as u64))
            .unwrap_or_else(|| panic!("Service {host} has no port {port}"));
        let container = only_container(self.selected_deployment(svc));
        (container, container_port(container, &sp["targetPort"]))
    }
}

fn kustomization_resources() -> Vec<String> {
    let k = yaml("docker/k8s/kustomization.yaml");
    texts(&k["resources"])
}

fn only_container(deployment: &Yaml) -> &Yaml {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    assert_eq!(containers.len(), 1);
    &containers[0]
}

/// A container port given by name or number.
fn container_port(container: &Yaml, port: &Yaml) -> u16 {
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == *port)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port {port:?}")) as u16
}

/// The ConfigMap's files: `config.yaml` and the policies.
fn configmap_files(cluster: &Cluster) -> BTreeMap<String, Vec<u8>> {
    cluster.get("ConfigMap", "switchyard")["data"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (text(k).to_string(), text(v).as_bytes().to_vec()))
        .collect()
}

/// A directory laid out and updated the way the kubelet's atomic writer does it for a
/// ConfigMap volume: the files live in a hidden timestamped directory, `..data` links to
/// it, and each visible name is a link through `..data`. An update writes a new directory,
/// adds links for new names, renames a new `..data_tmp` link over `..data` (the one atomic
/// step), removes links to names that are gone, then the old directory
/// (kubernetes pkg/volume/util/atomic_writer.go, steps 5 to 11).
struct AtomicDir {
    root: PathBuf,
    current: Option<String>,
    updates: u32,
}

impl AtomicDir {
    fn new(root: &Path) -> AtomicDir {
        AtomicDir {
            root: root.to_path_buf(),
            current: None,
            updates: 0,
        }
    }

    fn write(&mut self, files: &BTreeMap<String, Vec<u8>>) {
        use std::os::unix::fs::symlink;
        self.updates += 1;
        let ts = format!("..2026_11_22_10_00_{:02}.{:09}", self.updates, self.updates);
        let dir = self.root.join(&ts);
        std::fs::create_dir(&dir).unwrap();
        for (name, content) in files {
            std::fs::write(dir.join(name), content).unwrap();
        }
        for name in files.keys() {
            let visible = self.root.join(name);
            if std::fs::symlink_metadata(&visible).is_err() {
                symlink(format!("..data/{name}"), &visible).unwrap();
            }
        }
        symlink(&ts, self.root.join("..data_tmp")).unwrap();
        std::fs::rename(self.root.join("..data_tmp"), self.root.join("..data")).unwrap();
        if let Some(old) = self.current.replace(ts) {
            for entry in std::fs::read_dir(self.root.join(&old)).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().to_string();
                if !files.contains_key(&name) {
                    std::fs::remove_file(self.root.join(&name)).unwrap();
                }
            }
            std::fs::remove_dir_all(self.root.join(old)).unwrap();
        }
    }
}

#[test]
fn kubernetes_manifests_agree_with_the_configmap_config() {
    let resources = kustomization_resources();
    for r in &resources {
        assert!(repo().join("docker/k8s").join(r).is_file(), "{r}");
    }
    assert!(
        !resources.contains(&"redis.yaml".to_string()),
        "Redis is optional: not in the kustomization"
    );
    let mut all = resources.clone();
    all.push("redis.yaml".into());
    let cluster = Cluster::load(&all);

    // The ConfigMap holds docker/k8s/config.yaml and exactly the repository's policies, byte
    // for byte.
    let mut files = configmap_files(&cluster);
    let config_text = files
        .remove("config.yaml")
        .expect("config.yaml in the ConfigMap");
    assert!(
        config_text == read("docker/k8s/config.yaml").as_bytes(),
        "the ConfigMap's config.yaml differs from docker/k8s/config.yaml; regenerate \
         configmap.yaml with the command at its top"
    );
    let policies = repo_policies();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        policies.keys().collect::<Vec<_>>(),
        "the ConfigMap's policies are policies/*.lua; regenerate configmap.yaml"
    );
    for (name, content) in &policies {
        assert!(
            &files[name] == content,
            "{name} in the ConfigMap differs from policies/{name}; regenerate configmap.yaml"
        );
    }

    // Laid out as the kubelet mounts it, the config passes `check`.
    let mounted = tempfile::tempdir().unwrap();
    AtomicDir::new(mounted.path()).write(&configmap_files(&cluster));
    assert_check_passes(&mounted.path().join("config.yaml"));
    let config = Config::load(&mounted.path().join("config.yaml")).unwrap();
    let admin = config
        .admin
        .as_ref()
        .expect("an admin listener for the probes");

    // The Deployment runs that config from a whole-volume mount of the ConfigMap (a subPath
    // mount would never see an update).
    let deployment = cluster.get("Deployment", "switchyard");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = only_container(deployment);
    let args = texts(&c["args"]);
    assert_eq!(args[..2], ["run", "--config"]);
    let config_at = Path::new(&args[2]);
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == "switchyard")
        .expect("a volume of the ConfigMap");
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the ConfigMap volume is mounted");
    assert!(
        mount.get("subPath").is_none(),
        "subPath mounts are never updated"
    );
    assert_eq!(
        Path::new(text(&mount["mountPath"])),
        config_at.parent().unwrap()
    );
    assert_eq!(
        config_at.file_name().unwrap(),
        "config.yaml",
        "the config file is the ConfigMap's key"
    );

    // Container ports are the config's; both listeners reachable from outside the pod.
    let listen = &config.listen[0].addr;
    assert_eq!(config.listen.len(), 1);
    assert_eq!(container_port(c, &"http".into()), port_of(listen));
    assert_eq!(container_port(c, &"admin".into()), port_of(&admin.addr));
    assert_eq!(host_of(listen), "0.0.0.0");
    assert_eq!(host_of(&admin.addr), "0.0.0.0", "kubelet probes the pod IP");

    // Readiness and liveness are the admin listener's health endpoint (public even with an
    // admin token).
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(text(&get["path"]), "/healthz", "{probe}");
        assert_eq!(
            container_port(c, &get["port"]),
            port_of(&admin.addr),
            "{probe}"
        );
    }
    // The admin token's variable is provided (from a Secret, optional: without it the admin
    // API stays locked).
    // The admin port is reachable from the cluster network: it must have a token.
    let env = c["env"].as_sequence().unwrap();
    let var = admin
        .token_env
        .as_ref()
        .expect("docker/k8s/config.yaml: the admin API needs `admin.token_env`");
    let e = env
        .iter()
        .find(|e| e["name"] == var.as_str())
        .unwrap_or_else(|| panic!("{var} is not in the container's env"));
    assert_eq!(e["valueFrom"]["secretKeyRef"]["optional"], true);

    // Non-root, as the image's user; a read-only root file system with /tmp writable for
    // Pingora's pid file (/tmp/switchyard-PORT.pid, src/server.rs).
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["runAsUser"].as_u64(),
        Some(image_uid() as u64)
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let tmp = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/tmp")
        .expect("/tmp mounted writable");
    assert!(pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| v["name"] == tmp["name"] && v.get("emptyDir").is_some()));

    // Termination waits for the preStop pause and Pingora's shutdown (the grace period, then
    // as long again for the runtimes).
    let pause: u64 = texts(&c["lifecycle"]["preStop"]["exec"]["command"])[1]
        .parse()
        .unwrap();
    let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        termination > pause + 2 * config.proxy.grace_period_seconds,
        "terminationGracePeriodSeconds {termination}"
    );

    // The Service sends its port to the listener.
    let service = cluster.get("Service", "switchyard");
    assert!(std::ptr::eq(
        cluster.selected_deployment(service),
        deployment
    ));
    let ports = service["spec"]["ports"].as_sequence().unwrap();
    assert_eq!(ports.len(), 1, "the admin port stays off the Service");
    assert_eq!(container_port(c, &ports[0]["targetPort"]), port_of(listen));

    // Each backend is a Service of mock-backends.yaml on the URL's port, reaching a mock
    // container that listens on every interface on that port, named as the backend.
    let image = text(&c["image"]);
    assert_eq!(
        image,
        text(&yaml("docker/compose.yaml")["services"]["switchyard"]["image"]),
        "the image docker compose builds"
    );
    for b in &config.backends {
        let (mock, target) = cluster.backend_container(&b.url);
        let args = texts(&mock["args"]);
        assert_eq!(args[0], "mock");
        assert_eq!(flag(&args, "--host"), Some("0.0.0.0"));
        assert_eq!(flag(&args, "--port"), Some(target.to_string().as_str()));
        assert_eq!(flag(&args, "--name"), Some(b.name.as_str()));
        assert_eq!(text(&mock["image"]), image);
    }

    // The optional Redis: the commented `redis:` line of config.yaml names redis.yaml's
    // Service and port.
    let line = read("docker/k8s/config.yaml")
        .lines()
        .find_map(|l| l.strip_prefix("# redis: ").map(str::to_string))
        .expect("a commented redis: line in config.yaml");
    let redis: Yaml = serde_yaml::from_str(&line).unwrap();
    let url = text(&redis["url"]);
    let authority = url.strip_prefix("redis://").unwrap();
    let svc = cluster.get("Service", host_of(authority));
    let sp = &svc["spec"]["ports"][0];
    assert_eq!(sp["port"].as_u64(), Some(port_of(authority) as u64));
    let redis_container = only_container(cluster.selected_deployment(svc));
    assert_eq!(container_port(redis_container, &sp["targetPort"]), 6379);
}

/// A policy that always sends traffic to `backend` (with a test case saying so).
fn pin(backend: &str) -> String {
    format!(
        r#"-- always {backend}
local P = {{}}
function P.route(req, backends) return "{backend}" end
P.tests = {{ {{ req = {{ model = "m" }},
  backends = {{ {{ name = "mock-a" }}, {{ name = "mock-b" }} }}, expect = "{backend}" }} }}
return P
"#
    )
}

/// A policy's version as Switchyard names it: the first 12 hex digits of its SHA-256.
fn version_of(source: &str) -> String {
    sha256_hex(source.as_bytes())[..12].to_string()
}

/// `GET /admin/policies` of a proxy whose admin API wants a token.
struct Policies {
    admin: u16,
    token: &'static str,
}

impl Policies {
    /// Poll until policy `name` is listed and `done` holds for it (within 3 s: the watcher's
    /// 250 ms debounce plus compiling and testing); its entry.
    async fn wait_for(
        &self,
        name: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut last = serde_json::Value::Null;
        while std::time::Instant::now() < deadline {
            let all: serde_json::Value = client()
                .get(format!("http://127.0.0.1:{}/admin/policies", self.admin))
                .bearer_auth(self.token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if let Some(p) = all["policies"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
            {
                if done(p) {
                    return p.clone();
                }
                last = p.clone();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("policy {name} did not reach the expected state within 3 s: {last}");
    }
}

/// Requests each mock received since the last call (each mock's count is reset).
async fn received_since(mocks: &[(&str, &Proc)]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (name, m) in mocks {
        out.insert(
            name.to_string(),
            mock_stats(m).await["requests"].as_u64().unwrap(),
        );
        client().post(m.url("/mock/reset")).send().await.unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_update_swaps_policies_and_config_without_restart() {
    let cluster = Cluster::load(&kustomization_resources());

    // The shipped ConfigMap, with loopback addresses (and model `m`, which the load helper
    // asks for, added to every backend); the backends are the mocks of mock-backends.yaml,
    // started with their manifest's arguments on free loopback ports.
    let mut files = configmap_files(&cluster);
    let mut config: Yaml = serde_yaml::from_slice(&files["config.yaml"]).unwrap();
    let (port, admin) = (free_port(), free_port());
    config["listen"][0]["addr"] = format!("127.0.0.1:{port}").into();
    config["admin"]["addr"] = format!("127.0.0.1:{admin}").into();
    config["proxy"]["grace_period_seconds"] = 0.into();
    let mut started = Vec::new();
    for backend in config["backends"].as_sequence_mut().unwrap() {
        let (container, _) = cluster.backend_container(text(&backend["url"]));
        let mock_port = free_port();
        let args = with_flag(&texts(&container["args"]), "--host", "127.0.0.1");
        let args = with_flag(&args, "--port", &mock_port.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mock = spawn(&args, mock_port, None, &[]);
        wait_ready(&mock.url("/health")).await;
        started.push((text(&backend["name"]).to_string(), mock));
        backend["url"] = format!("http://127.0.0.1:{mock_port}").into();
        backend["models"]
            .as_sequence_mut()
            .unwrap()
            .push("m".into());
    }
    let mocks: Vec<(&str, &Proc)> = started.iter().map(|(n, m)| (n.as_str(), m)).collect();
    assert_eq!(
        mocks.iter().map(|m| m.0).collect::<Vec<_>>(),
        ["mock-a", "mock-b"]
    );
    files.insert(
        "config.yaml".into(),
        serde_yaml::to_string(&config).unwrap().into_bytes(),
    );

    // Mounted as the kubelet mounts the ConfigMap, run with the Deployment's arguments, and
    // ready when its readiness probe says so.
    let dir = tempfile::tempdir().unwrap();
    let mut volume = AtomicDir::new(dir.path());
    volume.write(&files);
    let deployment = cluster.get("Deployment", "switchyard");
    let c = only_container(deployment);
    let mut args = texts(&c["args"]);
    let in_pod = Path::new(&args[2]).file_name().unwrap().to_owned();
    args[2] = dir.path().join(in_pod).to_string_lossy().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let token = "deploy-test-token";
    let p = spawn(&args, port, None, &[("SWITCHYARD_ADMIN_TOKEN", token)]);
    let probe = text(&c["readinessProbe"]["httpGet"]["path"]);
    wait_ready(&format!("http://127.0.0.1:{admin}{probe}")).await;
    wait_ready(&p.url("/v1/models")).await;
    let load = Load::start(p.url("/v1/chat/completions"), 3, 100_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = received_since(&mocks).await;
    assert!(before.values().all(|&n| n > 0), "round robin: {before:?}");

    // 1. A new version of the policy in service (round_robin, model m's route).
    files.insert("round_robin.lua".into(), pin("mock-b").into_bytes());
    volume.write(&files);
    let policies = Policies { admin, token };
    policies
        .wait_for("round_robin", |p| {
            p["version"] == version_of(&pin("mock-b"))
        })
        .await;
    received_since(&mocks).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = received_since(&mocks).await;
    assert_eq!(after["mock-a"], 0, "{after:?}\n{}", p.output());
    assert!(after["mock-b"] > 0, "{after:?}");

    // 2. A new policy and a config that routes to it, in one update.
    files.insert("pin_a.lua".into(), pin("mock-a").into_bytes());
    let mut config: Yaml = serde_yaml::from_slice(&files["config.yaml"]).unwrap();
    for route in config["routes"].as_sequence_mut().unwrap() {
        if route["policy"] == "round_robin" {
            route["policy"] = "pin_a".into();
        }
    }
    files.insert(
        "config.yaml".into(),
        serde_yaml::to_string(&config).unwrap().into_bytes(),
    );
    volume.write(&files);
    policies
        .wait_for("pin_a", |p| p["version"] == version_of(&pin("mock-a")))
        .await;
    received_since(&mocks).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = received_since(&mocks).await;
    assert_eq!(after["mock-b"], 0, "{after:?}\n{}", p.output());
    assert!(after["mock-a"] > 0, "{after:?}");

    // 3. A broken version is refused; the one in service keeps serving.
    files.insert("pin_a.lua".into(), b"local P = {\nreturn P\n".to_vec());
    volume.write(&files);
    let pin_a = policies
        .wait_for("pin_a", |p| p["last_rejection"]["reason"].is_string())
        .await;
    assert_eq!(pin_a["version"], version_of(&pin("mock-a")));
    received_since(&mocks).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = received_since(&mocks).await;
    assert_eq!(after["mock-b"], 0, "{after:?}");
    assert!(after["mock-a"] > 0, "{after:?}");

    // 4. A backend and a version of a policy in service that names it, in one update: the
    // policy is checked against the new config, so it is not refused first.
    let mut config: Yaml = serde_yaml::from_slice(&files["config.yaml"]).unwrap();
    let backends = config["backends"].as_sequence_mut().unwrap();
    let mut mock_c = backends
        .iter()
        .find(|b| b["name"] == "mock-b")
        .unwrap()
        .clone();
    mock_c["name"] = "mock-c".into();
    backends.push(mock_c);
    files.insert(
        "config.yaml".into(),
        serde_yaml::to_string(&config).unwrap().into_bytes(),
    );
    files.insert("pin_a.lua".into(), pin("mock-c").into_bytes());
    volume.write(&files);
    policies
        .wait_for("pin_a", |p| p["version"] == version_of(&pin("mock-c")))
        .await;
    let refused = format!(
        "policy pin_a version {} rejected",
        version_of(&pin("mock-c"))
    );
    assert!(!p.output().contains(&refused), "{}", p.output());
    received_since(&mocks).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = received_since(&mocks).await;
    assert_eq!(after["mock-a"], 0, "{after:?}");
    assert!(after["mock-b"] > 0, "mock-c is mock-b's server: {after:?}");

    let result = load.finish().await;
    assert!(result.sent > 100, "load ran: {}", result.sent);
    assert!(
        result.errors.is_empty(),
        "{} of {} failed: {:?}",
        result.errors.len(),
        result.sent,
        &result.errors[..result.errors.len().min(5)]
    );

    let log = p.output();
    assert_eq!(
        log.matches("switchyard listening on").count(),
        1,
        "served without a restart:\n{log}"
    );
}
