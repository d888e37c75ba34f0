//! The GitHub push webhook: `captain::webhook::verify_signature` against an
//! HMAC computed here, and the push payload's JSON.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The reference: `sha256=` and the hex of HMAC-SHA256(secret, body), hex
/// digits of either case, surrounding white space ignored.
fn reference(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(body);
    let want = mac.finalize().into_bytes();
    sig.len() == want.len() && sig.iter().zip(want.iter()).all(|(a, b)| a == b)
}

/// Input: a length-prefixed secret, a length-prefixed signature header,
/// then the body. The verdict on the given signature is the reference's;
/// the signature GitHub would send verifies and any changed byte of it
/// does not; the payload parses or is refused without a panic.
pub fn push(data: &[u8]) {
    let [secret, signature, body] = pieces::<3>(data);
    let signature = String::from_utf8_lossy(signature);
    assert_eq!(
        captain::webhook::verify_signature(secret, body, &signature),
        reference(secret, body, &signature),
        "verdict on {signature:?}"
    );
    let good = captain::webhook::sign(secret, body);
    assert!(captain::webhook::verify_signature(secret, body, &good));
    let mut bad = good.into_bytes();
    let i = secret.len() % (bad.len() - 7) + 7;
    bad[i] = if bad[i] == b'0' { b'1' } else { b'0' };
    let bad = String::from_utf8(bad).expect("hex");
    assert!(
        !captain::webhook::verify_signature(secret, body, &bad),
        "a changed signature verifies"
    );
    if let Ok(push) = serde_json::from_slice::<captain::webhook::GithubPush>(body) {
        let _ = push.git_ref.strip_prefix("refs/heads/");
        let _ = push.after.bytes().all(|b| b == b'0');
    }
}

/// Splits `data` into length-prefixed pieces (one length byte each); the
/// last piece takes what is left.
fn pieces<const N: usize>(mut data: &[u8]) -> [&[u8]; N] {
    let mut out = [&b""[..]; N];
    for (i, slot) in out.iter_mut().enumerate() {
        if i + 1 == N {
            *slot = data;
            break;
        }
        let Some((&len, rest)) = data.split_first() else {
            break;
        };
        let len = usize::from(len).min(rest.len());
        *slot = &rest[..len];
        data = &rest[len..];
    }
    out
}
