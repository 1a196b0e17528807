//! The crate's top-level modules form no import cycle: each can be read (and changed)
//! knowing only the modules below it. Read from the source: every `crate::name` path
//! (in `use` lines, grouped `use crate::{a, b}` lines and inline paths) outside
//! comments is an edge from the file's top-level module to `name`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/cache/shared/mod.rs` -> `cache`).
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component").as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// Names `text` reaches through `crate::`: `crate::x::...`, `crate::x;` and the
/// members of `crate::{x, y::z}`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    paths_after(text, "crate::")
}

/// Names `text` reaches through `prefix` (`crate::` or `super::`), outside comments.
fn paths_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let after = &rest[at + prefix.len()..];
            if let Some(group) = after.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                names.extend(inner.split(',').map(|m| ident(m.trim())).filter(|m| !m.is_empty()));
            } else {
                let name = ident(after);
                if !name.is_empty() {
                    names.insert(name);
                }
            }
            rest = after;
        }
    }
    names
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| top_module(&src, f)).filter(|m| m != "lib" && m != "main").collect();
    let mut graph = Graph::new();
    for file in &files {
        let from = top_module(&src, file);
        if !modules.contains(&from) {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read file");
        let edges = graph.entry(from.clone()).or_default();
        edges.extend(crate_paths(&text).into_iter().filter(|to| *to != from && modules.contains(to)));
    }
    graph
}

/// A cycle through `start`, if there is one, as the list of modules on it.
fn cycle_through(graph: &Graph, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.get(&node).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start.to_owned());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn top_level_modules_form_no_import_cycle() {
    let graph = graph();
    assert!(graph.len() >= 10, "the source was read: {graph:?}");
    let cycles: Vec<String> = graph.keys().filter_map(|m| cycle_through(&graph, m)).map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "import cycles between top-level modules:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_finder_finds_a_cycle_and_reads_grouped_imports() {
    let paths = crate_paths("use crate::{cache::Pool, metrics};\nlet x = crate::origin::Origin::new(); // crate::ignored\n");
    assert_eq!(paths, ["cache", "metrics", "origin"].map(String::from).into_iter().collect());
    let mut graph = Graph::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(cycle_through(&graph, "a").map(|c| c.join(" -> ")), Some("a -> b -> c -> a".into()));
    graph.get_mut("c").expect("c").clear();
    assert_eq!(cycle_through(&graph, "a"), None);
}

#[test]
fn the_leaf_modules_stay_leaves() {
    let graph = graph();
    // What the cache, metrics and config speak must not reach back into the request path.
    for leaf in ["outcome", "encodings", "clock"] {
        assert!(graph.get(leaf).is_none_or(BTreeSet::is_empty), "{leaf} imports {:?}", graph.get(leaf));
    }
    for lower in ["cache", "config", "metrics", "origin", "error", "body", "outcome"] {
        let reaches: Vec<&String> = graph.get(lower).into_iter().flatten().filter(|m| ["proxy", "runtime", "server", "admin"].contains(&m.as_str())).collect();
        assert!(reaches.is_empty(), "{lower} imports {reaches:?}");
    }
}

/// The phases of the request path (`src/proxy/*.rs`) call down, never back: no
/// submodule reaches into `proxy/mod.rs` for a helper, and no two submodules import
/// each other, directly or through others. A GET reads top to bottom.
#[test]
fn the_request_path_phases_call_down_never_back() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/proxy");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let stem = |f: &PathBuf| f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let phases: BTreeSet<String> = files.iter().map(stem).filter(|s| s != "mod").collect();
    assert!(phases.len() >= 8, "the phases were read: {phases:?}");
    let mut graph = Graph::new();
    let mut back = Vec::new();
    for file in files.iter().filter(|f| stem(f) != "mod") {
        let text = std::fs::read_to_string(file).expect("read file");
        let edges = graph.entry(stem(file)).or_default();
        for name in paths_after(&text, "super::") {
            if phases.contains(&name) {
                edges.insert(name);
            } else {
                back.push(format!("{} -> proxy::{name}", stem(file)));
            }
        }
    }
    assert!(back.is_empty(), "phases reaching back into proxy/mod.rs:\n{}", back.join("\n"));
    let cycles: Vec<String> = graph.keys().filter_map(|m| cycle_through(&graph, m)).map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "import cycles between the phases:\n{}", cycles.join("\n"));
}
