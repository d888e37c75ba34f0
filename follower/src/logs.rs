//! Instance logs with nanosecond timestamps, paged by time, capped per
//! instance.
//!
//! A runtime appends an instance's output to `<work_dir>/stdout.log`. The
//! collector ([`spawn_collector`], a task of its own, and every API read)
//! turns it into records of `log.jsonl`: a timestamp in unix nanoseconds,
//! strictly increasing within the instance, the byte offset in `stdout.log`
//! after the record, and the text. Readers ask for records after `from` and
//! get back the stamp of the last one returned (`X-Last-Log-Nano`), so
//! polling never returns a line twice.
//!
//! - **Long lines are split, never truncated:** a line longer than
//!   [`LogLimits::max_line`] bytes becomes several records of at most that
//!   many bytes (cut at a UTF-8 boundary), all but the last marked
//!   `partial`; a line still being written is split as soon as it is longer.
//!   So every pass moves the collector's position past all it read, and a
//!   record is small whatever the app prints.
//! - **Resuming:** where to go on is the last record on disk (of `log.jsonl`,
//!   else of the newest segment), found by reading back from the end of the
//!   file however long the record is, so a line is never stamped twice. A
//!   record torn by a crash mid-append is cut off first.
//! - **Capped:** when `log.jsonl` reaches a quarter of
//!   [`LogLimits::max_bytes`] it is renamed to a segment
//!   `log.<stamp of its last record>.jsonl`, and the oldest segments are
//!   deleted so that they and a full `log.jsonl` fit in `max_bytes` (a
//!   record longer than a quarter of the cap can overshoot it by itself:
//!   keep `max_line` well under `max_bytes / 32`, JSON escaping can make a
//!   record six times its text).
//!   The bytes of `stdout.log` already collected are punched out of the file
//!   (`fallocate(PUNCH_HOLE)`, after the records holding them are synced):
//!   its offsets stay what the runtime and the collector know, and its disk
//!   use is what is not collected yet plus less than 64 KiB (a pass frees
//!   every MiB as it goes; an app that writes faster than the collector
//!   reads is bounded only by the runtime, which would need a pipe with
//!   back-pressure instead of a file to hold it).
//! - **Paging:** collection and reads of an instance are serialised (one
//!   lock per instance), records
//!   are dropped oldest first and stamps only grow, so the records a read
//!   sees are always a suffix of all the instance ever logged: `?from=`
//!   never returns a record twice and never skips one that is still kept
//!   (one older than the oldest kept is gone, and the next page starts at
//!   the oldest kept).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The raw output a runtime writes, in the instance's work dir.
pub const RAW: &str = "stdout.log";
/// The records being appended to.
const ACTIVE: &str = "log.jsonl";
/// Collected bytes of [`RAW`] are punched out in steps of at least this.
const PUNCH_STEP: u64 = 64 * 1024;
/// A pass that collects more than this frees it before going on.
const PUNCH_DURING: u64 = 1 << 20;

/// Per-instance limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Longest record text in bytes; longer lines are split.
    pub max_line: usize,
    /// Most bytes of records kept per instance; the oldest go first.
    pub max_bytes: u64,
}

impl Default for LogLimits {
    /// 16 KiB lines (what Docker and the CRI split at), 16 MiB per instance.
    fn default() -> Self {
        LogLimits {
            max_line: 16 * 1024,
            max_bytes: 16 << 20,
        }
    }
}

impl LogLimits {
    /// `log.jsonl` becomes a segment at this size, so at least three
    /// segments of history are kept under the cap.
    fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 4).max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Unix nanoseconds.
    pub t: u64,
    /// Offset in stdout.log after this record.
    pub o: u64,
    pub line: String,
    /// The line goes on in the next record (it was longer than
    /// [`LogLimits::max_line`]).
    #[serde(default, rename = "p", skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io { op, path, source }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One record cut from the front of the uncollected bytes.
#[derive(Debug, PartialEq, Eq)]
struct Cut<'a> {
    text: &'a [u8],
    /// Bytes of input it covers (with the newline of a complete line).
    consumed: usize,
    partial: bool,
}

