//! The shipped Prometheus rules and scrape config (`conf/prometheus/`) and the Grafana
//! dashboard (`conf/grafana/switchyard.json`): they parse, have the structure Prometheus and
//! Grafana need, and every PromQL expression in them uses only the metrics and labels
//! Switchyard exports (DESIGN.md "Names"), which are in turn checked against the names
//! `src/metrics.rs` registers. A renamed metric or label breaks this test, not a dashboard
//! in production. No network, no Prometheus needed.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// Every metric the config files may use, with its labels, as DESIGN.md "Names" fixes them.
const METRICS: &[(&str, Kind, &[&str])] = &[
    (
        "switchyard_requests_total",
        Kind::Counter,
        &["backend", "model", "status"],
    ),
    (
        "switchyard_request_duration_seconds",
        Kind::Histogram,
        &["backend"],
    ),
    ("switchyard_ttft_seconds", Kind::Histogram, &["backend"]),
    (
        "switchyard_tokens_total",
        Kind::Counter,
        &["backend", "model", "direction"],
    ),
    (
        "switchyard_cost_usd_total",
        Kind::Counter,
        &["tenant", "backend"],
    ),
    ("switchyard_backend_inflight", Kind::Gauge, &["backend"]),
    ("switchyard_backend_healthy", Kind::Gauge, &["backend"]),
    (
        "switchyard_policy_decisions_total",
        Kind::Counter,
        &["policy", "backend"],
    ),
    (
        "switchyard_policy_errors_total",
        Kind::Counter,
        &["policy", "kind"],
    ),
    (
        "switchyard_policy_reloads_total",
        Kind::Counter,
        &["policy", "result"],
    ),
    (
        "switchyard_config_reloads_total",
        Kind::Counter,
        &["result"],
    ),
    (
        "switchyard_rate_limited_total",
        Kind::Counter,
        &["tenant", "limit"],
    ),
    ("switchyard_redis_up", Kind::Gauge, &[]),
    (
        "switchyard_upstream_attempts_total",
        Kind::Counter,
        &["backend", "outcome"],
    ),
    (
        "switchyard_tls_certificate_reloads_total",
        Kind::Counter,
        &["listener", "result"],
    ),
    (
        "switchyard_client_connections_closed_total",
        Kind::Counter,
        &["reason"],
    ),
];

/// Labels whose values are a closed set: an `=`/`!=` matcher must use one of them.
const CLOSED_VALUES: &[(&str, &[&str])] = &[
    ("direction", &["in", "out"]),
    ("result", &["loaded", "rejected"]),
    ("limit", &["requests", "tokens", "concurrent", "usd"]),
    ("outcome", &["success", "failure", "neutral"]),
    ("reason", &["header_timeout"]),
];

/// Metrics from outside Switchyard an expression may use (Prometheus's own `up`).
const FOREIGN_METRICS: &[&str] = &["up"];
/// Labels Prometheus attaches to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// The alerts operators are told exist.
const ALERTS: &[&str] = &[
    "SwitchyardBackendDown",
    "SwitchyardBackendErrorRate",
    "SwitchyardAllBackendsDown",
    "SwitchyardPolicyReloadRejected",
    "SwitchyardConfigReloadRejected",
    "SwitchyardPolicyErrors",
    "SwitchyardHighTTFT",
    "SwitchyardBudgetNear",
    "SwitchyardTenantRateLimited",
    "SwitchyardRedisDown",
];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: not YAML: {e}"))
}

fn str_at<'a>(v: &'a Yaml, key: &str, what: &str) -> &'a str {
    v.get(key)
        .and_then(Yaml::as_str)
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| panic!("{what}: `{key}` missing or not a non-empty string"))
}

// ---------------------------------------------------------------------------------------
// A small PromQL scanner: enough to find metric names, their label matchers and the label
// lists of `by`/`without`/`on`/`ignoring`/`group_*`, and nothing more.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// A number or a duration (`5m`, `0.95`).
    Num,
    /// A Grafana variable: `$backend`, `${backend}`, `$__rate_interval`.
    Var(String),
    Punct(char),
}

