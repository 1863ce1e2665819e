//! Running a policy's own `tests` table: what `switchyard check` prints, and the gate a new
//! policy version must pass before it may serve traffic.
//!
//! A case is `{ req = {...}, backends = {...}, expect = ... }` where `expect` is a name, a
//! list of names (the whole answer, in order), or `{ status = 429 }` for a rejection.
//! `expect_first = "name"` checks only the first choice. Missing request and backend fields
//! get the values of an idle backend and a plain chat request. `unavailable = {...}` lists
//! configured backends that were not offered, for `sy.backends` to show.

use mlua::{Function, Table, Value};

use super::vm::{describe_value, PolicyVm};
use super::{Decision, Policy, PolicyError};
use crate::config::LuaConfig;

/// Outcome of one test case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// 1-based position in `tests`.
    pub index: usize,
    /// The case's `name`, if it has one.
    pub name: Option<String>,
    pub passed: bool,
    pub expected: String,
    pub actual: String,
}

/// Outcome of checking one policy file.
#[derive(Debug, Clone)]
pub struct Report {
    pub policy: String,
    pub version: String,
    /// Set when the file did not compile or load; no case ran then.
    pub load_error: Option<String>,
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// `None` when the policy loaded and every case passed; else one line on the first
    /// problem (with the count of failed cases).
    pub fn failure_summary(&self) -> Option<String> {
        if let Some(e) = &self.load_error {
            return Some(e.clone());
        }
        let failed: Vec<&CaseResult> = self.cases.iter().filter(|c| !c.passed).collect();
        let first = failed.first()?;
        Some(format!(
            "{} of {} test case(s) failed; case {}{}: expected {}, got {}",
            failed.len(),
            self.cases.len(),
            first.index,
            first
                .name
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default(),
            first.expected,
            first.actual
        ))
    }

    pub fn passed(&self) -> bool {
        self.failure_summary().is_none()
    }
}

/// Compile `policy` in a fresh sandbox and run its `tests`.
pub fn run(policy: &Policy, limits: &LuaConfig, configured: Option<&[String]>) -> Report {
    let mut report = Report {
        policy: policy.name.clone(),
        version: policy.version.clone(),
        load_error: None,
        cases: Vec::new(),
    };
    let outcome = PolicyVm::new(limits)
        .map_err(|e| e.to_string())
        .and_then(|mut vm| {
            run_cases(&mut vm, policy, CASES_TIME, configured).map(|cases| report.cases = cases)
        });
    if let Err(e) = outcome {
        report.load_error = Some(e);
    }
    report
}

