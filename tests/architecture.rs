//! Tidy check: ARCHITECTURE.md has a section for every workspace member
//! and every top-level directory of the workspace's fixed layout.

#[test]
fn every_workspace_member_is_in_architecture_md() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let arch =
        std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md exists");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members_line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    let members: Vec<&str> = members_line
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|m| *m != ".")
        .collect();
    assert!(members.len() >= 5, "{members:?}");
    let mut missing = Vec::new();
    for m in members
        .iter()
        .copied()
        .chain(["migrations", "scripts", "example-meta", "zw"])
    {
        if !arch.contains(&format!("### `{m}`")) {
            missing.push(m);
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md has no `### `<name>`` section for {missing:?}"
    );
}

/// The modules of a crate's `src/` and, for each, the modules it names
/// (`crate::a::b`, `super::x`, resolved to the deepest module that exists).
/// Inline `#[cfg(test)] mod tests` blocks (at the end of files) are left
/// out, and so are comments: a doc link is not a dependency.
fn module_graph(
    src: &std::path::Path,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut files = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let module_of = |p: &std::path::Path| -> String {
        let rel = p.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        if parts
            .last()
            .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
        {
            parts.pop();
        }
        std::iter::once("crate".to_string())
            .chain(parts)
            .collect::<Vec<_>>()
            .join("::")
    };
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut graph = BTreeMap::new();
    for f in &files {
        let me = module_of(f);
        let text = std::fs::read_to_string(f).unwrap();
        let code: String = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let parent = me.rsplit_once("::").map(|(p, _)| p.to_string());
        let mut deps = BTreeSet::new();
        for (i, _) in code
            .match_indices("crate::")
            .chain(code.match_indices("super::"))
        {
            if i > 0 && code[..i].chars().last().is_some_and(word) {
                continue;
            }
            let rest = &code[i..];
            let path: String = rest.chars().take_while(|c| word(*c) || *c == ':').collect();
            let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let base = match segs.first() {
                Some(&"crate") => "crate".to_string(),
                Some(&"super") => match &parent {
                    Some(p) => p.clone(),
                    None => continue,
                },
                _ => continue,
            };
            segs.remove(0);
            let mut best = base.clone();
            let mut cur = base;
            for s in segs {
                cur = format!("{cur}::{s}");
                if modules.contains(&cur) {
                    best = cur.clone();
                }
            }
            // `use super::{a, b}` and `crate::{x, y}` groups: each name.
            if rest[path.len()..].starts_with('{') {
                let group: String = rest[path.len() + 1..]
                    .chars()
                    .take_while(|c| *c != '}')
                    .collect();
                for name in group.split(',').map(|s| s.trim()) {
                    let head = name.split("::").next().unwrap_or("");
                    let m = format!("{best}::{head}");
                    if modules.contains(&m) && m != me {
                        deps.insert(m);
                    }
                }
            }
            if best != me {
                deps.insert(best);
            }
        }
        graph.insert(me, deps);
    }
    graph
}

/// A cycle of the graph, if there is one (depth-first search).
fn find_cycle(
    graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        state: &mut std::collections::BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for d in graph.get(n).into_iter().flatten() {
            match state.get(d.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = path.iter().position(|p| p == d).unwrap();
                    let mut c = path[at..].to_vec();
                    c.push(d.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(d, graph, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = std::collections::BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0
            && let Some(c) = visit(n, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_captain_has_no_module_cycle() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let graph = module_graph(&root.join("captain/src"));
    assert!(
        graph.contains_key("crate::app::deploy") && graph.contains_key("crate::api"),
        "{:?}",
        graph.keys()
    );
    assert!(
        graph["crate::api::deployments"].contains("crate::app::deploy"),
        "the graph sees dependencies: {:?}",
        graph["crate::api::deployments"]
    );
    if let Some(c) = find_cycle(&graph) {
        panic!(
            "module cycle in captain/src: {}\nlayers: api/webhook/githttp/background -> app -> state/auth/meta/db/nodelink -> pure modules",
            c.join(" -> ")
        );
    }
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(dir.path().join("a.rs"), "use crate::b::B;\npub struct A;\n").unwrap();
    std::fs::create_dir(dir.path().join("b")).unwrap();
    std::fs::write(
        dir.path().join("b/mod.rs"),
        "pub mod c;\n// crate::a in a comment is no dependency\npub struct B;\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("b/c.rs"), "use super::super::a::A;\n").unwrap();
    assert!(find_cycle(&module_graph(dir.path())).is_none());
    std::fs::write(dir.path().join("b/c.rs"), "use crate::{a::A, b};\n").unwrap();
    std::fs::write(
        dir.path().join("b/mod.rs"),
        "pub mod c;\nuse self::c as _;\nfn f() { crate::b::c::g() }\n",
    )
    .unwrap();
    let c = find_cycle(&module_graph(dir.path())).expect("a -> b -> b::c -> a");
    assert!(c.contains(&"crate::a".to_string()), "{c:?}");
}

/// `git` processes are started only by `meta-schema` (the git boundary),
/// and by the captain's smart HTTP server (`git http-backend`).
#[test]
fn only_meta_schema_runs_git() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let allowed = ["meta-schema/src/", "captain/src/githttp.rs"];
    let mut offenders = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                if !matches!(
                    name.as_str(),
                    "target" | ".git" | "tests" | "benches" | "fuzz"
                ) && !name.starts_with('.')
                {
                    stack.push(p);
                }
                continue;
            }
            if !rel.ends_with(".rs") || allowed.iter().any(|a| rel.starts_with(a)) {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            if code.contains("Command::new(\"git\")") {
                offenders.push(rel);
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "these files start git outside meta-schema (go through meta_schema::repo): {offenders:?}"
    );
}

/// The CLI reads the captain's answers as the captain's own wire types
/// (`api-types`), never as copies that could drift from them.
#[test]
fn the_cli_declares_no_wire_types_of_its_own() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut copies = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for (n, line) in text.lines().enumerate() {
                let l = line.trim_start();
                let Some(rest) = l
                    .strip_prefix("pub struct ")
                    .or_else(|| l.strip_prefix("struct "))
                else {
                    continue;
                };
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if name.ends_with("View") {
                    copies.push(format!("{}:{}: {name}", p.display(), n + 1));
                }
            }
        }
    }
    assert!(
        copies.is_empty(),
        "use the api-types crate's types instead of: {copies:?}"
    );
}