fn tokenize(expr: &str) -> Vec<Tok> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            let mut s = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                s.push(chars[i]);
                i += 1;
            }
            assert!(i < chars.len(), "unterminated string in `{expr}`");
            i += 1;
            out.push(Tok::Str(s));
        } else if c == '$' {
            i += 1;
            let braced = i < chars.len() && chars[i] == '{';
            if braced {
                i += 1;
            }
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            if braced {
                // `${name}` or `${name:format}`.
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            }
            assert!(!name.is_empty(), "bare `$` in `{expr}`");
            out.push(Tok::Var(name));
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
            out.push(Tok::Num);
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else {
            out.push(Tok::Punct(c));
            i += 1;
        }
    }
    out
}

/// One use of a metric in an expression.
#[derive(Debug)]
struct Use {
    /// The exported name, histogram suffix removed.
    metric: String,
    /// Labels this use may name: the metric's own, plus `le` for a `_bucket` series.
    labels: BTreeSet<String>,
    /// Token index, to tell which aggregation encloses it.
    at: usize,
}

/// What an expression uses, and every problem found on the way.
#[derive(Default, Debug)]
struct Scan {
    uses: Vec<Use>,
    /// Union of the `by (...)` lists (the labels an aggregated alert keeps).
    by_labels: BTreeSet<String>,
    aggregates: bool,
    vars: BTreeSet<String>,
    problems: Vec<String>,
}

fn labels_of(metric: &str) -> Option<(Kind, BTreeSet<String>)> {
    METRICS
        .iter()
        .find(|(n, _, _)| *n == metric)
        .map(|(_, k, l)| (*k, l.iter().map(|s| s.to_string()).collect()))
}

/// Resolve a series name to the metric it belongs to (`x_bucket` → histogram `x`).
fn resolve(series: &str) -> Result<(String, BTreeSet<String>), String> {
    if let Some((Kind::Counter | Kind::Gauge, labels)) = labels_of(series) {
        return Ok((series.to_string(), labels));
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if let Some((Kind::Histogram, mut labels)) = labels_of(base) {
                if suffix == "_bucket" {
                    labels.insert("le".into());
                }
                return Ok((base.to_string(), labels));
            }
        }
    }
    if labels_of(series).is_some() {
        return Err(format!(
            "`{series}` is a histogram: use its _bucket, _sum or _count series"
        ));
    }
    Err(format!("`{series}` is not a metric Switchyard exports"))
}

/// Index of the `)` matching the `(` at `open`.
fn matching(toks: &[Tok], open: usize) -> Option<usize> {
    let mut depth = 0;
    for (j, t) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Punct('(') => depth += 1,
            Tok::Punct(')') => {
                depth -= 1;
                if depth == 0 {
                    return Some(j);
                }
            }
            _ => {}
        }
    }
    None
}

/// The identifiers of a `(a, b)` list starting at `open`; returns them and the `)` index.
fn label_list(toks: &[Tok], open: usize) -> Result<(Vec<String>, usize), String> {
    let close = matching(toks, open).ok_or("unbalanced label list")?;
    let mut labels = Vec::new();
    for t in &toks[open + 1..close] {
        match t {
            Tok::Ident(l) => labels.push(l.clone()),
            Tok::Punct(',') => {}
            other => return Err(format!("unexpected {other:?} in a label list")),
        }
    }
    Ok((labels, close))
}

