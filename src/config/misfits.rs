//! Every place where a config file does not fit the config's types. serde stops at the
//! first misfit; to list them all, each section, and each entry of a list section, is read
//! again on its own, and each misfit is named by its path (`backends[1].weight: …`).

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::{
    AdminConfig, AuditConfig, AuthConfig, BackendConfig, Config, HealthConfig, Listener, LuaConfig,
    OutlierConfig, ProxyConfig, RedisConfig, Route, TenantConfig,
};

/// Sections a config must have.
const REQUIRED: [&str; 2] = ["routes", "backends"];

/// The misfits of `root`, the whole file read as YAML, each as `path: what is wrong`.
/// `first` is serde's report of the first misfit, which also names its line: that one is
/// reported in those words.
pub(super) fn all(root: &Value, first: &str) -> Vec<String> {
    let Some(sections) = root.as_mapping() else {
        return vec![first.to_string()];
    };
    let mut found = Vec::new();
    for (key, value) in sections {
        let Some(name) = key.as_str() else {
            found.push(format!("{key:?}: a section name must be a string"));
            continue;
        };
        let mut one = |problem: Option<String>| found.extend(problem);
        match name {
            "listen" => each::<Listener>(name, value, &mut found),
            "admin" => one(misfit::<Option<AdminConfig>>(name, value)),
            "policies_dir" => one(misfit::<PathBuf>(name, value)),
            "routes" => each::<Route>(name, value, &mut found),
            "backends" => each::<BackendConfig>(name, value, &mut found),
            "proxy" => one(misfit::<ProxyConfig>(name, value)),
            "lua" => one(misfit::<LuaConfig>(name, value)),
            "outlier" => one(misfit::<OutlierConfig>(name, value)),
            "health" => one(misfit::<Option<HealthConfig>>(name, value)),
            "auth" => one(misfit::<AuthConfig>(name, value)),
            "audit" => one(misfit::<Option<AuditConfig>>(name, value)),
            "tenants" => each::<TenantConfig>(name, value, &mut found),
            "redis" => one(misfit::<Option<RedisConfig>>(name, value)),
            // serde's own words for a section it does not know.
            _ => {
                let alone = Value::Mapping([(key.clone(), value.clone())].into_iter().collect());
                one(misfit::<Config>("", &alone));
            }
        }
    }
    for name in REQUIRED {
        if !sections.contains_key(name) {
            found.push(format!("missing field `{name}`"));
        }
    }
    // serde's report in place of the same misfit found again, or first when it is not.
    let first_alone = without_location(first);
    match found.iter().position(|p| *p == first_alone) {
        Some(i) => found[i] = first.to_string(),
        None => found.insert(0, first.to_string()),
    }
    found
}

/// The misfits of each entry of the list section `name`.
fn each<T: DeserializeOwned>(name: &str, value: &Value, found: &mut Vec<String>) {
    match value.as_sequence() {
        Some(entries) => {
            for (i, entry) in entries.iter().enumerate() {
                found.extend(misfit::<T>(&format!("{name}[{i}]"), entry));
            }
        }
        None => found.extend(misfit::<Vec<T>>(name, value)),
    }
}

/// What keeps `value`, found at `path`, from being read as a `T`.
fn misfit<T: DeserializeOwned>(path: &str, value: &Value) -> Option<String> {
    // Read from text, not from the value, so that serde_yaml names the path within it.
    let text = serde_yaml::to_string(value).ok()?;
    let e = serde_yaml::from_str::<T>(&text).err()?;
    // Lines and columns would be those of the entry alone, not of the file.
    let message = without_location(&e.to_string());
    Some(match (path, within(&message)) {
        ("", _) => message,
        // A message of the config's own (`health: give …`) names its section already.
        (_, Some(inner)) if inner == path || inner.starts_with(&format!("{path}.")) => message,
        (_, Some(_)) => format!("{path}.{message}"),
        (_, None) => format!("{path}: {message}"),
    })
}

/// The path a serde_yaml message starts with (`weight` in `weight: invalid type: …`).
fn within(message: &str) -> Option<&str> {
    let (path, _) = message.split_once(": ")?;
    let is_path = !path.is_empty()
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'[' | b']'));
    is_path.then_some(path)
}

