//! Error display shared by the follower's modules.

/// `e` and its sources, joined by ": " (a `Display` never repeats its
/// source, so this is how a whole cause reaches a log line or a reason).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