fn scan(expr: &str) -> Scan {
    let toks = tokenize(expr);
    let mut s = Scan::default();
    // Grafana variables, in the expression and inside its strings (`{backend=~"$backend"}`).
    for t in &toks {
        match t {
            Tok::Var(v) => {
                s.vars.insert(v.clone());
            }
            Tok::Str(text) => {
                for part in text.split('$').skip(1) {
                    let name: String = part
                        .trim_start_matches('{')
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        s.vars.insert(name);
                    }
                }
            }
            _ => {}
        }
    }
    // (labels, first token, last token) of each `by`/`without` argument, and the labels of
    // every `on`/`ignoring`/`group_*` list (checked against the whole expression).
    let mut groupings: Vec<(String, Vec<String>, usize, usize)> = Vec::new();
    let mut matchings: Vec<(String, Vec<String>)> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let next_is_paren = matches!(toks.get(i + 1), Some(Tok::Punct('(')));
        match &toks[i] {
            Tok::Ident(k) if (k == "by" || k == "without") && next_is_paren => {
                s.aggregates = true;
                match label_list(&toks, i + 1) {
                    Ok((labels, close)) => {
                        if !matches!(toks.get(close + 1), Some(Tok::Punct('('))) {
                            s.problems.push(format!(
                                "write `AGG {k} (labels) (expr)`, with the labels before the argument"
                            ));
                            i = close + 1;
                            continue;
                        }
                        let end = matching(&toks, close + 1).unwrap_or(toks.len() - 1);
                        if k == "by" {
                            s.by_labels.extend(labels.iter().cloned());
                        }
                        groupings.push((k.clone(), labels, close + 1, end));
                        i = close + 1;
                    }
                    Err(e) => {
                        s.problems.push(e);
                        i += 1;
                    }
                }
            }
            Tok::Ident(k)
                if matches!(k.as_str(), "on" | "ignoring" | "group_left" | "group_right")
                    && next_is_paren =>
            {
                match label_list(&toks, i + 1) {
                    Ok((labels, close)) => {
                        matchings.push((k.clone(), labels));
                        i = close + 1;
                    }
                    Err(e) => {
                        s.problems.push(e);
                        i += 1;
                    }
                }
            }
            Tok::Ident(k) if KEYWORDS.contains(&k.as_str()) => i += 1,
            // An aggregation: `sum (...)`, `sum by (...) (...)`.
            Tok::Ident(f) if AGGREGATIONS.contains(&f.as_str()) => {
                s.aggregates = true;
                i += 1;
            }
            Tok::Ident(f) if next_is_paren => {
                if f == "label_values" {
                    // label_values(metric{...}, label): the last identifier is a label.
                    if let Some(close) = matching(&toks, i + 1) {
                        if let (Some(Tok::Ident(label)), Some(Tok::Punct(','))) =
                            (toks.get(close - 1), toks.get(close - 2))
                        {
                            let label = label.clone();
                            let inner = scan_range(&toks, i + 2, close - 2, &mut s);
                            for (metric, labels) in inner {
                                if !labels.contains(&label) {
                                    s.problems.push(format!(
                                        "label_values: `{metric}` has no label `{label}`"
                                    ));
                                }
                            }
                            i = close + 1;
                            continue;
                        }
                    }
                    s.problems
                        .push("label_values(metric, label) expected".into());
                }
                i += 2;
            }
            Tok::Ident(_) => {
                i = metric_use(&toks, i, &mut s);
            }
            Tok::Punct('{') => {
                s.problems
                    .push("a selector without a metric name (`{...}`) is not allowed".into());
                i += 1;
            }
            _ => i += 1,
        }
    }
    for (k, labels, from, to) in &groupings {
        for u in s.uses.iter().filter(|u| (*from..=*to).contains(&u.at)) {
            for l in labels {
                if !u.labels.contains(l) {
                    s.problems.push(format!(
                        "`{k} ({l})` over `{}`, which has no label `{l}`",
                        u.metric
                    ));
                }
            }
        }
    }
    for (k, labels) in &matchings {
        for u in &s.uses {
            for l in labels {
                if !u.labels.contains(l) {
                    s.problems.push(format!(
                        "`{k} ({l})` with `{}`, which has no label `{l}`",
                        u.metric
                    ));
                }
            }
        }
    }
    s
}

