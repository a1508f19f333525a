//! The OpenAPI documents in `api/` and the routers they describe must not drift apart: every
//! `(path, method)` a router serves is in its spec and every spec operation is routed, each
//! operation documents a success and at least one 4xx answer, and its `security` names the
//! scope the router's auth layer actually requires (or `security: []` for a public route).
//!
//! Both sides are read as text: the routers by scanning for `.route("PATH", get(..).post(..))`
//! and the `Scope::…` of the `route_layer` that guards them, the YAML by its indentation (paths
//! at two spaces under `paths:`, methods at four). No YAML or Rust parser is needed, and the
//! scanners fail loudly on a construct they do not understand rather than skip it.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::collections::BTreeMap;
use std::path::Path;

use edgeroute_test_util::source::{rust_files, workspace};

const METHODS: [&str; 8] = ["get", "post", "put", "delete", "patch", "head", "options", "trace"];

/// Who may call a route, as the router's auth layer decides it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Access {
    Public,
    /// A bearer token with this scope (`inference`, `admin`).
    Scope(String),
}

/// `(path, method)` → access, for every route a router file declares.
type Routes = BTreeMap<(String, String), Access>;

/// One operation as the spec states it.
#[derive(Debug, Default)]
struct Operation {
    /// `None` when the operation has no `security` key at all.
    security: Option<Access>,
    responses: Vec<String>,
}

type Spec = BTreeMap<(String, String), Operation>;

