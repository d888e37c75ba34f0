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