/// Scan tokens `from..=to` for metric uses only (inside `label_values`).
fn scan_range(
    toks: &[Tok],
    from: usize,
    to: usize,
    s: &mut Scan,
) -> Vec<(String, BTreeSet<String>)> {
    let before = s.uses.len();
    let mut i = from;
    while i <= to {
        if let Tok::Ident(_) = &toks[i] {
            i = metric_use(toks, i, s);
        } else {
            i += 1;
        }
    }
    s.uses[before..]
        .iter()
        .map(|u| (u.metric.clone(), u.labels.clone()))
        .collect()
}

/// A metric name at `i`, with an optional `{matchers}`; returns the next token index.
fn metric_use(toks: &[Tok], i: usize, s: &mut Scan) -> usize {
    let Tok::Ident(name) = &toks[i] else {
        unreachable!()
    };
    let foreign = FOREIGN_METRICS.contains(&name.as_str());
    let labels = if foreign {
        None
    } else {
        match resolve(name) {
            Ok((metric, labels)) => {
                s.uses.push(Use {
                    metric,
                    labels: labels.clone(),
                    at: i,
                });
                Some(labels)
            }
            Err(e) => {
                s.problems.push(e);
                None
            }
        }
    };
    let mut j = i + 1;
    if !matches!(toks.get(j), Some(Tok::Punct('{'))) {
        return j;
    }
    j += 1;
    loop {
        match toks.get(j) {
            Some(Tok::Punct('}')) => return j + 1,
            Some(Tok::Punct(',')) => j += 1,
            Some(Tok::Ident(label)) => {
                // label, operator (`=`, `!=`, `=~`, `!~`), value.
                let mut k = j + 1;
                let mut op = String::new();
                while let Some(Tok::Punct(c @ ('=' | '!' | '~'))) = toks.get(k) {
                    op.push(*c);
                    k += 1;
                }
                let value = match toks.get(k) {
                    Some(Tok::Str(v)) => v.clone(),
                    other => {
                        s.problems.push(format!(
                            "{name}{{{label}{op}...}}: expected a string, got {other:?}"
                        ));
                        return k + 1;
                    }
                };
                if !matches!(op.as_str(), "=" | "!=" | "=~" | "!~") {
                    s.problems
                        .push(format!("{name}{{{label}{op}...}}: unknown matcher `{op}`"));
                }
                if let Some(labels) = &labels {
                    if !labels.contains(label) {
                        s.problems.push(format!("`{name}` has no label `{label}`"));
                    }
                }
                if let Some((_, allowed)) = CLOSED_VALUES.iter().find(|(l, _)| l == label) {
                    if (op == "=" || op == "!=") && !allowed.contains(&value.as_str()) {
                        s.problems.push(format!(
                            "{name}{{{label}{op}\"{value}\"}}: `{label}` is one of {allowed:?}"
                        ));
                    }
                }
                j = k + 1;
            }
            other => {
                s.problems
                    .push(format!("{name}{{...}}: unexpected {other:?}"));
                return j + 1;
            }
        }
    }
}

/// Fails with every problem of `expr`; returns its scan.
fn check_expr(what: &str, expr: &str, problems: &mut Vec<String>) -> Scan {
    let s = scan(expr);
    for p in &s.problems {
        problems.push(format!("{what}: {p}\n    in: {}", expr.trim()));
    }
    if s.uses.is_empty() {
        let uses_foreign = tokenize(expr)
            .iter()
            .any(|t| matches!(t, Tok::Ident(n) if FOREIGN_METRICS.contains(&n.as_str())));
        if !uses_foreign {
            problems.push(format!("{what}: no Switchyard metric in `{}`", expr.trim()));
        }
    }
    s
}

// ---------------------------------------------------------------------------------------