/// A serde_yaml message without its ` at line L column C`.
fn without_location(message: &str) -> String {
    match message.rsplit_once(" at line ") {
        Some((before, place))
            if place
                .split(" column ")
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            before.to_string()
        }
        _ => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_misfit_is_listed_by_its_path_the_first_with_its_line() {
        let text = r#"
listen: [{ addr: "127.0.0.1:18080" }]
routes:
  - match: { path_prefix: /v1/ }
    policy: round_robin
    max_atempts: 3
backends:
  - name: a
    url: http://127.0.0.1:9001
    models: [m]
    weight: heavy
  - name: b
    url: http://127.0.0.1:9002
    models: [m]
    wieght: 2
proxy: { max_body_bytes: lots }
tenants: { name: acme }
colour: blue
"#;
        let problems = Config::parse(text).unwrap_err().problems;
        let starts = [
            "routes[0]: unknown field `max_atempts`",
            "backends[0].weight: invalid type: string \"heavy\"",
            "backends[1]: unknown field `wieght`",
            "proxy.max_body_bytes: invalid type: string \"lots\"",
            "tenants: invalid type: map, expected a sequence",
            "unknown field `colour`, expected one of `listen`",
        ];
        assert_eq!(problems.len(), starts.len(), "{problems:#?}");
        for (problem, start) in problems.iter().zip(starts) {
            assert!(
                problem.starts_with(start),
                "{problem:?} should start {start:?}"
            );
        }
        // serde's own report of the first keeps the line; the others cannot know theirs.
        assert!(
            problems[0].ends_with(" at line 6 column 5"),
            "{}",
            problems[0]
        );
        assert!(problems[1..].iter().all(|p| !p.contains(" at line ")));

        // A message of the config's own names its section once, and no line it cannot know.
        let problems = Config::parse(
            "routes: [{ policy: p }]\nbackends: []\nhealth: { interval: 5s, interval_ms: 1 }\nlua: { x: 1 }\n",
        )
        .unwrap_err()
        .problems;
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert_eq!(
            problems[0],
            "health: give `interval` or `interval_ms`, not both"
        );
        assert!(
            problems[1].starts_with("lua: unknown field `x`"),
            "{problems:#?}"
        );

        // Sections that must be there, each missing one named.
        let problems = Config::parse("lua: { instruction_budget: many }\n")
            .unwrap_err()
            .problems;
        assert_eq!(
            problems,
            [
                "lua.instruction_budget: invalid type: string \"many\", expected u64 at line 1 column 28",
                "missing field `routes`",
                "missing field `backends`",
            ],
            "{problems:#?}"
        );
    }

    /// Every section of `Config` is read on its own here: a section added to the config but
    /// not to `all` would be reported as unknown.
    #[test]
    fn a_config_with_every_section_has_no_misfits() {
        let text = r#"
listen: [{ addr: "127.0.0.1:8443", tls: { cert: c.pem, key: k.pem } }]
admin: { addr: "127.0.0.1:9090", token_env: T }
policies_dir: policies
routes:
  - match: { path_prefix: /v1/, model: "gpt-*" }
    policy: round_robin
    params: { candidates: 2 }
backends:
  - { name: a, url: "http://127.0.0.1:9001", models: [m], cost: { input: 1, output: 2 }, tags: { tier: x } }
proxy: { threads: 2 }
lua: { instruction_budget: 5000 }
outlier: { consecutive_failures: 3 }
health: { interval: 5s }
auth: { mode: required }
audit: { path: audit.jsonl }
tenants:
  - { name: acme, key_sha256: ["00"], limits: { rpm: 60 } }
redis: { url: "redis://127.0.0.1:6379" }
"#;
        let config: Config = serde_yaml::from_str(text).expect("every section fits");
        let yaml = serde_yaml::to_value(&config).unwrap();
        let sections = yaml.as_mapping().unwrap();
        assert_eq!(sections.len(), 13, "every section is present");
        assert_eq!(all(&yaml, "first"), ["first"]);
    }
}
