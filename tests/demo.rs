//! `switchyard demo`, the README's first command. Run outside a checkout, as a new user
//! who only has the binary would: it serves the embedded config over its three in-process
//! mock backends (on ports of the test's choosing, `--port` and the like: the defaults,
//! 8080, 9090 and 18101-18103, may be taken on a test machine), the commands it prints
//! work as printed, and the policies it wrote are gone once it stops.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::*;

/// The shell commands the demo printed: each `curl` to the line's end, with its `\`
/// continuations.
fn printed_commands(output: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut lines = output.lines();
    while let Some(line) = lines.next() {
        let Some(at) = line.find("curl ") else {
            continue;
        };
        let mut command = line[at..].trim().to_string();
        while command.ends_with('\\') {
            command.pop();
            command.push_str(lines.next().expect("a continued line").trim());
        }
        commands.push(command);
    }
    commands
}

/// curl, which the printed commands use (`tests/apt-install.sh` installs it if missing).
fn need_curl() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apt-install.sh");
    let status = Command::new("bash")
        .args([script, "curl"])
        .status()
        .unwrap();
    assert!(status.success(), "installing curl failed: {status}");
}

fn sh(command: &str) -> String {
    let out = Command::new("sh").args(["-c", command]).output().unwrap();
    assert!(out.status.success(), "{command}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_what_it_prints_and_leaves_nothing_behind() {
    need_curl();
    let cwd = tempfile::tempdir().unwrap(); // no ./policies here
    let tmp = tempfile::tempdir().unwrap(); // the demo's TMPDIR
    let tmp_path = tmp.path().to_str().unwrap();
    // Its own ports, so that nothing else on the machine (or the 8080 every web framework
    // defaults to) is in the way; the commands it prints follow them.
    let (port, admin, mocks) = (free_port(), free_port(), free_ports(3));
    let ports = [port, admin, mocks].map(|p| p.to_string());
    let mut demo = spawn_in(
        cwd.path(),
        &[
            "demo",
            "--port",
            &ports[0],
            "--admin-port",
            &ports[1],
            "--mock-port",
            &ports[2],
        ],
        port,
        &[("TMPDIR", tmp_path)],
    );
    wait_ready(&demo.url("/v1/models")).await;
    // Ready means this demo, not something else already on its port.
    assert!(
        demo.exited().is_none(),
        "the demo stopped:\n{}",
        demo.output()
    );

    // The built-in policies, written to a directory of the demo's own.
    let dirs: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert!(dirs[0].join("round_robin.lua").is_file());
    assert!(demo.output().contains(&dirs[0].display().to_string()));

    let commands = printed_commands(&demo.output());
    assert_eq!(commands.len(), 3, "{commands:?}\n{}", demo.output());
    let (plain, streamed, models) = (&commands[0], &commands[1], &commands[2]);

    // Round robin over the three backends of demo-small, and only those. Each worker
    // thread (one per CPU) keeps its own cursor, so how many requests it takes to see all
    // three depends on which thread takes each; a bound keeps it finite.
    let everyone: BTreeSet<String> = ["mock-eu-1", "mock-eu-2", "mock-us-1"]
        .map(String::from)
        .into();
    let mut served = BTreeSet::new();
    for _ in 0..100 {
        if served == everyone {
            break;
        }
        let answer = sh(plain);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let backend = answer
            .lines()
            .find_map(|l| l.strip_prefix("x-switchyard-backend: "))
            .unwrap_or_else(|| panic!("no backend named: {answer}"));
        served.insert(backend.trim().to_string());
    }
    assert_eq!(served, everyone);

    let stream = sh(streamed);
    assert!(stream.contains("\"chat.completion.chunk\""), "{stream}");
    assert!(stream.trim_end().ends_with("data: [DONE]"), "{stream}");

    let list = sh(models);
    for model in ["demo-small", "demo-large"] {
        assert!(list.contains(&format!("\"{model}\"")), "{list}");
    }

    // The dashboard and the metrics it prints the address of.
    let dashboard = format!("http://127.0.0.1:{admin}/");
    assert!(demo.output().contains(&dashboard));
    let page = client().get(&dashboard).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<html"));
    let metrics = metrics_text(admin).await;
    assert!(
        metrics.contains("switchyard_requests_total{backend=\"mock-eu-2\""),
        "{metrics}"
    );

    // Ctrl-C: it stops, and its policies' directory goes with it.
    demo.signal("INT");
    let status = demo
        .wait_exit(Duration::from_secs(10))
        .expect("the demo stopped");
    assert!(status.success(), "{status:?}\n{}", demo.output());
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