/// Most test cases a policy may have.
const MAX_CASES: usize = 1000;
/// Longest all of a policy's cases may take together: each case has its instruction
/// budget, but many cases that spend it would hold `check`, start-up or a reload for long.
const CASES_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// `configured`: the names of the config's backends, when known. A name a case returns
/// that is neither among the case's backends nor configured fails the case, as it would
/// fail every request once in service.
fn run_cases(
    vm: &mut PolicyVm,
    policy: &Policy,
    within: std::time::Duration,
    configured: Option<&[String]>,
) -> Result<Vec<CaseResult>, String> {
    let module = vm.module(policy).map_err(|e| e.to_string())?;
    let route = module
        .get::<mlua::Function>("route")
        .map_err(|e| e.to_string())?;
    let tests = match module.get::<Value>("tests").map_err(|e| e.to_string())? {
        Value::Nil => return Ok(Vec::new()),
        Value::Table(t) => t,
        other => {
            return Err(format!(
                "`tests` must be a table, not {}",
                describe_value(&other)
            ))
        }
    };
    let make_req = vm.helper("test_request").map_err(|e| e.to_string())?;
    let make_backend = vm.helper("test_backend").map_err(|e| e.to_string())?;
    let make_listing = vm.helper("test_listing").map_err(|e| e.to_string())?;
    if tests.raw_len() > MAX_CASES {
        return Err(format!(
            "`tests` has {} cases; at most {MAX_CASES} are run",
            tests.raw_len()
        ));
    }
    // A list, every case numbered 1..n: a case after a gap or under a name would be
    // skipped without a word.
    let count = tests.raw_len();
    // `{ a, nil, c }` has a length of 3 with nothing at 2: each place must hold a case.
    for i in 1..=count {
        if tests
            .raw_get::<Value>(i)
            .map_err(|e| e.to_string())?
            .is_nil()
        {
            return Err(format!(
                "`tests` must be a list without gaps: tests[{i}] is nil (a case held in a misspelled variable?)"
            ));
        }
    }
    for pair in tests.pairs::<Value, Value>() {
        let (key, _) = pair.map_err(|e| e.to_string())?;
        match key {
            Value::Integer(i) if i >= 1 && (i as usize) <= count => {}
            Value::Integer(i) => {
                return Err(format!(
                    "`tests` must be a list without gaps: tests[{i}] comes after the list ends at tests[{count}]"
                ))
            }
            other => {
                return Err(format!(
                    "`tests` must be a list of cases ({{ {{ ... }}, {{ ... }} }}), not have a key {}",
                    describe_value(&other)
                ))
            }
        }
    }
    let started = std::time::Instant::now();
    let mut results = Vec::new();
    for (i, case) in tests.sequence_values::<Table>().enumerate() {
        let index = i + 1;
        if started.elapsed() > within {
            return Err(format!(
                "`tests` took longer than {} ms; stopped before tests[{index}]",
                within.as_millis()
            ));
        }
        let case = case.map_err(|_| format!("tests[{index}] is not a table"))?;
        let name = case.get::<Option<String>>("name").ok().flatten();
        let mut names = Vec::new();
        let prepared = (|| -> mlua::Result<(Table, Table, Function)> {
            let req: Table = make_req.call(case.get::<Value>("req")?)?;
            let backends = vm.lua().create_table()?;
            let offered = case.get::<Option<Table>>("backends")?;
            if let Some(list) = &offered {
                for b in list.sequence_values::<Table>() {
                    let b = make_backend.call::<Table>(b?)?;
                    names.extend(name_in(&b)?);
                    backends.raw_push(b)?;
                }
            }
            // Configured backends that are not offered: `sy.backends` lists them.
            let unavailable = case.get::<Option<Table>>("unavailable")?;
            if let Some(list) = &unavailable {
                for b in list.sequence_values::<Table>() {
                    names.extend(name_in(&b?)?);
                }
            }
            let listing = make_listing.call((offered, unavailable))?;
            Ok((req, backends, listing))
        })();
        let (req, backends, listing) = match prepared {
            Ok(v) => v,
            Err(e) => return Err(format!("tests[{index}]: {e}")),
        };
        let expectation = Expectation::read(&case).map_err(|e| format!("tests[{index}]: {e}"))?;
        // A name no backend has fails a real request (500), so it fails the case too,
        // whatever the case expected.
        let unknown = |n: &String| !names.contains(n) && configured.is_some_and(|c| !c.contains(n));
        let actual = vm
            .call_test_case(&route, req, backends, listing)
            .and_then(|d| match &d {
                Decision::Candidates(chosen) => match chosen.iter().find(|n| unknown(n)) {
                    Some(unknown) => Err(PolicyError::UnknownBackend(unknown.clone())),
                    None => Ok(d),
                },
                Decision::Reject { .. } => Ok(d),
            });
        let actual_text = match &actual {
            Ok(d) => describe_decision(d),
            Err(e) => format!("policy failure: {e}"),
        };
        results.push(CaseResult {
            index,
            name,
            passed: actual.as_ref().is_ok_and(|d| expectation.matches(d)),
            expected: expectation.describe(),
            actual: actual_text,
        });
    }
    Ok(results)
}

/// What a test case expects.
enum Expectation {
    Exactly(Vec<String>),
    First(String),
    Status(u16),
}

impl Expectation {
    fn read(case: &Table) -> Result<Expectation, String> {
        let err = |e: mlua::Error| e.to_string();
        let name = |s: mlua::LuaString| super::backend_name(&s).map_err(|e| e.to_string());
        let first = case
            .get::<Option<mlua::LuaString>>("expect_first")
            .map_err(err)?;
        if let Some(first) = first.map(name).transpose()? {
            if !case.get::<Value>("expect").map_err(err)?.is_nil() {
                return Err("has both `expect` and `expect_first`: give one".into());
            }
            return Ok(Expectation::First(first));
        }
        match case.get::<Value>("expect").map_err(err)? {
            Value::String(s) => Ok(Expectation::Exactly(vec![name(s)?])),
            Value::Table(t) => {
                if let Some(status) = t.get::<Option<u16>>("status").map_err(err)? {
                    return Ok(Expectation::Status(status));
                }
                let names = t
                    .sequence_values::<mlua::LuaString>()
                    .map(|s| name(s.map_err(err)?))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Expectation::Exactly(names))
            }
            other => Err(format!(
                "needs `expect` (a name, a list of names, or {{ status = N }}) or `expect_first`, found {}",
                describe_value(&other)
            )),
        }
    }

    fn matches(&self, d: &Decision) -> bool {
        match (self, d) {
            (Expectation::Exactly(want), Decision::Candidates(got)) => want == got,
            (Expectation::First(want), Decision::Candidates(got)) => got.first() == Some(want),
            (Expectation::Status(want), Decision::Reject { status, .. }) => want == status,
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Expectation::Exactly(names) => format!("{names:?}"),
            Expectation::First(name) => format!("{name:?} first"),
            Expectation::Status(s) => format!("reject with {s}"),
        }
    }
}

