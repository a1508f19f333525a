//! Rules of the house that check themselves (rust-analyzer's tidy tests): every module says
//! what it is, and the dependency direction ARCHITECTURE.md states holds.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use edgeroute_test_util::source::{rust_files, workspace};

fn crates() -> Vec<(String, toml::Table)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(workspace().join("crates")).unwrap() {
        let dir = entry.unwrap().path();
        let manifest = dir.join("Cargo.toml");
        if !manifest.exists() {
            continue;
        }
        let table: toml::Table = std::fs::read_to_string(&manifest).unwrap().parse().unwrap();
        let name = table["package"]["name"].as_str().unwrap().to_owned();
        out.push((name, table));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The edgeroute crates a manifest's normal (not dev) dependencies name.
fn deps(manifest: &toml::Table) -> Vec<String> {
    manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|d| d.keys().filter(|k| k.starts_with("edgeroute")).cloned().collect())
        .unwrap_or_default()
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(workspace().join("crates")).unwrap() {
        let src = entry.unwrap().path().join("src");
        if src.is_dir() {
            rust_files(&src, &mut files);
        }
    }
    // The fuzz targets live outside the workspace and follow the same rule.
    let fuzz = workspace().join("fuzz/fuzz_targets");
    if fuzz.is_dir() {
        rust_files(&fuzz, &mut files);
    }
    assert!(files.len() > 50, "found only {} files", files.len());
    let undocumented: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or_default();
            !first.starts_with("//!")
        })
        .map(|f| f.strip_prefix(workspace()).unwrap_or(f).display().to_string())
        .collect();
    assert!(undocumented.is_empty(), "no `//!` module doc at the top of: {undocumented:?}");
}

#[test]
fn the_dependency_direction_holds() {
    let all = crates();
    assert!(all.len() >= 10, "{} crates", all.len());
    let leaves = ["edgeroute-lab", "edgeroute-test-util"];
    for (name, manifest) in &all {
        let d = deps(manifest);
        if !leaves.contains(&name.as_str()) {
            for leaf in leaves {
                assert!(!d.iter().any(|x| x == leaf), "{name} (production) depends on {leaf}");
            }
        }
        match name.as_str() {
            "edgeroute-core" => {
                let any = manifest.get("dependencies").and_then(|d| d.as_table());
                assert!(any.is_none_or(|t| t.is_empty()), "core depends on nothing: {any:?}");
            }
            "edgeroute-proto" => {
                assert!(d.is_empty(), "proto depends on no edgeroute crate: {d:?}")
            }
            // The SDK is a library others embed: the wire types, the decisions, the outbound
            // client builder, nothing of the servers.
            "edgeroute-client" => {
                for x in &d {
                    assert!(
                        ["edgeroute-proto", "edgeroute-core", "edgeroute-http"]
                            .contains(&x.as_str()),
                        "the client SDK depends on {x}"
                    );
                }
            }
            "edgeroute-discovery" => {
                assert!(!d.iter().any(|x| x == "edgeroute-client"), "discovery depends on the SDK")
            }
            _ => {}
        }
    }
}
