//! Idle plain-HTTP keep-alive connections, held outside the runtime.
//!
//! A keep-alive connection spends most of its life waiting for the client's
//! next request. Waiting in its own task costs the task and its future
//! (about 2 KiB) plus the runtime's registration (256 bytes): more than
//! nginx spends on a whole idle connection. So once a plain HTTP/1.1
//! connection has been quiet for a while ([`crate::server`] decides when),
//! its task ends and the socket is *parked* here: taken out of the runtime's
//! reactor and added, one-shot, to an epoll set of our own, with its client
//! address, connection permits (the edge's and its client's, see
//! [`crate::limit`]) and header deadline: about 105 bytes in all.
//! One task waits on that set (the epoll descriptor is itself pollable);
//! when a parked socket becomes readable (a request, or the client
//! closing), it is handed back to the runtime in a new task, and a parked
//! connection whose header deadline passes is closed by a sweep once a
//! second.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::limit::ConnPermit;
use crate::passthrough::Prefixed;

/// How often parked connections past their header deadline are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Events taken from the set per system call.
const BATCH: usize = 256;

/// A parked connection.
struct Parked {
    stream: std::net::TcpStream,
    remote: SocketAddr,
    permit: ConnPermit,
    /// When the wait for the next request head began.
    idle_since: Instant,
}

/// A connection handed back by the lot: readable (or closed by the client).
pub struct Woken {
    pub stream: TcpStream,
    pub remote: SocketAddr,
    pub permit: ConnPermit,
    pub idle_since: Instant,
}

struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

/// The parked connections of one edge.
pub struct ParkingLot {
    epoll: AsyncFd<EpollFd>,
    parked: Mutex<HashMap<RawFd, Parked>>,
}

impl ParkingLot {
    /// A new, empty lot; needs a runtime (the epoll descriptor is
    /// registered with its reactor).
    pub fn new() -> std::io::Result<Arc<Self>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        // SAFETY: `EpollFd` owns the descriptor (an `OwnedFd` inside
        // `Epoll`) and always returns that same one; it stays open until
        // the `AsyncFd` is dropped.
        let epoll = unsafe {
            AsyncFd::register_with_interest(EpollFd(epoll), tokio::io::Interest::READABLE)
        }?;
        Ok(Arc::new(Self {
            epoll,
            parked: Mutex::default(),
        }))
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RawFd, Parked>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks an idle connection. On failure the connection comes back (to
    /// be served in its task as before).
    pub fn park(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
        permit: ConnPermit,
        idle_since: Instant,
    ) -> Result<(), Box<Woken>> {
        let stream = match stream.into_std() {
            Ok(s) => s,
            // Not registered any more, nor usable: nothing to give back.
            Err(err) => {
                tracing::debug!(client = %remote, error = %err, "could not park a connection");
                return Ok(());
            }
        };
        let fd = stream.as_raw_fd();
        let event = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT,
            fd as u64,
        );
        // In the map before the set: a wake finds what it wakes.
        let mut parked = self.lock();
        let res = self.epoll.get_ref().0.add(stream.as_fd(), event);
        match res {
            Ok(()) => {
                parked.insert(
                    fd,
                    Parked {
                        stream,
                        remote,
                        permit,
                        idle_since,
                    },
                );
                Ok(())
            }
            Err(err) => {
                drop(parked);
                tracing::debug!(client = %remote, error = %err, "could not park a connection");
                match TcpStream::from_std(stream) {
                    Ok(stream) => Err(Box::new(Woken {
                        stream,
                        remote,
                        permit,
                        idle_since,
                    })),
                    Err(_) => Ok(()),
                }
            }
        }
    }

    /// Waits until parked connections become readable and returns them
    /// (taken out of the lot, back in the runtime).
    pub async fn wake(&self, out: &mut Vec<Woken>) -> std::io::Result<()> {
        let mut events = [EpollEvent::empty(); BATCH];
        loop {
            let mut guard = self.epoll.readable().await?;
            loop {
                let n = match self.epoll.get_ref().0.wait(&mut events, EpollTimeout::ZERO) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                };
                self.take_ready(&events[..n], out);
                if n < BATCH {
                    guard.clear_ready();
                    break;
                }
            }
            if !out.is_empty() {
                return Ok(());
            }
        }
    }

    fn take_ready(&self, events: &[EpollEvent], out: &mut Vec<Woken>) {
        let mut parked = self.lock();
        for ev in events {
            let fd = ev.data() as RawFd;
            let Some(p) = parked.remove(&fd) else {
                continue;
            };
            // One-shot: disabled already; removed so that the descriptor
            // can be parked again later.
            let _ = self.epoll.get_ref().0.delete(p.stream.as_fd());
            match TcpStream::from_std(p.stream) {
                Ok(stream) => out.push(Woken {
                    stream,
                    remote: p.remote,
                    permit: p.permit,
                    idle_since: p.idle_since,
                }),
                Err(err) => {
                    tracing::debug!(client = %p.remote, error = %err, "could not resume a parked connection")
                }
            }
        }
    }

    /// Closes parked connections whose wait for a request head started
    /// `header_timeout` ago or more; returns how many.
    pub fn sweep(&self, header_timeout: Duration) -> usize {
        let now = Instant::now();
        let mut parked = self.lock();
        let before = parked.len();
        // Closing a descriptor takes it out of the epoll set too.
        parked.retain(|_, p| p.idle_since + header_timeout > now);
        let closed = before - parked.len();
        if parked.capacity() > 64 && parked.len() < parked.capacity() / 4 {
            parked.shrink_to_fit();
        }
        closed
    }

    /// Closes every parked connection (shutdown).
    pub fn close_all(&self) {
        let mut parked = self.lock();
        parked.clear();
        parked.shrink_to_fit();
    }

    /// How often [`ParkingLot::sweep`] should run.
    pub fn sweep_every() -> Duration {
        SWEEP_EVERY
    }
}

/// A client stream the server can wait on without reading from it.
pub trait Parkable: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether an idle connection over this stream can be held in the
    /// [`ParkingLot`] (a bare TCP stream; TLS state stays in its task).
    const PARKS: bool = false;

    /// Ready when bytes (or EOF) can be read.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Parkable for TcpStream {
    const PARKS: bool = true;

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl<S: Parkable> Parkable for Prefixed<S> {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.has_prefix() {
            return Poll::Ready(Ok(()));
        }
        self.get_mut().poll_readable(cx)
    }
}

impl<S: Parkable> Parkable for tokio_rustls::server::TlsStream<S> {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // rustls may hold records already read from the socket (a request
        // sent along with the handshake's last flight, or pipelined past
        // the last read): those are ready now.
        let (io, tls) = self.get_mut();
        match tls.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => {}
            // Plaintext, a close or an error: the next read says which.
            _ => return Poll::Ready(Ok(())),
        }
        io.poll_readable(cx)
    }
}
