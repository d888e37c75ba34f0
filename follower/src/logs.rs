//! Instance logs with nanosecond timestamps, paged by time.
//!
//! A runtime writes an instance's output to `<work_dir>/stdout.log`. The
//! collector turns each complete line into a record of `log.jsonl` with a
//! timestamp in unix nanoseconds, strictly increasing within the instance,
//! and the byte offset in `stdout.log` after the line. The last record tells
//! a restarted follower where to resume, so a line is never stamped twice.
//! Readers ask for lines after `from` and get back the stamp of the last line
//! returned (`X-Last-Log-Nano`), so polling never returns a line twice.

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Unix nanoseconds.
    pub t: u64,
    /// Offset in stdout.log after this line.
    pub o: u64,
    pub line: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn last_record(path: &Path) -> Option<LogLine> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    // Records are short; the last one is within the final 64 KiB.
    let start = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    String::from_utf8_lossy(&buf)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<LogLine>(l).ok())
}

/// Collection runs from the reconciler's loop and from API reads; one at a
/// time, so no line is stamped twice.
static COLLECTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Stamps the complete lines of `stdout.log` not stamped yet. Blocking.
pub fn collect(work_dir: &Path) -> Result<usize, LogError> {
    let _one_at_a_time = COLLECTING.lock().unwrap_or_else(|e| e.into_inner());
    collect_locked(work_dir).map(|(n, _)| n)
}

/// [`collect`], and a mark: every line the instance's output gets later is
/// stamped after it (readers merging several instances return lines only
/// up to the smallest mark, so a late line never lands behind a stamp
/// already returned). Blocking.
pub fn collect_with_mark(work_dir: &Path) -> Result<u64, LogError> {
    let _one_at_a_time = COLLECTING.lock().unwrap_or_else(|e| e.into_inner());
    let (_, last) = collect_locked(work_dir)?;
    // Later collections stamp max(their now, last + 1), both after this
    // (unless the wall clock steps back).
    Ok(now_nanos().saturating_sub(1).max(last))
}

/// Collects; returns the lines stamped and the newest stamp of the index.
fn collect_locked(work_dir: &Path) -> Result<(usize, u64), LogError> {
    let raw = work_dir.join("stdout.log");
    let index = work_dir.join("log.jsonl");
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| LogError::Io { op, path, source }
    };
    let last = last_record(&index);
    let Ok(mut f) = std::fs::File::open(&raw) else {
        return Ok((0, last.map_or(0, |l| l.t)));
    };
    let (mut offset, mut t) = last.map(|l| (l.o, l.t)).unwrap_or((0, 0));
    f.seek(SeekFrom::Start(offset))
        .map_err(io("seeking in", &raw))?;
    let mut reader = std::io::BufReader::new(f);
    let mut out = Vec::new();
    let mut n = 0;
    loop {
        let mut buf = Vec::new();
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(io("reading", &raw))?;
        if read == 0 || buf.last() != Some(&b'\n') {
            break; // end, or a partial line still being written
        }
        offset += read as u64;
        t = now_nanos().max(t + 1);
        buf.pop();
        let line = String::from_utf8_lossy(&buf).into_owned();
        serde_json::to_writer(&mut out, &LogLine { t, o: offset, line })
            .expect("a log line serialises");
        out.push(b'\n');
        n += 1;
    }
    if n > 0 {
        let mut idx = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&index)
            .map_err(io("opening", &index))?;
        idx.write_all(&out).map_err(io("appending to", &index))?;
    }
    Ok((n, t))
}

/// Lines stamped strictly after `from`, at most `limit`, oldest first.
pub fn read(work_dir: &Path, from: u64, limit: usize) -> Result<Vec<LogLine>, LogError> {
    let index = work_dir.join("log.jsonl");
    let f = match std::fs::File::open(&index) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LogError::Io {
                op: "opening",
                path: index,
                source,
            });
        }
    };
    let mut out = Vec::new();
    for l in std::io::BufReader::new(f).lines() {
        let l = l.map_err(|source| LogError::Io {
            op: "reading",
            path: index.clone(),
            source,
        })?;
        if let Ok(rec) = serde_json::from_str::<LogLine>(&l)
            && rec.t > from
        {
            out.push(rec);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_never_returns_a_line_twice() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("stdout.log");
        std::fs::write(&raw, "one\ntwo\nthr").unwrap();
        assert_eq!(collect(dir.path()).unwrap(), 2);
        // Collecting again stamps nothing new; the partial line waits.
        assert_eq!(collect(dir.path()).unwrap(), 0);
        let first = read(dir.path(), 0, 1).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].line, "one");
        let mut f = std::fs::OpenOptions::new().append(true).open(&raw).unwrap();
        f.write_all(b"ee\nfour\n").unwrap();
        assert_eq!(collect(dir.path()).unwrap(), 2);
        let rest = read(dir.path(), first[0].t, 100).unwrap();
        let lines: Vec<&str> = rest.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(lines, ["two", "three", "four"]);
        assert!(rest.windows(2).all(|w| w[0].t < w[1].t));
        assert!(
            read(dir.path(), rest.last().unwrap().t, 100)
                .unwrap()
                .is_empty()
        );
        // The mark is at or after every stamp so far, and the next line is
        // stamped after it.
        let mark = collect_with_mark(dir.path()).unwrap();
        assert!(mark >= rest.last().unwrap().t);
        f.write_all(b"five\n").unwrap();
        collect(dir.path()).unwrap();
        let five = read(dir.path(), mark, 10).unwrap();
        assert_eq!(five.len(), 1);
        assert_eq!(five[0].line, "five");
    }
}
