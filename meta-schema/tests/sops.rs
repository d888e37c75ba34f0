//! sops compatibility: files written by the real `sops` (fixtures, see
//! `fixtures/sops/README.md`) decrypt to their plaintext twins, files we
//! write have sops' layout and round-trip, tampering is detected, and the
//! `age` CLI reads the data key we wrap.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;

use meta_schema::sops::{self, Secrets, SopsError, SopsFile};
use serde_yaml::Value;

const NOW: i64 = 1_779_040_470_000; // 2026-05-17T17:54:30Z
const FIXTURE_RECIPIENT: &str = "age1se5ghfycr4n8kcwc3qwf234ymvmr2lex2a99wh8gpfx97glwt9hqch4569";
const FIXTURES: &[&str] = &[
    "age_example",
    "age_empty_value",
    "age_encrypted_regex",
    "age_encrypted_suffix",
    "age_unencrypted_regex",
    "age_unencrypted_suffix",
    "age_mac_only_encrypted",
];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sops")
}

fn fixture(name: &str) -> String {
    let path = fixture_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn test_identity() -> age::x25519::Identity {
    age::x25519::Identity::from_str(fixture("age-test-identity.txt").trim()).unwrap()
}

fn recipient(r: &str) -> age::x25519::Recipient {
    age::x25519::Recipient::from_str(r).unwrap()
}

fn sample_secrets() -> Secrets {
    [
        ("DATABASE_URL", "postgres://app:hunter2@db/app"),
        ("EMPTY", ""),
        ("MULTILINE", "line one\nline two: with colon\n"),
        ("PORT", "8080"),
        ("UNICODE", "grüße ✓"),
    ]
    .into_iter()
    .collect()
}

fn assert_same_secrets(a: &Secrets, b: &Secrets) {
    let names = |s: &Secrets| s.names().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(names(a), names(b));
    for (name, value) in a.iter() {
        assert_eq!(
            value.expose(),
            b.get(name).unwrap().expose(),
            "value of {name}"
        );
    }
}

fn sops_keys(yaml: &str) -> BTreeSet<String> {
    let doc: Value = serde_yaml::from_str(yaml).unwrap();
    doc["sops"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect()
}

/// Replaces one base64 character inside the `data:` (or `iv:`...) field of
/// the first line starting with `line_prefix`.
fn flip_in_field(yaml: &str, line_prefix: &str, field: &str) -> String {
    let mut out = Vec::new();
    let mut done = false;
    for line in yaml.lines() {
        if !done && line.trim_start().starts_with(line_prefix) {
            let at = line.find(field).expect("field present") + field.len() + 2;
            let mut bytes = line.as_bytes().to_vec();
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            out.push(String::from_utf8(bytes).unwrap());
            done = true;
        } else {
            out.push(line.to_owned());
        }
    }
    assert!(done, "no line starting with {line_prefix}");
    out.join("\n") + "\n"
}

#[test]
fn every_fixture_decrypts_to_its_plaintext_twin() {
    let identity = test_identity();
    for name in FIXTURES {
        let file = SopsFile::parse(&fixture(&format!("{name}.yaml")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(file.recipients(), vec![FIXTURE_RECIPIENT], "{name}");
        assert_eq!(file.version(), None, "{name}: fixtures carry no version");
        let doc = file
            .decrypt_document(std::slice::from_ref(&identity))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected: Value =
            serde_yaml::from_str(&fixture(&format!("{name}_plaintext.yaml"))).unwrap();
        assert_eq!(doc.expose(), &expected, "{name}");
    }
}

#[test]
fn names_are_read_without_any_identity() {
    let file = SopsFile::parse(&fixture("age_example.yaml")).unwrap();
    assert_eq!(
        file.names(),
        vec![
            "hello",
            "example_key",
            "example_array",
            "example_number",
            "example_booleans"
        ]
    );
    assert_eq!(file.last_modified(), "2023-12-25T10:31:01Z");
}

#[test]
fn a_written_file_has_the_layout_of_the_fixtures_and_round_trips() {
    let identity = test_identity();
    let secrets = sample_secrets();
    let yaml = sops::encrypt(&secrets, &[recipient(FIXTURE_RECIPIENT)], NOW).unwrap();

    // The metadata sops writes: what every fixture has, plus the default
    // rule and the version.
    let ours = sops_keys(&yaml);
    let expected: BTreeSet<String> = [
        "age",
        "lastmodified",
        "mac",
        "unencrypted_suffix",
        "version",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(ours, expected);
    for name in FIXTURES {
        let theirs = sops_keys(&fixture(&format!("{name}.yaml")));
        for key in ["age", "lastmodified", "mac"] {
            assert!(theirs.contains(key), "{name} has {key}");
        }
    }

    let doc: Value = serde_yaml::from_str(&yaml).unwrap();
    let meta = &doc["sops"];
    assert_eq!(meta["lastmodified"].as_str(), Some("2026-05-17T17:54:30Z"));
    assert_eq!(meta["unencrypted_suffix"].as_str(), Some("_unencrypted"));
    assert_eq!(meta["version"].as_str(), Some(sops::SOPS_VERSION));
    let age = meta["age"].as_sequence().unwrap();
    assert_eq!(age.len(), 1);
    let entry_keys: BTreeSet<&str> = age[0]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(entry_keys, BTreeSet::from(["recipient", "enc"]));
    let enc = age[0]["enc"].as_str().unwrap();
    assert!(
        enc.starts_with("-----BEGIN AGE ENCRYPTED FILE-----\n"),
        "{enc}"
    );
    assert!(enc.ends_with("-----END AGE ENCRYPTED FILE-----\n"), "{enc}");

    // Every non-empty value is an ENC[...] string with a 32-byte iv and a
    // 16-byte tag; the empty one stays empty, as sops writes it.
    let value_re = regex::Regex::new(
        r"^ENC\[AES256_GCM,data:([A-Za-z0-9+/=]+),iv:([A-Za-z0-9+/=]+),tag:([A-Za-z0-9+/=]+),type:str\]$",
    )
    .unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    for (name, value) in secrets.iter() {
        let stored = doc[name].as_str().unwrap();
        assert!(!stored.contains(value.expose()) || value.expose().is_empty());
        if value.expose().is_empty() {
            assert_eq!(stored, "");
            continue;
        }
        let caps = value_re
            .captures(stored)
            .unwrap_or_else(|| panic!("{name}: {stored}"));
        assert_eq!(b64.decode(&caps[1]).unwrap().len(), value.expose().len());
        assert_eq!(b64.decode(&caps[2]).unwrap().len(), 32);
        assert_eq!(b64.decode(&caps[3]).unwrap().len(), 16);
    }
    let mac_re = regex::Regex::new(
        r"^ENC\[AES256_GCM,data:[A-Za-z0-9+/=]+,iv:[A-Za-z0-9+/=]+,tag:[A-Za-z0-9+/=]+,type:str\]$",
    )
    .unwrap();
    assert!(mac_re.is_match(meta["mac"].as_str().unwrap()));

    let file = SopsFile::parse(&yaml).unwrap();
    assert_eq!(
        file.names(),
        vec!["DATABASE_URL", "EMPTY", "MULTILINE", "PORT", "UNICODE"]
    );
    let back = file.decrypt(&[identity]).unwrap();
    assert_same_secrets(&secrets, &back);
    assert!(!yaml.contains("hunter2"));
}

#[test]
fn a_written_file_decrypts_like_a_fixture_through_the_generic_path() {
    // The flat decrypt and the document decrypt agree, and the document
    // of a written file has sops' plaintext shape (strings, file order).
    let identity = test_identity();
    let secrets = sample_secrets();
    let yaml = sops::encrypt(&secrets, &[recipient(FIXTURE_RECIPIENT)], NOW).unwrap();
    let doc = SopsFile::parse(&yaml)
        .unwrap()
        .decrypt_document(&[identity])
        .unwrap();
    let map = doc.expose().as_mapping().unwrap();
    assert_eq!(map.len(), secrets.len());
    for (name, value) in secrets.iter() {
        assert_eq!(map[name].as_str(), Some(value.expose()));
    }
}

#[test]
fn several_recipients_each_decrypt() {
    let a = age::x25519::Identity::generate();
    let b = age::x25519::Identity::generate();
    let secrets = sample_secrets();
    // A duplicate recipient is written once.
    let yaml = sops::encrypt(
        &secrets,
        &[a.to_public(), b.to_public(), a.to_public()],
        NOW,
    )
    .unwrap();
    let file = SopsFile::parse(&yaml).unwrap();
    assert_eq!(
        file.recipients(),
        vec![a.to_public().to_string(), b.to_public().to_string()]
    );
    assert_same_secrets(&secrets, &file.decrypt(&[a]).unwrap());
    assert_same_secrets(&secrets, &file.decrypt(&[b]).unwrap());
}

fn assert_no_plaintext(err: &SopsError, plaintexts: &[&str]) {
    let shown = format!("{err} / {err:?}");
    for p in plaintexts {
        assert!(!shown.contains(p), "error text leaks a value: {shown}");
    }
}

#[test]
fn a_flipped_byte_in_a_value_fails_authentication_without_leaking() {
    let identity = test_identity();
    // A fixture written by sops.
    let tampered = flip_in_field(&fixture("age_example.yaml"), "example_key:", "data");
    let err = SopsFile::parse(&tampered)
        .unwrap()
        .decrypt_document(std::slice::from_ref(&identity))
        .unwrap_err();
    assert!(
        matches!(&err, SopsError::ValueAuthentication { path } if path == "example_key:"),
        "{err:?}"
    );
    assert_no_plaintext(&err, &["example_value", "Welcome to SOPS"]);

    // A file we wrote.
    let yaml = sops::encrypt(&sample_secrets(), &[identity.to_public()], NOW).unwrap();
    let tampered = flip_in_field(&yaml, "DATABASE_URL:", "data");
    let err = SopsFile::parse(&tampered)
        .unwrap()
        .decrypt(std::slice::from_ref(&identity))
        .unwrap_err();
    assert!(
        matches!(err, SopsError::ValueAuthentication { .. }),
        "{err:?}"
    );
    assert_no_plaintext(&err, &["hunter2", "postgres://"]);
    let tampered_iv = flip_in_field(&yaml, "PORT:", "iv");
    let err = SopsFile::parse(&tampered_iv)
        .unwrap()
        .decrypt(&[identity])
        .unwrap_err();
    assert!(
        matches!(err, SopsError::ValueAuthentication { .. }),
        "{err:?}"
    );
}

#[test]
fn a_flipped_byte_in_the_mac_is_a_mac_mismatch() {
    let identity = test_identity();
    for yaml in [
        fixture("age_example.yaml"),
        sops::encrypt(&sample_secrets(), &[identity.to_public()], NOW).unwrap(),
    ] {
        let tampered = flip_in_field(&yaml, "mac:", "data");
        let err = SopsFile::parse(&tampered)
            .unwrap()
            .decrypt_document(std::slice::from_ref(&identity))
            .unwrap_err();
        assert!(matches!(err, SopsError::MacMismatch), "{err:?}");
        assert_no_plaintext(&err, &["hunter2", "example_value"]);
    }
}

#[test]
fn values_are_bound_to_their_key_path_and_the_mac_to_the_timestamp() {
    let identity = test_identity();
    let yaml = sops::encrypt(&sample_secrets(), &[identity.to_public()], NOW).unwrap();
    let doc: Value = serde_yaml::from_str(&yaml).unwrap();
    // Moving a ciphertext to another name breaks its associated data.
    let port = doc["PORT"].as_str().unwrap();
    let url = doc["DATABASE_URL"].as_str().unwrap();
    let swapped = yaml
        .replace(port, "SWAP")
        .replace(url, port)
        .replace("SWAP", url);
    let err = SopsFile::parse(&swapped)
        .unwrap()
        .decrypt(std::slice::from_ref(&identity))
        .unwrap_err();
    assert!(
        matches!(err, SopsError::ValueAuthentication { .. }),
        "{err:?}"
    );
    // Changing lastmodified invalidates the MAC entry.
    let redated = yaml.replace("2026-05-17T17:54:30Z", "2026-05-17T17:54:31Z");
    let err = SopsFile::parse(&redated)
        .unwrap()
        .decrypt(&[identity])
        .unwrap_err();
    assert!(matches!(err, SopsError::MacMismatch), "{err:?}");
}

#[test]
fn the_mac_covers_unencrypted_values_unless_mac_only_encrypted() {
    let identity = test_identity();
    // unencrypted_suffix: the cleartext values are in the MAC.
    let yaml = fixture("age_unencrypted_suffix.yaml").replacen("b: aaa", "b: aab", 1);
    let err = SopsFile::parse(&yaml)
        .unwrap()
        .decrypt_document(std::slice::from_ref(&identity))
        .unwrap_err();
    assert!(matches!(err, SopsError::MacMismatch), "{err:?}");
    // Also when dropping a list element.
    let yaml = fixture("age_unencrypted_suffix.yaml").replacen("    - 456\n", "", 1);
    let err = SopsFile::parse(&yaml)
        .unwrap()
        .decrypt_document(std::slice::from_ref(&identity))
        .unwrap_err();
    assert!(matches!(err, SopsError::MacMismatch), "{err:?}");
    // mac_only_encrypted: sops deliberately leaves cleartext values out.
    let yaml = fixture("age_mac_only_encrypted.yaml")
        .replace("d_unencrypted: aaa", "d_unencrypted: changed");
    let doc = SopsFile::parse(&yaml)
        .unwrap()
        .decrypt_document(&[identity])
        .unwrap();
    assert_eq!(doc.expose()["d_unencrypted"].as_str(), Some("changed"));
}

#[test]
fn a_file_not_encrypted_to_us_is_no_matching_recipient() {
    let other = age::x25519::Identity::generate();
    for yaml in [
        fixture("age_example.yaml"),
        sops::encrypt(
            &sample_secrets(),
            &[age::x25519::Identity::generate().to_public()],
            NOW,
        )
        .unwrap(),
    ] {
        let file = SopsFile::parse(&yaml).unwrap();
        let err = file.decrypt(std::slice::from_ref(&other)).unwrap_err();
        match &err {
            SopsError::NoMatchingRecipient { recipients } => {
                assert_eq!(recipients, &file.recipients());
            }
            other => panic!("expected NoMatchingRecipient, got {other:?}"),
        }
        assert!(matches!(
            file.decrypt(&[]),
            Err(SopsError::NoMatchingRecipient { .. })
        ));
    }
}

#[test]
fn rewrap_gives_a_new_recipient_the_same_data_key() {
    let old = age::x25519::Identity::generate();
    let new = age::x25519::Identity::generate();
    let secrets = sample_secrets();
    let yaml = sops::encrypt(&secrets, &[old.to_public()], NOW).unwrap();
    let file = SopsFile::parse(&yaml).unwrap();
    assert!(matches!(
        file.decrypt(std::slice::from_ref(&new)),
        Err(SopsError::NoMatchingRecipient { .. })
    ));

    let rewrapped = file
        .rewrap(
            std::slice::from_ref(&old),
            &[old.to_public(), new.to_public()],
        )
        .unwrap();
    let refile = SopsFile::parse(&rewrapped).unwrap();
    assert_eq!(
        refile.recipients(),
        vec![old.to_public().to_string(), new.to_public().to_string()]
    );
    assert_same_secrets(
        &secrets,
        &refile.decrypt(std::slice::from_ref(&new)).unwrap(),
    );
    assert_eq!(
        refile
            .data_key(std::slice::from_ref(&new))
            .unwrap()
            .expose(),
        file.data_key(std::slice::from_ref(&old)).unwrap().expose()
    );
    // Values, MAC and timestamp are untouched.
    let (before, after): (Value, Value) = (
        serde_yaml::from_str(&yaml).unwrap(),
        serde_yaml::from_str(&rewrapped).unwrap(),
    );
    for name in secrets.names() {
        assert_eq!(before[name], after[name]);
    }
    assert_eq!(before["sops"]["mac"], after["sops"]["mac"]);
    assert_eq!(
        before["sops"]["lastmodified"],
        after["sops"]["lastmodified"]
    );

    // A sops-written fixture rewraps too, keeping its rules.
    let fx = SopsFile::parse(&fixture("age_encrypted_regex.yaml")).unwrap();
    let out = fx.rewrap(&[test_identity()], &[new.to_public()]).unwrap();
    let doc = SopsFile::parse(&out)
        .unwrap()
        .decrypt_document(&[new])
        .unwrap();
    let expected: Value =
        serde_yaml::from_str(&fixture("age_encrypted_regex_plaintext.yaml")).unwrap();
    assert_eq!(doc.expose(), &expected);
    assert!(sops_keys(&out).contains("encrypted_regex"));
}

#[test]
fn rewrap_refuses_a_tampered_file() {
    let identity = test_identity();
    let tampered = fixture("age_unencrypted_suffix.yaml").replacen("b: aaa", "b: aab", 1);
    let err = SopsFile::parse(&tampered)
        .unwrap()
        .rewrap(
            &[identity],
            &[age::x25519::Identity::generate().to_public()],
        )
        .unwrap_err();
    assert!(matches!(err, SopsError::MacMismatch), "{err:?}");
}

#[test]
fn rotate_uses_a_fresh_data_key_and_drops_removed_recipients() {
    let keep = age::x25519::Identity::generate();
    let leaver = age::x25519::Identity::generate();
    let secrets = sample_secrets();
    let yaml = sops::encrypt(&secrets, &[keep.to_public(), leaver.to_public()], NOW).unwrap();
    let file = SopsFile::parse(&yaml).unwrap();
    let later = NOW + 3_600_000;
    let rotated = file
        .rotate(std::slice::from_ref(&keep), &[keep.to_public()], later)
        .unwrap();
    let refile = SopsFile::parse(&rotated).unwrap();

    assert_ne!(
        refile
            .data_key(std::slice::from_ref(&keep))
            .unwrap()
            .expose(),
        file.data_key(std::slice::from_ref(&keep)).unwrap().expose()
    );
    let err = refile.decrypt(std::slice::from_ref(&leaver)).unwrap_err();
    assert!(
        matches!(err, SopsError::NoMatchingRecipient { .. }),
        "{err:?}"
    );
    // The old data key, which the leaver may have kept, opens nothing new.
    let old_key_file = yaml.split("sops:").next().unwrap().to_owned()
        + "sops:"
        + rotated.split("sops:").nth(1).unwrap();
    let mixed = SopsFile::parse(&old_key_file).unwrap();
    assert!(mixed.decrypt(std::slice::from_ref(&keep)).is_err());

    assert_same_secrets(
        &secrets,
        &refile.decrypt(std::slice::from_ref(&keep)).unwrap(),
    );
    assert_eq!(refile.last_modified(), "2026-05-17T18:54:30Z");

    // Rotating a sops-written file keeps its encryption rules and types.
    let fx = SopsFile::parse(&fixture("age_example.yaml")).unwrap();
    let out = fx
        .rotate(&[test_identity()], &[keep.to_public()], later)
        .unwrap();
    let doc = SopsFile::parse(&out)
        .unwrap()
        .decrypt_document(&[keep])
        .unwrap();
    let expected: Value = serde_yaml::from_str(&fixture("age_example_plaintext.yaml")).unwrap();
    assert_eq!(doc.expose(), &expected);
    assert!(
        out.contains("type:float]") && out.contains("type:bool]"),
        "{out}"
    );
}

#[test]
fn the_age_cli_unwraps_the_data_key_we_wrap() {
    let age_bin = ["/usr/bin/age", "/usr/local/bin/age"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("the `age` CLI is required for this test (Debian: apt-get install age)");
    let identity = age::x25519::Identity::generate();
    let yaml = sops::encrypt(&sample_secrets(), &[identity.to_public()], NOW).unwrap();
    let file = SopsFile::parse(&yaml).unwrap();
    let key = file.data_key(std::slice::from_ref(&identity)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let id_path = dir.path().join("identity.txt");
    let enc_path = dir.path().join("datakey.age");
    {
        use age::secrecy::ExposeSecret;
        std::fs::write(
            &id_path,
            format!("{}\n", identity.to_string().expose_secret()),
        )
        .unwrap();
    }
    std::fs::write(&enc_path, &file.age_entries()[0].enc).unwrap();
    let out = Command::new(age_bin)
        .arg("-d")
        .arg("-i")
        .arg(&id_path)
        .arg(&enc_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "age -d failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 32);
    assert_eq!(&out.stdout[..], &key.expose()[..]);
}

#[test]
fn the_fixture_data_key_matches_what_the_age_cli_reads() {
    // The reverse direction: age files written by sops unwrap identically
    // with our code and with the CLI.
    let Some(age_bin) = ["/usr/bin/age", "/usr/local/bin/age"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        panic!("the `age` CLI is required for this test (Debian: apt-get install age)");
    };
    let file = SopsFile::parse(&fixture("age_example.yaml")).unwrap();
    let key = file.data_key(&[test_identity()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let enc_path = dir.path().join("datakey.age");
    std::fs::write(&enc_path, &file.age_entries()[0].enc).unwrap();
    let out = Command::new(age_bin)
        .arg("-d")
        .arg("-i")
        .arg(fixture_dir().join("age-test-identity.txt"))
        .arg(&enc_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "age -d failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&out.stdout[..], &key.expose()[..]);
}

#[test]
fn plaintext_never_shows_in_debug_output() {
    let secrets = sample_secrets();
    let shown = format!("{secrets:?}");
    assert!(
        shown.contains("DATABASE_URL") && shown.contains("[redacted]"),
        "{shown}"
    );
    assert!(
        !shown.contains("hunter2") && !shown.contains("8080"),
        "{shown}"
    );
    assert_eq!(format!("{:?}", secrets.get("PORT").unwrap()), "[redacted]");

    let identity = test_identity();
    let file = SopsFile::parse(&fixture("age_example.yaml")).unwrap();
    let doc = file
        .decrypt_document(std::slice::from_ref(&identity))
        .unwrap();
    assert!(!format!("{doc:?}").contains("example_value"));
    let key = file.data_key(&[identity]).unwrap();
    assert_eq!(format!("{key:?}"), "DataKey([redacted])");
}

#[test]
fn decrypt_wants_a_flat_map_of_non_null_values() {
    let identity = test_identity();
    let err = SopsFile::parse(&fixture("age_example.yaml"))
        .unwrap()
        .decrypt(std::slice::from_ref(&identity))
        .unwrap_err();
    assert!(
        matches!(&err, SopsError::NotFlat { path, found: "a list" } if path == "example_array"),
        "{err:?}"
    );

    let fx = SopsFile::parse(&fixture("age_empty_value.yaml")).unwrap();
    let err = fx.decrypt(&[identity]).unwrap_err();
    assert!(
        matches!(err, SopsError::NotFlat { found: "null", .. }),
        "{err:?}"
    );
}

#[test]
fn names_sops_cannot_keep_secret_are_refused() {
    let r = [age::x25519::Identity::generate().to_public()];
    for name in ["TOKEN_unencrypted", "sops", ""] {
        let secrets: Secrets = [(name, "v")].into_iter().collect();
        let err = sops::encrypt(&secrets, &r, NOW).unwrap_err();
        assert!(
            matches!(err, SopsError::InvalidName { .. }),
            "{name}: {err:?}"
        );
    }
    let err = sops::encrypt(&sample_secrets(), &[], NOW).unwrap_err();
    assert!(matches!(err, SopsError::NoRecipients), "{err:?}");
}

#[test]
fn non_sops_and_broken_files_are_rejected_with_context() {
    assert!(matches!(
        SopsFile::parse("A: b\n"),
        Err(SopsError::MissingMetadata)
    ));
    assert!(matches!(
        SopsFile::parse("a: [unclosed\n"),
        Err(SopsError::Yaml { .. })
    ));
    assert!(matches!(
        SopsFile::parse("- a\n- b\n"),
        Err(SopsError::Malformed { .. })
    ));
    let no_mac = fixture("age_example.yaml").replace("  mac: ENC", "  notmac: ENC");
    assert!(matches!(
        SopsFile::parse(&no_mac),
        Err(SopsError::Malformed { path, .. }) if path == "sops.mac"
    ));
    let shamir =
        fixture("age_example.yaml").replace("sops:\n", "sops:\n  key_groups:\n  - age: []\n");
    assert!(matches!(
        SopsFile::parse(&shamir),
        Err(SopsError::Unsupported { .. })
    ));
    let bad_value = fixture("age_example.yaml").replace(
        "example_key: ENC[AES256_GCM,data:",
        "example_key: ENC[AES256_GCM,dat:",
    );
    let err = SopsFile::parse(&bad_value)
        .unwrap()
        .decrypt_document(&[test_identity()])
        .unwrap_err();
    assert!(
        matches!(&err, SopsError::Malformed { path, .. } if path == "example_key:"),
        "{err:?}"
    );
}