/// The next record of `buf` (bytes of stdout.log from the collector's
/// position), or `None` while the line is shorter than `max` and not
/// complete yet.
fn next_record(buf: &[u8], max: usize) -> Option<Cut<'_>> {
    let max = max.max(4);
    let window = &buf[..buf.len().min(max + 1)];
    if let Some(i) = window.iter().position(|&b| b == b'\n') {
        return Some(Cut {
            text: &buf[..i],
            consumed: i + 1,
            partial: false,
        });
    }
    if buf.len() <= max {
        return None;
    }
    // Longer than `max`: cut before a UTF-8 continuation byte, if one of
    // the last 3 bytes starts a character.
    let cut = (max - 3..=max)
        .rev()
        .find(|&c| buf[c] & 0xC0 != 0x80)
        .unwrap_or(max);
    Some(Cut {
        text: &buf[..cut],
        consumed: cut,
        partial: true,
    })
}

/// Closed segments of `dir`, oldest first: (stamp of the last record, path).
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(io_err("listing", dir))?;
        let name = e.file_name();
        let Some(t) = name
            .to_str()
            .and_then(|n| n.strip_prefix("log.")?.strip_suffix(".jsonl"))
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((t, e.path()));
    }
    out.sort();
    Ok(out)
}

fn segment_path(dir: &Path, last_t: u64) -> PathBuf {
    dir.join(format!("log.{last_t:020}.jsonl"))
}

/// Reads `f` backwards from `end` in chunks; `visit` gets each complete line
/// (newest first) until it returns `Some`.
fn scan_back<T>(
    f: &mut File,
    end: u64,
    mut visit: impl FnMut(&[u8]) -> Option<T>,
) -> std::io::Result<Option<T>> {
    const CHUNK: u64 = 64 * 1024;
    let mut pos = end;
    // Bytes from `pos` up to the first newline seen (a line whose start is
    // not read yet), after a newline-terminated tail was visited.
    let mut carry: Vec<u8> = Vec::new();
    while pos > 0 {
        let start = pos.saturating_sub(CHUNK);
        let mut buf = vec![0u8; (pos - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf)?;
        buf.extend_from_slice(&carry);
        pos = start;
        let mut lines: Vec<&[u8]> = buf.split(|&b| b == b'\n').collect();
        // The first piece may start before `start`: kept for the next read.
        let first = if pos > 0 { lines.remove(0) } else { &[][..] };
        for l in lines.iter().rev() {
            if let Some(v) = visit(l) {
                return Ok(Some(v));
            }
        }
        carry = first.to_vec();
    }
    Ok(None)
}

/// The last record of a records file, if any.
fn last_record(path: &Path) -> Result<Option<LogLine>, LogError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("opening", path)(e)),
    };
    let len = f.metadata().map_err(io_err("reading", path))?.len();
    scan_back(&mut f, len, |l| serde_json::from_slice::<LogLine>(l).ok())
        .map_err(io_err("reading", path))
}

/// Cuts a torn last record (no newline: a crash mid-append) off `log.jsonl`.
fn repair_tail(path: &Path) -> Result<(), LogError> {
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("opening", path)(e)),
    };
    let len = f.metadata().map_err(io_err("reading", path))?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8];
    f.seek(SeekFrom::Start(len - 1))
        .and_then(|_| f.read_exact(&mut last))
        .map_err(io_err("reading", path))?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // The end of the last complete line: scan for the newline before.
    let mut keep = 0u64;
    let mut pos = len;
    while pos > 0 {
        let start = pos.saturating_sub(64 * 1024);
        let mut buf = vec![0u8; (pos - start) as usize];
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(io_err("reading", path))?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        pos = start;
    }
    tracing::warn!(path = %path.display(), torn = len - keep, "cutting a torn log record");
    f.set_len(keep).map_err(io_err("truncating", path))
}

/// Where collection goes on: the offset in stdout.log and the last stamp.
fn resume_point(dir: &Path) -> Result<(u64, u64), LogError> {
    let active = dir.join(ACTIVE);
    repair_tail(&active)?;
    if let Some(r) = last_record(&active)? {
        return Ok((r.o, r.t));
    }
    for (_, seg) in segments(dir)?.iter().rev() {
        if let Some(r) = last_record(seg)? {
            return Ok((r.o, r.t));
        }
    }
    Ok((0, 0))
}

