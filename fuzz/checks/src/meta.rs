//! Meta repository files: protobuf decode, `validate_tree`, `desired_state`
//! and the text rendering of `zw meta decode`, over a tree of files the
//! fuzzer writes.

use meta_schema::MetaTree;
use meta_schema::{desired, text, validate};

/// Paths a record can name by one byte (the layout's kinds, and a few
/// that are not meta files).
const PATHS: &[&str] = &[
    "envs/production/env.pb",
    "envs/staging/env.pb",
    "envs/production/apps/web/releases/01KDY021000000000000000002.pb",
    "envs/production/apps/web/releases/01KE34VF000000000000000004.pb",
    "envs/production/apps/web/deployments/01KE34VFZ8000000000000000A.pb",
    "envs/production/apps/web/deployments/01KE34WC9G000000000000000B.pb",
    "envs/production/apps/api/releases/01KDY021000000000000000005.pb",
    "envs/staging/apps/worker/releases/01KE0JER000000000000000009.pb",
    "envs/production/apps/web/secrets.sops.yaml",
    "channels/stable.pb",
    "nodes/node-1.pb",
    "nodes/node-2.pb",
    "README.md",
    "envs/production/apps/web/releases/not-an-id.pb",
    "envs/Bad Env/env.pb",
    "envs/production/apps/web/notes.txt",
];

/// A fixed clock (2026-05-17), so a corpus file replays the same.
const NOW: i64 = 1_779_040_470_000;

/// Decodes the fuzzer's bytes as a tree: records of `selector, length (2
/// bytes, little endian), bytes`; a selector of 0xff is followed by a
/// length-prefixed path of its own, any other picks one of [`PATHS`].
pub fn tree_of(mut data: &[u8]) -> MetaTree {
    let mut tree = MetaTree::new();
    let take = |data: &mut &[u8], n: usize| -> Vec<u8> {
        let n = n.min(data.len());
        let (a, b) = data.split_at(n);
        *data = b;
        a.to_vec()
    };
    while let Some((&sel, rest)) = data.split_first() {
        data = rest;
        let path = if sel == 0xff {
            let n = take(&mut data, 1).first().copied().unwrap_or(0);
            String::from_utf8_lossy(&take(&mut data, usize::from(n))).into_owned()
        } else {
            PATHS[usize::from(sel) % PATHS.len()].to_owned()
        };
        let len = take(&mut data, 2);
        let len = usize::from(len.first().copied().unwrap_or(0))
            | usize::from(len.get(1).copied().unwrap_or(0)) << 8;
        let bytes = take(&mut data, len);
        tree.insert(path, bytes);
    }
    tree
}

/// Encodes files as [`tree_of`] reads them (for seeds).
pub fn encode(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, bytes) in files {
        match PATHS.iter().position(|p| p == path) {
            Some(i) => out.push(i as u8),
            None => {
                out.push(0xff);
                out.push(path.len() as u8);
                out.extend_from_slice(path.as_bytes());
            }
        }
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// Nothing panics; `validate_tree` and `desired_state` agree on which
/// trees are valid (a tree the captain accepts is one every follower can
/// act on); every file renders as text or says why not.
pub fn tree(data: &[u8]) {
    let tree = tree_of(data);
    let valid = validate::validate_tree(&tree);
    let state = desired::desired_state(&tree, NOW);
    match (&valid, &state) {
        (Ok(()), Err(e)) => panic!("validate_tree accepts a tree desired_state refuses: {e}"),
        (Err(e), Ok(_)) => panic!("desired_state accepts a tree validate_tree refuses: {e}"),
        _ => {}
    }
    for (path, bytes) in tree.iter() {
        let _ = text::decode(text::kind_of_path(path), bytes);
        let _ = text::decode(text::sniff(bytes), bytes);
    }
}
