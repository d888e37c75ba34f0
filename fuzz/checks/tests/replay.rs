//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/`)
//! through the same check as its fuzz target, without the fuzzer: what a
//! fuzzer once found (and the inputs that reach deep) stays checked by the
//! ordinary test suite.

use std::path::PathBuf;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../corpus")
}

#[test]
fn every_corpus_file_passes_its_check() {
    let mut failures = Vec::new();
    let mut total = 0;
    for (target, check) in fuzz_checks::TARGETS {
        let dir = corpus_dir().join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus of {target} ({}): {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "the corpus of {target} is empty");
        for file in &files {
            let data = std::fs::read(file).expect("corpus file");
            total += 1;
            if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                failures.push(format!("{target}: {}: {msg}", file.display()));
            }
        }
    }
    println!("replayed {total} corpus files");
    assert!(failures.is_empty(), "findings:\n{}", failures.join("\n"));
}

/// The fuzz targets and this replay cover the same list.
#[test]
fn every_fuzz_target_has_a_check() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz_targets");
    let mut targets: Vec<String> = std::fs::read_dir(&dir)
        .expect("fuzz_targets")
        .map(|e| {
            let name = e.expect("entry").file_name().to_string_lossy().into_owned();
            name.trim_end_matches(".rs").to_owned()
        })
        .collect();
    targets.sort();
    let mut checks: Vec<String> = fuzz_checks::TARGETS
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .collect();
    checks.sort();
    assert_eq!(targets, checks);
}