/// Appends records to `log.jsonl`, turning it into a segment when it is
/// full and dropping the oldest segments beyond the cap.
struct Writer<'a> {
    dir: &'a Path,
    limits: LogLimits,
    file: Option<BufWriter<File>>,
    len: u64,
    last_t: u64,
}

impl<'a> Writer<'a> {
    fn new(dir: &'a Path, limits: LogLimits) -> Self {
        Writer {
            dir,
            limits,
            file: None,
            len: 0,
            last_t: 0,
        }
    }

    fn active(&self) -> PathBuf {
        self.dir.join(ACTIVE)
    }

    fn append(&mut self, rec: &LogLine) -> Result<(), LogError> {
        let path = self.active();
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err("opening", &path))?;
            self.len = f.metadata().map_err(io_err("reading", &path))?.len();
            self.file = Some(BufWriter::with_capacity(64 * 1024, f));
        }
        let mut bytes = serde_json::to_vec(rec).expect("a log record serialises");
        bytes.push(b'\n');
        // A segment never grows past its size (but by a record larger than
        // a segment), so the segments kept and `log.jsonl` fit the cap.
        if self.len > 0 && self.len + bytes.len() as u64 > self.limits.segment_bytes() {
            self.rotate()?;
            return self.append(rec);
        }
        let f = self.file.as_mut().expect("opened above");
        f.write_all(&bytes).map_err(io_err("appending to", &path))?;
        self.len += bytes.len() as u64;
        self.last_t = rec.t;
        Ok(())
    }

    /// Makes what was appended visible to readers.
    fn flush(&mut self) -> Result<(), LogError> {
        let path = self.active();
        if let Some(f) = self.file.as_mut() {
            f.flush().map_err(io_err("appending to", &path))?;
        }
        Ok(())
    }

    /// Flushes and syncs `log.jsonl`.
    fn sync(&mut self) -> Result<(), LogError> {
        self.flush()?;
        let path = self.active();
        if let Some(f) = self.file.as_mut() {
            f.get_ref().sync_data().map_err(io_err("syncing", &path))?;
        }
        Ok(())
    }

    /// `log.jsonl` becomes the newest segment.
    fn rotate(&mut self) -> Result<(), LogError> {
        self.sync()?;
        self.file = None;
        let (from, to) = (self.active(), segment_path(self.dir, self.last_t));
        std::fs::rename(&from, &to).map_err(io_err("renaming", &from))?;
        self.len = 0;
        self.drop_oldest()
    }

    /// Deletes the oldest segments until they leave room for a full
    /// `log.jsonl` under the cap; the newest segment stays (it says where
    /// to resume).
    fn drop_oldest(&self) -> Result<(), LogError> {
        let segs = segments(self.dir)?;
        let mut sizes = Vec::with_capacity(segs.len());
        for (_, p) in &segs {
            sizes.push(std::fs::metadata(p).map_err(io_err("reading", p))?.len());
        }
        let mut total: u64 = sizes.iter().sum::<u64>() + self.limits.segment_bytes();
        for ((_, p), size) in segs.iter().zip(&sizes).take(segs.len().saturating_sub(1)) {
            if total <= self.limits.max_bytes {
                break;
            }
            std::fs::remove_file(p).map_err(io_err("removing", p))?;
            total -= size;
        }
        Ok(())
    }
}

/// Frees the disk blocks of stdout.log before `upto` (collected), after
/// `sync` made the records holding them durable. The file keeps its size
/// and offsets; the freed range reads as zeros.
fn punch_collected(
    raw: &Path,
    upto: u64,
    sync: impl FnOnce() -> Result<(), LogError>,
) -> Result<(), LogError> {
    use nix::fcntl::{FallocateFlags, fallocate};
    use nix::unistd::{Whence, lseek};
    let end = upto / 4096 * 4096;
    if end < PUNCH_STEP {
        return Ok(());
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(raw)
        .map_err(io_err("opening", raw))?;
    let first_data = match lseek(&f, 0, Whence::SeekData) {
        Ok(o) => o as u64,
        Err(nix::errno::Errno::ENXIO) => return Ok(()), // nothing but holes
        Err(_) => 0,
    };
    if first_data >= end || end - first_data < PUNCH_STEP {
        return Ok(());
    }
    sync()?;
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(&f, flags, 0, end as i64) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            tracing::debug!(path = %raw.display(), "the filesystem cannot punch holes: stdout.log is not capped");
            Ok(())
        }
        Err(e) => Err(io_err("punching collected bytes out of", raw)(
            std::io::Error::from(e),
        )),
    }
}

