use std::error::Error;
use std::fmt;

/// An error and its causes, `outer: cause: root cause`, on one line. A
/// cause whose text the line already holds is not repeated (for errors of
/// other crates whose `Display` includes their source).
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&error_chain(self.0))
    }
}

/// [`ErrorChain`] as a `String`.
pub fn error_chain(e: &(dyn Error + '_)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    let mut depth = 0;
    while let Some(c) = cur {
        let t = c.to_string();
        if !t.is_empty() && !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
        depth += 1;
        if depth > 32 {
            break;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("opening the ledger")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("reading: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn causes_once_each() {
        let io = || std::io::Error::other("disk on fire");
        assert_eq!(
            ErrorChain(&Outer(io())).to_string(),
            "opening the ledger: disk on fire"
        );
        assert_eq!(error_chain(&Repeats(io())), "reading: disk on fire");
    }
}
