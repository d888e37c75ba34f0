//! sops files: the parser and decryption of `meta_schema::sops`, on files
//! encrypted to a test key (the real-sops fixtures of meta-schema are the
//! seeds).

use std::str::FromStr;

use meta_schema::sops::{self, SopsFile};

/// The age identity of meta-schema's sops fixtures (a test key, public in
/// `meta-schema/tests/fixtures/sops/age-test-identity.txt`).
const TEST_IDENTITY: &str =
    "AGE-SECRET-KEY-1EQUCGFZH8UZKSZ0Z5N5T234YRNDT4U9H7QNYXWRRNJYDDVXE6FWSCPGNJ7";

const NOW: i64 = 1_779_040_470_000;

/// Nothing panics on any text; a file that decrypts is written again by
/// `sops::encrypt` (when its names are ones zeitwork writes) and decrypts
/// to the same secrets.
pub fn file(data: &[u8]) {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = SopsFile::parse(yaml) else {
        return;
    };
    let _ = (
        file.names(),
        file.recipients(),
        file.last_modified(),
        file.version(),
    );
    let id = age::x25519::Identity::from_str(TEST_IDENTITY).expect("the test identity parses");
    let _ = file.decrypt_document(std::slice::from_ref(&id));
    let Ok(secrets) = file.decrypt(std::slice::from_ref(&id)) else {
        return;
    };
    let Ok(written) = sops::encrypt(&secrets, &[id.to_public()], NOW) else {
        return;
    };
    let again = SopsFile::parse(&written)
        .unwrap_or_else(|e| panic!("a file sops::encrypt wrote does not parse: {e}"));
    let back = again
        .decrypt(std::slice::from_ref(&id))
        .unwrap_or_else(|e| panic!("a file sops::encrypt wrote does not decrypt: {e}"));
    let names = |s: &sops::Secrets| s.names().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(names(&secrets), names(&back), "names after a round trip");
    for (name, value) in secrets.iter() {
        assert_eq!(
            back.get(name).map(|v| v.expose()),
            Some(value.expose()),
            "value of {name} after a round trip"
        );
    }
}