type DirLock = std::sync::Arc<std::sync::Mutex<()>>;

/// One lock per work dir: collection and reads of an instance one at a
/// time, so no line is stamped twice and a read never sees a half-rotated
/// log; other instances are not held up by a busy one.
static LOCKS: std::sync::Mutex<BTreeMap<PathBuf, DirLock>> = std::sync::Mutex::new(BTreeMap::new());

fn dir_lock(dir: &Path) -> DirLock {
    let mut locks = LOCKS.lock().unwrap_or_else(|e| e.into_inner());
    if locks.len() > 64 {
        // Forget the locks nobody holds of instances that are gone.
        locks.retain(|d, l| std::sync::Arc::strong_count(l) > 1 || d.exists());
    }
    locks.entry(dir.to_path_buf()).or_default().clone()
}

/// Runs `f` holding `dir`'s lock.
fn locked<T>(dir: &Path, f: impl FnOnce() -> T) -> T {
    let lock = dir_lock(dir);
    let _one_at_a_time = lock.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

/// Stamps what `stdout.log` holds beyond the last record. Blocking.
pub fn collect(work_dir: &Path, limits: LogLimits) -> Result<usize, LogError> {
    locked(work_dir, || collect_locked(work_dir, limits)).map(|(n, _)| n)
}

/// [`collect`], and a mark: every line the instance's output gets later is
/// stamped after it (readers merging several instances return lines only
/// up to the smallest mark, so a late line never lands behind a stamp
/// already returned). Blocking.
pub fn collect_with_mark(work_dir: &Path, limits: LogLimits) -> Result<u64, LogError> {
    let (_, last) = locked(work_dir, || collect_locked(work_dir, limits))?;
    // Later collections stamp max(their now, last + 1), both after this
    // (unless the wall clock steps back).
    Ok(now_nanos().saturating_sub(1).max(last))
}

/// Collects; returns the records written and the newest stamp.
fn collect_locked(dir: &Path, limits: LogLimits) -> Result<(usize, u64), LogError> {
    let raw = dir.join(RAW);
    let (mut offset, mut t) = resume_point(dir)?;
    let mut f = match File::open(&raw) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, t)),
        Err(e) => return Err(io_err("opening", &raw)(e)),
    };
    let len = f.metadata().map_err(io_err("reading", &raw))?.len();
    if len < offset {
        // Shorter than what was collected: the file was started anew.
        offset = 0;
    }
    if offset == 0 {
        // Records lost (or never written) while the front was punched out:
        // start at the first data, not at the zeros of the hole.
        if let Ok(o) = nix::unistd::lseek(&f, 0, nix::unistd::Whence::SeekData) {
            offset = (o as u64).min(len);
        }
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(io_err("seeking in", &raw))?;
    // Up to the length seen now: an app writing faster than this reads
    // cannot keep the pass going.
    let mut reader = f.take(len - offset);
    let mut out = Writer::new(dir, limits);
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut n = 0;
    let mut punched = offset;
    loop {
        let k = reader.read(&mut chunk).map_err(io_err("reading", &raw))?;
        if k == 0 {
            break;
        }
        pending.extend_from_slice(&chunk[..k]);
        let mut used = 0;
        while let Some(cut) = next_record(&pending[used..], limits.max_line) {
            offset += cut.consumed as u64;
            t = now_nanos().max(t + 1);
            out.append(&LogLine {
                t,
                o: offset,
                line: String::from_utf8_lossy(cut.text).into_owned(),
                partial: cut.partial,
            })?;
            used += cut.consumed;
            n += 1;
        }
        pending.drain(..used);
        // A long pass frees as it goes.
        if offset - punched >= PUNCH_DURING {
            punch_collected(&raw, offset, || out.sync())?;
            punched = offset;
        }
    }
    if offset > punched {
        punch_collected(&raw, offset, || out.sync())?;
    }
    out.flush()?;
    Ok((n, t))
}