fn describe_decision(d: &Decision) -> String {
    match d {
        Decision::Candidates(names) => format!("{names:?}"),
        Decision::Reject { status, message } => format!("reject with {status} ({message:?})"),
    }
}

/// A test case backend's `name`, if it has one that could be a backend's.
fn name_in(backend: &Table) -> mlua::Result<Option<String>> {
    backend
        .get::<Option<mlua::LuaString>>("name")?
        .map(|s| super::backend_name(&s).map_err(|e| mlua::Error::runtime(e.to_string())))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn policy(cases: usize, route: &str) -> Policy {
        let source = format!(
            "local P = {{ tests = {{}} }}\nfunction P.route(req, b) {route} end\n\
             for i = 1, {cases} do P.tests[i] = {{ backends = {{ {{ name = 'a' }} }}, expect = 'a' }} end\n\
             return P"
        );
        Policy::new("p", source, PathBuf::from("p.lua"))
    }

    fn with_tests(tests: &str) -> Report {
        let source = format!(
            "local P = {{ tests = {tests} }}\nfunction P.route(req, b) return 'ghost' end\nreturn P"
        );
        run(
            &Policy::new("p", source, PathBuf::from("p.lua")),
            &LuaConfig::default(),
            Some(&["a".to_string()]),
        )
    }

    #[test]
    fn a_name_no_backend_has_fails_the_case_as_it_would_a_request() {
        // `ghost` is neither among the case's backends nor configured (`a` is).
        let report = with_tests("{ { backends = { { name = 'a' } }, expect = 'ghost' } }");
        assert!(!report.passed());
        let case = &report.cases[0];
        assert!(!case.passed);
        assert!(case.actual.contains("unknown backend"), "{}", case.actual);
        // A configured name the case does not list is a backend the policy may name.
        let source = "local P = { tests = { { backends = { { name = 'b' } }, expect = 'a' } } }\n\
                      function P.route(req, b) return 'a' end\nreturn P";
        let policy = Policy::new("p", source.into(), PathBuf::from("p.lua"));
        assert!(run(&policy, &LuaConfig::default(), Some(&["a".to_string()])).passed());
        // Without the config (`switchyard check FILE`) a name the case does not list may
        // be a configured backend: it is not held against the case.
        let source =
            "local P = { tests = { { backends = { { name = 'b' } }, expect = 'ghost' } } }\n\
                      function P.route(req, b) return 'ghost' end\nreturn P";
        let policy = Policy::new("p", source.into(), PathBuf::from("p.lua"));
        assert!(run(&policy, &LuaConfig::default(), None).passed());
    }

    #[test]
    fn a_case_sees_params_as_a_request_in_service_does() {
        // Without `params`, an empty table; with them, a copy no call can write to.
        let source = "local P = { tests = {\n\
            { backends = { { name = 'a' } }, expect = 'a' },\n\
            { req = { params = { chain = { 'x' } } }, backends = { { name = 'a' } }, expect = 'a' } } }\n\
            function P.route(req, b)\n\
              assert(type(req.params) == 'table', 'params is ' .. type(req.params))\n\
              assert(not pcall(function() req.params.k = 1 end), 'params written')\n\
              local chain = req.params.chain\n\
              assert(not chain or not pcall(function() chain[2] = 'y' end), 'chain written')\n\
              return 'a'\n\
            end\nreturn P";
        let policy = Policy::new("p", source.into(), PathBuf::from("p.lua"));
        let report = run(&policy, &LuaConfig::default(), None);
        assert!(
            report.passed(),
            "{:?} {:?}",
            report.load_error,
            report.cases.iter().map(|c| &c.actual).collect::<Vec<_>>()
        );
        assert_eq!(report.cases.len(), 2);
    }

    #[test]
    fn sy_backends_lists_a_cases_backends_and_its_unavailable_ones() {
        let source = r#"local P = {}
function P.route(req, b)
  local out = {}
  local listed = sy.backends({ model = req.model, all = req.params.all })
  table.sort(listed, function(x, y) return x.name > y.name end) -- a fresh list
  for _, e in ipairs(listed) do
    out[#out + 1] = table.concat({ e.name, tostring(e.eligible), tostring(e.why_not), tostring(e.healthy) }, ":")
  end
  return out
end
local backends = { { name = "a", models = { "m" } }, { name = "b", models = { "x" } } }
local unavailable = { { name = "c" }, { name = "d", why_not = "draining" } }
P.tests = {
  { req = { model = "m", params = { all = true } }, backends = backends, unavailable = unavailable,
    expect = { "d:false:draining:true", "c:false:unhealthy:false", "a:true:nil:true" } },
  { req = { model = "m" }, backends = backends, unavailable = unavailable,
    expect = { "a:true:nil:true" } },
  { req = { model = "x" }, backends = backends, expect = { "b:true:nil:true" } },
}
return P"#;
        let policy = Policy::new("p", source.into(), PathBuf::from("p.lua"));
        let report = run(&policy, &LuaConfig::default(), None);
        let actual: Vec<_> = report.cases.iter().map(|c| &c.actual).collect();
        assert!(report.passed(), "{:?} {actual:?}", report.load_error);
        assert_eq!(report.cases.len(), 3);
    }

    #[test]
    fn a_case_expects_one_way() {
        let report =
            with_tests("{ { backends = { { name = 'a' } }, expect = 'a', expect_first = 'a' } }");
        let error = report.load_error.unwrap();
        assert!(
            error.contains("tests[1]: has both `expect` and `expect_first`"),
            "{error}"
        );
    }

    #[test]
    fn every_case_is_in_one_list() {
        let case = "{ backends = { { name = 'ghost' } }, expect = 'ghost' }";
        let report = with_tests(&format!("{{ [1] = {case}, [3] = {case} }}"));
        let error = report.load_error.unwrap();
        assert!(
            error.contains("tests[3] comes after the list ends at tests[1]"),
            "{error}"
        );
        let report = with_tests(&format!("{{ {case}, nil, {case} }}"));
        let error = report.load_error.unwrap();
        assert!(error.contains("tests[2] is nil"), "{error}");
        let report = with_tests(&format!("{{ first = {case} }}"));
        let error = report.load_error.unwrap();
        assert!(
            error.contains("not have a key a string (\"first\")"),
            "{error}"
        );
        assert!(with_tests(&format!("{{ {case}, {case} }}")).passed());
    }

    #[test]
    fn names_no_backend_could_have_are_refused_not_copied() {
        // A list of 100 000 references to one 10 MB string: copied, 1 TB.
        let huge = "local big = ('x'):rep(10000000)\n\
                    local P = { tests = { { backends = { { name = 'a' } }, expect = 'a' } } }\n\
                    function P.route(req, b) local t = {} for i = 1, 100000 do t[i] = big end return t end\n\
                    return P";
        let report = run(
            &Policy::new("p", huge.to_string(), PathBuf::from("p.lua")),
            &LuaConfig::default(),
            None,
        );
        let failed = format!("{:?}", report.cases);
        assert!(!report.passed(), "{failed}");
        assert!(failed.contains("10000000 bytes"), "{failed:.300}");
        let report = with_tests("{ { backends = { { name = 'a' } }, expect = ('y'):rep(2000) } }");
        let error = format!("{:?} {:?}", report.load_error, report.cases);
        assert!(error.contains("2000 bytes"), "{error}");
    }

    #[test]
    fn tests_are_bounded_in_number_and_in_time_together() {
        let limits = LuaConfig::default();
        let report = run(&policy(MAX_CASES, "return b[1].name"), &limits, None);
        assert!(report.passed(), "{:?}", report.load_error);
        let report = run(&policy(MAX_CASES + 1, "return b[1].name"), &limits, None);
        let error = report.load_error.unwrap();
        assert!(error.contains("at most 1000"), "{error}");

        // Every case spends its whole budget: they stop once the time is up.
        let mut vm = PolicyVm::new(&limits).unwrap();
        let looping = policy(200, "while true do end");
        let error = run_cases(&mut vm, &looping, Duration::from_millis(50), None).unwrap_err();
        assert!(error.contains("took longer than 50 ms"), "{error}");
    }
}
