//! Build log sinks: where the lines of a build go, so that a caller (the CLI,
//! the captain) can store and stream them.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::error::Stage;

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// The backend's standard output.
    Stdout,
    /// The backend's standard error.
    Stderr,
    /// A message of the builder itself (stages, retries).
    Builder,
}

/// One line of a build log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    pub stream: LogStream,
    pub text: String,
}

/// Receives build log lines and stage changes. Implementations must be cheap
/// and must not block for long: they are called from the build's I/O loop.
pub trait LogSink: Send + Sync {
    fn line(&self, line: LogLine);
    /// Called when the build enters a new stage (for progress displays).
    fn stage(&self, _stage: Stage) {}
}

impl dyn LogSink + '_ {
    /// Log a message of the builder itself.
    pub fn builder(&self, text: impl Into<String>) {
        self.line(LogLine {
            stream: LogStream::Builder,
            text: text.into(),
        });
    }
}

/// Discards everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullLog;

impl LogSink for NullLog {
    fn line(&self, _line: LogLine) {}
}

/// Keeps every line in memory (tests, short builds).
#[derive(Debug, Default)]
pub struct MemoryLog {
    lines: Mutex<Vec<LogLine>>,
    stages: Mutex<Vec<Stage>>,
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn lines(&self) -> Vec<LogLine> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn stages(&self) -> Vec<Stage> {
        self.stages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// Whether any line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.text.contains(needle))
    }
}

impl LogSink for MemoryLog {
    fn line(&self, line: LogLine) {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }
    fn stage(&self, stage: Stage) {
        self.stages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stage);
    }
}

/// An event on a [`ChannelLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    Line(LogLine),
    Stage(Stage),
}

/// Forwards lines to a tokio channel, e.g. for the captain to store and stream.
/// Lines sent after the receiver is dropped are discarded.
#[derive(Debug, Clone)]
pub struct ChannelLog {
    tx: tokio::sync::mpsc::UnboundedSender<LogEvent>,
}

impl ChannelLog {
    pub fn new() -> (Self, tokio::sync::mpsc::UnboundedReceiver<LogEvent>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Self { tx }, rx)
    }
}

impl LogSink for ChannelLog {
    fn line(&self, line: LogLine) {
        let _ = self.tx.send(LogEvent::Line(line));
    }
    fn stage(&self, stage: Stage) {
        let _ = self.tx.send(LogEvent::Stage(stage));
    }
}

/// Forwards to an inner sink and remembers the last `capacity` lines, for
/// error messages.
pub(crate) struct TailLog<'a> {
    inner: &'a dyn LogSink,
    tail: Mutex<VecDeque<String>>,
    capacity: usize,
}

impl<'a> TailLog<'a> {
    pub(crate) fn new(inner: &'a dyn LogSink, capacity: usize) -> Self {
        Self {
            inner,
            tail: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
        }
    }
    pub(crate) fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl LogSink for TailLog<'_> {
    fn line(&self, line: LogLine) {
        {
            let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == self.capacity {
                tail.pop_front();
            }
            tail.push_back(line.text.clone());
        }
        self.inner.line(line);
    }
    fn stage(&self, stage: Stage) {
        self.inner.stage(stage);
    }
}