/// Removes an instance's work dir (when it is retired), after any
/// collection of it finished, so none writes into it while it goes.
pub fn remove_work_dir(work_dir: &Path) -> std::io::Result<()> {
    let r = locked(work_dir, || std::fs::remove_dir_all(work_dir));
    LOCKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(work_dir);
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Records of `path` stamped after `from`, appended to `out` up to `limit`.
fn read_file(path: &Path, from: u64, limit: usize, out: &mut Vec<LogLine>) -> Result<(), LogError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("opening", path)(e)),
    };
    for l in std::io::BufReader::new(f).split(b'\n') {
        let l = l.map_err(io_err("reading", path))?;
        if let Ok(rec) = serde_json::from_slice::<LogLine>(&l)
            && rec.t > from
        {
            out.push(rec);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(())
}

/// Records stamped strictly after `from`, at most `limit`, oldest first.
pub fn read(work_dir: &Path, from: u64, limit: usize) -> Result<Vec<LogLine>, LogError> {
    locked(work_dir, || {
        let mut out = Vec::new();
        for (last_t, seg) in segments(work_dir)? {
            if last_t > from {
                read_file(&seg, from, limit, &mut out)?;
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        read_file(&work_dir.join(ACTIVE), from, limit, &mut out)?;
        Ok(out)
    })
}

/// The last `n` non-empty lines of an instance's raw output, joined by
/// " | " (for the reason of an exit). Reads at most the final 16 KiB.
pub fn raw_tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))
        .and_then(|_| f.read_to_end(&mut buf))
        .is_err()
    {
        return String::new();
    }
    // Not from the middle of a character.
    let start = buf
        .iter()
        .take(3)
        .take_while(|&&b| b & 0xC0 == 0x80)
        .count();
    let text = String::from_utf8_lossy(&buf[start..]);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.trim_matches('\0'))
        .filter(|l| !l.trim().is_empty())
        .map(|l| match l.char_indices().nth(TAIL_LINE) {
            Some((cut, _)) => format!("{}...", &l[..cut]),
            None => l.to_string(),
        })
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Characters kept of each line of [`raw_tail`] (it ends up in reasons).
const TAIL_LINE: usize = 300;