/// The source before its `#[cfg(test)]` module: routers built by unit tests are not the server's.
fn production_source(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// What the router scanner meets, in source order.
#[derive(Debug)]
enum Token {
    Route {
        path: String,
        methods: Vec<String>,
        /// A `.route_service(...)` authenticates itself: the `Scope::` its arguments name
        /// (public when none), whatever layers follow.
        own_access: Option<Access>,
    },
    /// A `.route_layer(...)`, with the scope it names if any.
    RouteLayer(Option<String>),
    /// `Router::new()`: the start of another chain, which earlier route layers do not cover.
    NewChain,
}

/// The index just past the parenthesis that closes the one at `open` (which must be `(`),
/// skipping string literals.
fn close_paren(s: &str, open: usize) -> usize {
    let b = s.as_bytes();
    assert_eq!(b[open], b'(');
    let (mut depth, mut i, mut in_str) = (0usize, open, false);
    while i < b.len() {
        match (in_str, b[i]) {
            (true, b'\\') => i += 1,
            (true, b'"') => in_str = false,
            (false, b'"') => in_str = true,
            (false, b'(') => depth += 1,
            (false, b')') => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    panic!("unbalanced parentheses after byte {open}");
}

/// Parses `get(h).post(h2)...` at the start of `s`: the methods, in order.
fn method_chain(s: &str, file: &Path, path: &str) -> Vec<String> {
    let mut methods = Vec::new();
    let mut rest = s.trim_start();
    loop {
        let name_len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(0);
        let name = &rest[..name_len];
        assert!(
            METHODS.contains(&name) && rest[name_len..].starts_with('('),
            "{}: route `{path}`: cannot read the method router at `{}`",
            file.display(),
            &rest[..rest.len().min(40)]
        );
        methods.push(name.to_uppercase());
        rest = rest[close_paren(rest, name_len)..].trim_start();
        match rest.strip_prefix('.') {
            Some(more) => rest = more.trim_start(),
            None => break,
        }
    }
    assert!(
        rest.starts_with(')'),
        "{}: route `{path}`: unexpected text after the method router",
        file.display()
    );
    methods
}

fn tokens(file: &Path) -> Vec<Token> {
    let src = production_source(file);
    for unsupported in [".nest(", ".nest_service("] {
        assert!(
            !src.contains(unsupported),
            "{}: `{unsupported}` is not understood by this scanner: teach it before using it",
            file.display()
        );
    }
    let mut marks: Vec<(usize, &str)> = Vec::new();
    for pat in [".route(", ".route_service(", ".route_layer(", "Router::new()"] {
        marks.extend(src.match_indices(pat));
    }
    marks.sort();
    let mut out = Vec::new();
    for (at, pat) in marks {
        match pat {
            ".route(" => {
                let args = src[at + pat.len()..].trim_start();
                let lit = args.strip_prefix('"').unwrap_or_else(|| {
                    panic!("{}: a `.route(` whose path is not a literal", file.display())
                });
                let end = lit.find('"').unwrap();
                let path = lit[..end].to_owned();
                let after = lit[end + 1..].trim_start();
                let after = after.strip_prefix(',').unwrap_or_else(|| {
                    panic!("{}: route `{path}`: expected `,` after the path", file.display())
                });
                let methods = method_chain(after, file, &path);
                out.push(Token::Route { path, methods, own_access: None });
            }
            ".route_service(" => {
                // `.route_service("/p", post_service(Svc::new(.., Scope::X)))`: one method
                // router of `*_service` calls, and the scope the service checks itself.
                let open = at + pat.len() - 1;
                let inner = &src[open + 1..close_paren(&src, open) - 1];
                let lit = inner.trim_start().strip_prefix('"').unwrap_or_else(|| {
                    panic!("{}: a `.route_service(` whose path is not a literal", file.display())
                });
                let end = lit.find('"').unwrap();
                let path = lit[..end].to_owned();
                let after = lit[end + 1..].trim_start().strip_prefix(',').unwrap_or_else(|| {
                    panic!("{}: route `{path}`: expected `,` after the path", file.display())
                });
                let call = after.trim_start();
                let name_len = call.find('(').unwrap_or(0);
                let method = call[..name_len].strip_suffix("_service").unwrap_or("");
                assert!(
                    METHODS.contains(&method),
                    "{}: route `{path}`: expected `<method>_service(` in `.route_service(`",
                    file.display()
                );
                let own_access = Some(match call.find("Scope::") {
                    Some(i) => {
                        let rest = &call[i + "Scope::".len()..];
                        let n =
                            rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len());
                        Access::Scope(rest[..n].to_lowercase())
                    }
                    None => Access::Public,
                });
                out.push(Token::Route { path, methods: vec![method.to_uppercase()], own_access });
            }
            ".route_layer(" => {
                let open = at + pat.len() - 1;
                let inner = &src[open..close_paren(&src, open)];
                let scope = inner.find("Scope::").map(|i| {
                    let rest = &inner[i + "Scope::".len()..];
                    let n = rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len());
                    rest[..n].to_lowercase()
                });
                out.push(Token::RouteLayer(scope));
            }
            _ => out.push(Token::NewChain),
        }
    }
    out
}

/// Every route a crate's production source declares, with who may call it: the scope its own
/// service checks (`.route_service`), else the scope of the first scoped `route_layer` after
/// it in the same `Router::new()` chain, or public.
fn routes(src_dir: &Path) -> Routes {
    let mut files = Vec::new();
    rust_files(src_dir, &mut files);
    files.sort();
    let mut out = Routes::new();
    for file in &files {
        let toks = tokens(file);
        for (i, tok) in toks.iter().enumerate() {
            let Token::Route { path, methods, own_access } = tok else { continue };
            let access = own_access.clone().unwrap_or_else(|| {
                toks[i + 1..]
                    .iter()
                    .take_while(|t| !matches!(t, Token::NewChain))
                    .find_map(|t| match t {
                        Token::RouteLayer(Some(scope)) => Some(Access::Scope(scope.clone())),
                        _ => None,
                    })
                    .unwrap_or(Access::Public)
            });
            for m in methods {
                let prev = out.insert((path.clone(), m.clone()), access.clone());
                assert!(prev.is_none(), "{m} {path} is routed twice");
            }
        }
    }
    out
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn unquote(s: &str) -> &str {
    s.trim().trim_matches('"').trim_matches('\'')
}

/// The operations under `paths:`, read by indentation.
fn spec(file: &Path) -> Spec {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Spec::new();
    let mut in_paths = false;
    let mut path: Option<String> = None;
    let mut op: Option<(String, String)> = None;
    // The indentation-6 key of the operation being read (`security`, `responses`...).
    let mut section = String::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        assert!(!line.contains('\t'), "{}:{}: tab in YAML", file.display(), n + 1);
        let ind = indent(line);
        let body = line.trim_start();
        if ind == 0 {
            in_paths = body == "paths:";
            path = None;
            op = None;
            continue;
        }
        if !in_paths {
            continue;
        }
        let key = body.split_once(':').map(|(k, _)| unquote(k));
        let value = body.split_once(':').map(|(_, v)| v.trim()).unwrap_or("");
        match ind {
            2 => {
                let k = key.unwrap_or_else(|| panic!("{}:{}: not a path", file.display(), n + 1));
                assert!(k.starts_with('/'), "{}:{}: `{k}` is not a path", file.display(), n + 1);
                path = Some(k.to_owned());
                op = None;
            }
            4 => {
                let k = key.unwrap_or_default();
                op = METHODS.contains(&k).then(|| {
                    let p = path.clone().unwrap();
                    let id = (p, k.to_uppercase());
                    assert!(!out.contains_key(&id), "{}:{}: {id:?} twice", file.display(), n + 1);
                    out.insert(id.clone(), Operation::default());
                    id
                });
                section.clear();
            }
            _ => {
                let Some(id) = &op else { continue };
                let o = out.get_mut(id).unwrap();
                if ind == 6 {
                    section = key.unwrap_or_default().to_owned();
                    if section == "security" {
                        o.security = (value == "[]").then_some(Access::Public);
                        assert!(
                            value.is_empty() || value == "[]",
                            "{}:{}: write `security` as `[]` or as a list",
                            file.display(),
                            n + 1
                        );
                    }
                } else if ind == 8 && section == "responses" {
                    o.responses.push(key.unwrap_or_default().to_owned());
                } else if ind == 8 && section == "security" {
                    // `- bearer: [scope]`: one requirement, one scope.
                    let req = body.strip_prefix("- ").unwrap_or_else(|| {
                        panic!(
                            "{}:{}: a security requirement is a list item",
                            file.display(),
                            n + 1
                        )
                    });
                    let (_, scopes) = req.split_once(':').unwrap();
                    let scopes: Vec<&str> = scopes
                        .trim()
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .split(',')
                        .map(unquote)
                        .filter(|s| !s.is_empty())
                        .collect();
                    assert_eq!(
                        scopes.len(),
                        1,
                        "{}:{}: name exactly one scope per operation",
                        file.display(),
                        n + 1
                    );
                    assert!(o.security.is_none(), "{}:{}: one requirement", file.display(), n + 1);
                    o.security = Some(Access::Scope(scopes[0].to_owned()));
                }
            }
        }
    }
    out
}

/// Everything wrong between a router and its spec, as readable lines.
fn drift(routes: &Routes, spec: &Spec) -> Vec<String> {
    let mut problems = Vec::new();
    for ((path, method), access) in routes {
        match spec.get(&(path.clone(), method.clone())) {
            None => problems.push(format!("{method} {path} is routed but not in the spec")),
            Some(op) => {
                if let Some(s) = &op.security
                    && s != access
                {
                    problems.push(format!(
                        "{method} {path}: the spec says {s:?}, the router requires {access:?}"
                    ));
                }
            }
        }
    }
    for ((path, method), op) in spec {
        if !routes.contains_key(&(path.clone(), method.clone())) {
            problems.push(format!("{method} {path} is in the spec but not routed"));
        }
        if op.security.is_none() {
            problems.push(format!(
                "{method} {path} has no `security` (write `security: []` if it is public)"
            ));
        }
        if !op.responses.iter().any(|r| r.starts_with('4')) {
            problems.push(format!("{method} {path} documents no 4xx answer"));
        }
        // A WebSocket's success is its 101.
        if !op.responses.iter().any(|r| r.starts_with('2') || r == "101") {
            problems.push(format!("{method} {path} documents no 2xx answer"));
        }
    }
    problems
}

fn check(router_src: &str, spec_file: &str, at_least: usize) {
    let root = workspace();
    let routes = routes(&root.join(router_src));
    let spec = spec(&root.join(spec_file));
    assert!(
        routes.len() >= at_least,
        "found only {} routes in {router_src}: {routes:?}",
        routes.len()
    );
    assert!(spec.len() >= at_least, "found only {} operations in {spec_file}", spec.len());
    let problems = drift(&routes, &spec);
    assert!(
        problems.is_empty(),
        "{spec_file} and {router_src} drifted:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_node_spec_matches_the_gateway_router() {
    check("crates/edgeroute-node/src", "api/node.openapi.yaml", 11);
}

#[test]
fn the_discovery_spec_matches_its_router() {
    check("crates/edgeroute-discovery/src", "api/discovery.openapi.yaml", 5);
}

#[test]
fn the_router_scanner_reads_scopes_chains_and_method_chains() {
    let dir = std::env::temp_dir().join(format!("edgeroute-openapi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("r.rs"),
        r#"//! x
fn router() {
    let a = Router::new()
        .route("/a/{id}", get(h::a).delete(h::b))
        .route_layer(middleware::from_fn(limit))
        .route_layer(middleware::from_fn_with_state((s.clone(), Scope::Admin), require));
    Router::new().merge(a).route("/open", post(h::c)).with_state(s)
}
fn own() {
    Router::new()
        .route_service("/svc", post_service(chat::Svc::new(s.clone(), Scope::Inference)))
        .route_service("/svc-open", get_service(Open))
        .route_layer(middleware::from_fn_with_state((s.clone(), Scope::Admin), require));
}
#[cfg(test)]
mod tests { fn t() { Router::new().route("/test-only", get(x)); } }
"#,
    )
    .unwrap();
    let r = routes(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let admin = Access::Scope("admin".into());
    let want: Routes = [
        (("/a/{id}".to_owned(), "GET".to_owned()), admin.clone()),
        (("/a/{id}".to_owned(), "DELETE".to_owned()), admin),
        (("/open".to_owned(), "POST".to_owned()), Access::Public),
        (("/svc".to_owned(), "POST".to_owned()), Access::Scope("inference".into())),
        (("/svc-open".to_owned(), "GET".to_owned()), Access::Public),
    ]
    .into_iter()
    .collect();
    assert_eq!(r, want);
}

#[test]
fn the_spec_reader_finds_drift() {
    let dir = std::env::temp_dir().join(format!("edgeroute-openapi-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("s.yaml");
    std::fs::write(
        &file,
        "openapi: 3.1.0\npaths:\n  /a:\n    parameters: []\n    get:\n      security:\n        - bearer: [inference]\n      responses:\n        \"200\":\n          description: ok\n        \"401\":\n          description: no\n  /b:\n    post:\n      responses:\n        \"200\":\n          description: ok\ncomponents:\n  schemas: {}\n",
    )
    .unwrap();
    let s = spec(&file);
    std::fs::remove_dir_all(&dir).unwrap();
    let routes: Routes = [
        (("/a".to_owned(), "GET".to_owned()), Access::Scope("admin".into())),
        (("/c".to_owned(), "GET".to_owned()), Access::Public),
    ]
    .into_iter()
    .collect();
    let problems = drift(&routes, &s);
    let has = |needle: &str| problems.iter().any(|p| p.contains(needle));
    assert!(has("GET /a: the spec says"), "{problems:?}");
    assert!(has("GET /c is routed but not in the spec"), "{problems:?}");
    assert!(has("POST /b is in the spec but not routed"), "{problems:?}");
    assert!(has("POST /b documents no 4xx"), "{problems:?}");
    assert!(has("POST /b has no `security`"), "{problems:?}");
    assert_eq!(problems.len(), 5, "{problems:?}");
}