/// The scanner itself: what it must catch.
#[test]
fn the_scanner_catches_renamed_metrics_and_labels() {
    let ok = scan(
        r#"histogram_quantile(0.95, sum by (backend, le) (rate(switchyard_ttft_seconds_bucket{backend=~"$backend"}[$__rate_interval]))) > 5"#,
    );
    assert!(ok.problems.is_empty(), "{:?}", ok.problems);
    assert_eq!(ok.uses[0].metric, "switchyard_ttft_seconds");
    assert!(ok.vars.contains("backend") && ok.vars.contains("__rate_interval"));

    let bad = |e: &str| {
        let s = scan(e);
        assert!(!s.problems.is_empty(), "should be refused: {e}");
    };
    bad("rate(switchyard_request_total[5m])"); // renamed metric
    bad("rate(switchyard_requests_totals[5m])");
    bad("switchyard_ttft_seconds"); // histogram without a suffix
    bad("rate(switchyard_backend_inflight_bucket[5m])"); // gauge with a histogram suffix
    bad(r#"switchyard_requests_total{tenant="x"}"#); // label it does not have
    bad(r#"switchyard_tokens_total{direction="input"}"#); // closed value set
    bad(r#"switchyard_policy_reloads_total{result="failed"}"#);
    bad("sum by (tenant) (rate(switchyard_requests_total[5m]))");
    bad("sum by (le) (rate(switchyard_requests_total[5m]))");
    bad("sum(rate(switchyard_requests_total[5m])) by (backend)"); // by after the argument
    bad("switchyard_requests_total / on (tenant) switchyard_requests_total");
    bad("label_values(switchyard_requests_total, tenant)");
    bad(r#"{__name__="switchyard_requests_total"}"#);
}

#[test]
fn the_metric_table_matches_what_src_metrics_rs_registers() {
    // Each registration in src/metrics.rs is the metric's name, its help text, then its
    // label list: `"switchyard_x", "help", &["a", "b"]`.
    let src = read("src/metrics.rs");
    let mut registered = Vec::new();
    let mut rest = src.as_str();
    while let Some(at) = rest.find("\"switchyard_") {
        let after = &rest[at + 1..];
        let end = after.find('"').expect("closing quote");
        let name = &after[..end];
        // The registration ends at its `.expect(`; a gauge without labels has no `&[`.
        let registration = &after[..after.find(".expect(").expect("`.expect(` after a metric")];
        let labels: BTreeSet<String> = match registration.find("&[") {
            Some(at) => {
                let end = at + registration[at..].find(']').expect("`]`");
                registration[at + 2..end]
                    .split(',')
                    .map(|l| l.trim().trim_matches('"').to_string())
                    .filter(|l| !l.is_empty())
                    .collect()
            }
            None => BTreeSet::new(),
        };
        registered.push((name.to_string(), labels));
        rest = &after[registration.len()..];
    }
    assert!(!registered.is_empty(), "no metric found in src/metrics.rs");
    let mut problems = Vec::new();
    for (name, _, labels) in METRICS {
        let want: BTreeSet<String> = labels.iter().map(|s| s.to_string()).collect();
        match registered.iter().find(|(n, _)| n == name) {
            None => problems.push(format!(
                "{name}: used by conf/ but not registered in src/metrics.rs (renamed or removed?)"
            )),
            Some((_, got)) if *got != want => problems.push(format!(
                "{name}: src/metrics.rs has labels {got:?}, conf/ assumes {want:?}"
            )),
            Some(_) => {}
        }
    }
    // And every metric registered is in the table (so the dashboard must show it).
    for (name, _) in &registered {
        if !METRICS.iter().any(|(n, _, _)| n == name) {
            problems.push(format!(
                "{name}: registered in src/metrics.rs but missing from this file's METRICS"
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn alert_rules_are_complete_and_use_only_exported_metrics() {
    let doc = yaml("conf/prometheus/alerts.yml");
    let groups = doc
        .get("groups")
        .and_then(Yaml::as_sequence)
        .filter(|g| !g.is_empty())
        .expect("alerts.yml: `groups` must be a non-empty list");
    let mut problems = Vec::new();
    let mut names = HashSet::new();
    for (gi, group) in groups.iter().enumerate() {
        let gname = str_at(group, "name", &format!("groups[{gi}]"));
        let rules = group
            .get("rules")
            .and_then(Yaml::as_sequence)
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| panic!("group {gname}: `rules` must be a non-empty list"));
        for (ri, rule) in rules.iter().enumerate() {
            let what = format!("group {gname} rule {ri}");
            let alert = str_at(rule, "alert", &what);
            let what = format!("alert {alert}");
            assert!(names.insert(alert.to_string()), "{what}: defined twice");
            let expr = str_at(rule, "expr", &what);
            let r#for = str_at(rule, "for", &what);
            assert!(
                r#for.len() >= 2
                    && r#for[..r#for.len() - 1].chars().all(|c| c.is_ascii_digit())
                    && "smhd".contains(&r#for[r#for.len() - 1..]),
                "{what}: `for: {for}` is not a duration like 5m",
                for = r#for
            );
            let labels = rule.get("labels").unwrap_or(&Yaml::Null);
            let severity = str_at(labels, "severity", &format!("{what} labels"));
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{what}: severity `{severity}` is not critical, warning or info"
            );
            let annotations = rule.get("annotations").unwrap_or(&Yaml::Null);
            let summary = str_at(annotations, "summary", &format!("{what} annotations"));
            let description = str_at(annotations, "description", &format!("{what} annotations"));

            let s = check_expr(&what, expr, &mut problems);
            // `{{ $labels.x }}` must name a label the alert's series carry: the `by` labels
            // of an aggregated expression, else the metrics' own and the target labels.
            let carried: BTreeSet<String> = if s.aggregates {
                s.by_labels.clone()
            } else {
                s.uses
                    .iter()
                    .flat_map(|u| u.labels.iter().cloned())
                    .chain(TARGET_LABELS.iter().map(|l| l.to_string()))
                    .collect()
            };
            for text in [summary, description] {
                for part in text.split("$labels.").skip(1) {
                    let label: String = part
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !carried.contains(&label) {
                        problems.push(format!(
                            "{what}: annotation uses $labels.{label}, but the alert's series carry only {carried:?}"
                        ));
                    }
                }
            }
            if !s.vars.is_empty() {
                problems.push(format!(
                    "{what}: Grafana variables {:?} in a Prometheus rule",
                    s.vars
                ));
            }
        }
    }
    for a in ALERTS {
        if !names.contains(*a) {
            problems.push(format!("alert {a} is missing"));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn prometheus_config_scrapes_the_admin_listener_and_loads_the_rules() {
    let doc = yaml("conf/prometheus/prometheus.yml");
    let dir = Path::new("conf/prometheus");
    let rule_files: Vec<&str> = doc
        .get("rule_files")
        .and_then(Yaml::as_sequence)
        .expect("prometheus.yml: `rule_files` list")
        .iter()
        .map(|f| f.as_str().expect("rule file is a string"))
        .collect();
    assert!(
        rule_files.contains(&"alerts.yml"),
        "rule_files: {rule_files:?}"
    );
    for f in &rule_files {
        assert!(
            root().join(dir).join(f).is_file(),
            "rule file {f} does not exist beside prometheus.yml"
        );
    }
    let scrapes = doc
        .get("scrape_configs")
        .and_then(Yaml::as_sequence)
        .expect("prometheus.yml: `scrape_configs` list");
    let job = scrapes
        .iter()
        .find(|s| {
            s.get("static_configs")
                .and_then(Yaml::as_sequence)
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("targets").and_then(Yaml::as_sequence))
                .flatten()
                .any(|t| t.as_str() == Some("127.0.0.1:9090"))
        })
        .expect("a scrape config with target 127.0.0.1:9090");
    let job_name = str_at(job, "job_name", "scrape config");
    let path = job
        .get("metrics_path")
        .and_then(Yaml::as_str)
        .unwrap_or("/metrics");
    assert_eq!(path, "/metrics");
    assert_ne!(
        job.get("scheme").and_then(Yaml::as_str),
        Some("https"),
        "the admin listener is plain HTTP"
    );
    // The rules that watch the target (`up{job="..."}`) name this job.
    let alerts = read("conf/prometheus/alerts.yml");
    for part in alerts.split("job=\"").skip(1) {
        let name = &part[..part.find('"').unwrap()];
        assert_eq!(
            name, job_name,
            "alerts.yml refers to job {name}, prometheus.yml scrapes {job_name}"
        );
    }
}

/// Every panel, rows' collapsed panels included.
fn all_panels(dash: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("`panels` list") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

#[test]
fn grafana_dashboard_imports_and_uses_only_exported_metrics() {
    let text = read("conf/grafana/switchyard.json");
    let dash: Json = serde_json::from_str(&text).expect("switchyard.json is not JSON");
    let mut problems = Vec::new();

    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(
        dash["title"].as_str().is_some_and(|t| !t.is_empty()),
        "title"
    );
    assert!(dash["uid"].as_str().is_some_and(|t| !t.is_empty()), "uid");
    // Imported through the UI, `${DS_PROMETHEUS}` is replaced by the data source chosen.
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "__inputs must declare DS_PROMETHEUS, a prometheus datasource"
    );
    let ds_ok = |ds: &Json| ds["type"] == "prometheus" && ds["uid"] == "${DS_PROMETHEUS}";

    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .map(|l| l.iter().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default();
    let check_vars = |what: &str, s: &Scan, problems: &mut Vec<String>| {
        for v in &s.vars {
            if !v.starts_with("__") && !vars.contains(&v.as_str()) {
                problems.push(format!("{what}: ${v} is not a dashboard variable"));
            }
        }
    };
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().expect("variable name");
        if v["type"] != "query" {
            continue;
        }
        let what = format!("variable {name}");
        if !ds_ok(&v["datasource"]) {
            problems.push(format!("{what}: datasource must be ${{DS_PROMETHEUS}}"));
        }
        let query = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or("");
        let s = check_expr(&what, query, &mut problems);
        check_vars(&what, &s, &mut problems);
    }

    let mut ids = HashSet::new();
    let mut metrics_shown = BTreeSet::new();
    for p in all_panels(&dash) {
        let id = p["id"].as_u64().expect("every panel has a numeric id");
        let title = p["title"].as_str().unwrap_or("");
        assert!(ids.insert(id), "panel id {id} ({title}) is used twice");
        let what = format!("panel {id} \"{title}\"");
        for k in ["x", "y", "w", "h"] {
            if !p["gridPos"][k].is_u64() {
                problems.push(format!("{what}: gridPos.{k} missing"));
            }
        }
        if p["type"] == "row" {
            continue;
        }
        if title.is_empty() {
            problems.push(format!("{what}: no title"));
        }
        if !ds_ok(&p["datasource"]) {
            problems.push(format!("{what}: datasource must be ${{DS_PROMETHEUS}}"));
        }
        let targets = p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{what}: no targets"));
        }
        let mut refs = HashSet::new();
        for t in targets {
            let r = t["refId"].as_str().unwrap_or("");
            if r.is_empty() || !refs.insert(r) {
                problems.push(format!("{what}: refId `{r}` missing or repeated"));
            }
            if t.get("datasource").is_some() && !ds_ok(&t["datasource"]) {
                problems.push(format!(
                    "{what}: target datasource must be ${{DS_PROMETHEUS}}"
                ));
            }
            let Some(expr) = t["expr"].as_str().filter(|e| !e.trim().is_empty()) else {
                problems.push(format!("{what}: target {r} has no expr"));
                continue;
            };
            let s = check_expr(&what, expr, &mut problems);
            check_vars(&what, &s, &mut problems);
            metrics_shown.extend(s.uses.into_iter().map(|u| u.metric));
        }
    }
    // The dashboard shows every metric Switchyard exports.
    for (name, _, _) in METRICS {
        if !metrics_shown.contains(*name) {
            problems.push(format!("no panel shows {name}"));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}