/// Collects the logs of the instances in the work dirs `dirs` gives, every
/// `period`, until `shutdown` turns true: lines are stamped close to when
/// they were written and the raw output is freed, whether or not anyone
/// reads them.
pub fn spawn_collector(
    dirs: impl Fn() -> Vec<PathBuf> + Send + 'static,
    limits: LogLimits,
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let work_dirs = dirs();
            let _ = tokio::task::spawn_blocking(move || {
                for d in work_dirs {
                    if let Err(e) = collect(&d, limits) {
                        tracing::debug!(error = %zw_util::error_chain(&e), "collecting logs");
                    }
                }
            })
            .await;
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LogLimits {
        LogLimits::default()
    }

    fn append(path: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    /// Bytes of records on disk (segments and log.jsonl).
    fn record_bytes(dir: &Path) -> u64 {
        let mut total = std::fs::metadata(dir.join(ACTIVE)).map_or(0, |m| m.len());
        for (_, p) in segments(dir).unwrap() {
            total += std::fs::metadata(p).unwrap().len();
        }
        total
    }

    /// Disk blocks of a file, in bytes.
    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
    }

    /// Every record from `from`, paged `page` at a time.
    fn page_all(dir: &Path, mut from: u64, page: usize) -> Vec<LogLine> {
        let mut all = Vec::new();
        loop {
            let got = read(dir, from, page).unwrap();
            let Some(last) = got.last() else {
                return all;
            };
            from = last.t;
            all.extend(got);
        }
    }

    #[test]
    fn paging_never_returns_a_line_twice() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("stdout.log");
        std::fs::write(&raw, "one\ntwo\nthr").unwrap();
        assert_eq!(collect(dir.path(), limits()).unwrap(), 2);
        // Collecting again stamps nothing new; the partial line waits.
        assert_eq!(collect(dir.path(), limits()).unwrap(), 0);
        let first = read(dir.path(), 0, 1).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].line, "one");
        let mut f = std::fs::OpenOptions::new().append(true).open(&raw).unwrap();
        f.write_all(b"ee\nfour\n").unwrap();
        assert_eq!(collect(dir.path(), limits()).unwrap(), 2);
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
        let mark = collect_with_mark(dir.path(), limits()).unwrap();
        assert!(mark >= rest.last().unwrap().t);
        f.write_all(b"five\n").unwrap();
        collect(dir.path(), limits()).unwrap();
        let five = read(dir.path(), mark, 10).unwrap();
        assert_eq!(five.len(), 1);
        assert_eq!(five[0].line, "five");
    }

    #[test]
    fn records_are_cut_at_newlines_and_at_the_limit_on_char_boundaries() {
        let cut = |buf: &[u8], max| {
            next_record(buf, max).map(|c| (c.text.to_vec(), c.consumed, c.partial))
        };
        assert_eq!(cut(b"ab\ncd", 8), Some((b"ab".to_vec(), 3, false)));
        assert_eq!(
            cut(b"abcd", 8),
            None,
            "a short line still being written waits"
        );
        assert_eq!(
            cut(b"abcdefgh", 8),
            None,
            "exactly the limit: the newline may follow"
        );
        assert_eq!(
            cut(b"abcdefgh\n", 8),
            Some((b"abcdefgh".to_vec(), 9, false))
        );
        assert_eq!(cut(b"abcdefghi", 8), Some((b"abcdefgh".to_vec(), 8, true)));
        // "é" is two bytes: not cut in half.
        let s = "abcdefgé".as_bytes();
        assert_eq!(cut(s, 8), Some((b"abcdefg".to_vec(), 7, true)));
        // Not UTF-8 at all: cut at the limit.
        assert_eq!(cut(&[0x80; 12], 8), Some((vec![0x80; 8], 8, true)));
    }

    /// The bug of issue 14: a record over 64 KiB made every pass re-append
    /// the whole file. A 200 KiB line is now split once, and each record is
    /// collected once however often the collector runs.
    #[test]
    fn a_200_kib_line_and_the_lines_after_it_are_collected_once() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("stdout.log");
        let long = "x".repeat(200 * 1024);
        append(&raw, format!("{long}\n").as_bytes());
        let n = collect(dir.path(), limits()).unwrap();
        assert_eq!(n, 13, "200 KiB in 16 KiB records");
        // The long line is the newest record: passes go on after it.
        for _ in 0..3 {
            assert_eq!(collect(dir.path(), limits()).unwrap(), 0);
        }
        append(&raw, b"after 1\nafter 2\n");
        assert_eq!(collect(dir.path(), limits()).unwrap(), 2);
        append(&raw, b"after 3\n");
        assert_eq!(collect(dir.path(), limits()).unwrap(), 1);
        let all = page_all(dir.path(), 0, 4);
        assert_eq!(all.len(), 16);
        let joined: String = all[..13].iter().map(|l| l.line.as_str()).collect();
        assert_eq!(joined, long, "split, not truncated");
        assert!(all[..12].iter().all(|l| l.partial) && !all[12].partial);
        let tail: Vec<&str> = all[13..].iter().map(|l| l.line.as_str()).collect();
        assert_eq!(tail, ["after 1", "after 2", "after 3"]);
        assert!(record_bytes(dir.path()) < 250 * 1024);
    }

    #[test]
    fn a_line_without_end_is_split_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("stdout.log");
        let lim = LogLimits {
            max_line: 1024,
            max_bytes: 1 << 20,
        };
        append(&raw, &vec![b'y'; 3000]);
        assert_eq!(collect(dir.path(), lim).unwrap(), 2, "two full records now");
        append(&raw, b"yy\n");
        assert_eq!(collect(dir.path(), lim).unwrap(), 1);
        let all = read(dir.path(), 0, 100).unwrap();
        let lens: Vec<(usize, bool)> = all.iter().map(|l| (l.line.len(), l.partial)).collect();
        assert_eq!(lens, [(1024, true), (1024, true), (954, false)]);
    }

    /// Logging fast for a while: the records never take more than the cap,
    /// the raw output is freed as it is collected, and paging stays exact
    /// (each kept record once, in order; the gaps are dropped records).
    #[test]
    fn fast_logs_stay_under_the_cap_and_paging_stays_exact() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("stdout.log");
        let lim = LogLimits {
            max_line: 1024,
            max_bytes: 256 * 1024,
        };
        let mut next = 0u64;
        let mut from = 0u64;
        let mut seen: Vec<u64> = Vec::new();
        let mut gaps = 0;
        for round in 0..60 {
            let mut chunk = String::new();
            for _ in 0..2000 {
                chunk.push_str(&format!("line {next} {}\n", "z".repeat(40)));
                next += 1;
            }
            append(&raw, chunk.as_bytes());
            collect(dir.path(), lim).unwrap();
            assert!(
                record_bytes(dir.path()) <= lim.max_bytes,
                "round {round}: {} bytes of records",
                record_bytes(dir.path())
            );
            assert!(
                allocated(&raw) <= PUNCH_STEP + 8192,
                "round {round}: stdout.log holds {} bytes on disk",
                allocated(&raw)
            );
            // A reader pages a little every round.
            for _ in 0..3 {
                let page = read(dir.path(), from, 500).unwrap();
                let Some(last) = page.last() else { break };
                from = last.t;
                let nums: Vec<u64> = page
                    .iter()
                    .map(|l| l.line.split(' ').nth(1).unwrap().parse().unwrap())
                    .collect();
                assert!(
                    nums.windows(2).all(|w| w[1] == w[0] + 1),
                    "a page is contiguous"
                );
                if let Some(&prev) = seen.last()
                    && nums[0] != prev + 1
                {
                    // Skipped: only what is no longer kept.
                    let oldest = read(dir.path(), 0, 1).unwrap();
                    let oldest: u64 = oldest[0].line.split(' ').nth(1).unwrap().parse().unwrap();
                    assert!(oldest >= nums[0], "line {} was kept but skipped", prev + 1);
                    gaps += 1;
                }
                seen.extend(nums);
            }
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "no line twice");
        assert!(gaps > 0, "the reader fell behind the cap");
        // What is kept is the newest, to the last line, each once.
        let kept = page_all(dir.path(), 0, 777);
        let nums: Vec<u64> = kept
            .iter()
            .map(|l| l.line.split(' ').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(*nums.last().unwrap(), next - 1);
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(nums[0] > 0, "the oldest were dropped");
        assert!(
            nums.len() > 1000,
            "history is kept up to the cap: {}",
            nums.len()
        );
        assert!(segments(dir.path()).unwrap().len() >= 3);
    }

    #[test]
    fn a_torn_record_is_cut_and_collection_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("stdout.log");
        append(&raw, b"a\nb\n");
        collect(dir.path(), limits()).unwrap();
        // A crash in the middle of appending the next record.
        append(&raw, b"c\n");
        append(
            &dir.path().join(ACTIVE),
            b"{\"t\":99999999999999999,\"o\":6,\"li",
        );
        collect(dir.path(), limits()).unwrap();
        let lines: Vec<String> = read(dir.path(), 0, 10)
            .unwrap()
            .into_iter()
            .map(|l| l.line)
            .collect();
        assert_eq!(lines, ["a", "b", "c"]);
    }

    #[test]
    fn a_raw_file_started_anew_is_collected_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("stdout.log");
        append(&raw, b"first life, a long line\n");
        collect(dir.path(), limits()).unwrap();
        std::fs::write(&raw, b"new\n").unwrap();
        collect(dir.path(), limits()).unwrap();
        let lines: Vec<String> = read(dir.path(), 0, 10)
            .unwrap()
            .into_iter()
            .map(|l| l.line)
            .collect();
        assert_eq!(lines, ["first life, a long line", "new"]);
    }

    #[test]
    fn the_tail_of_raw_output_skips_punched_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("stdout.log");
        let mut bytes = vec![0u8; 100];
        bytes.extend_from_slice(b"one\n\ntwo\nthree\n");
        std::fs::write(&raw, bytes).unwrap();
        assert_eq!(raw_tail(&raw, 2), "two | three");
        std::fs::write(&raw, format!("{}\nend\n", "é".repeat(20_000))).unwrap();
        assert_eq!(
            raw_tail(&raw, 2),
            format!("{}... | end", "é".repeat(TAIL_LINE))
        );
        assert_eq!(raw_tail(&dir.path().join("none"), 2), "");
    }
}
