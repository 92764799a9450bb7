//! The listening socket and its connections: serving them, refusing connections on demand, and
//! dropping every open connection when told to.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use super::{Shared, http};

/// How long to wait before trying again to listen when the address is taken.
const REBIND_RETRY: Duration = Duration::from_millis(100);

/// What the fault switches want of the sockets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Control {
    /// Whether to accept connections; when not, nothing listens and connect() is refused.
    pub listening: bool,
    /// Bumped to drop every open connection.
    pub epoch: u64,
}

/// Whether the listening socket is open, as the accept loop last left it, so that a fault switch
/// can return only once it has taken effect (a connect() right after `refuse_connections(true)`
/// must be refused, not reset by a socket about to close).
pub(crate) struct Listening {
    /// Open or not, and the last error opening it.
    state: Mutex<(bool, Option<String>)>,
    changed: Condvar,
}

impl Listening {
    pub fn new(open: bool) -> Self {
        Self {
            state: Mutex::new((open, None)),
            changed: Condvar::new(),
        }
    }

    fn set(&self, open: bool, error: Option<String>) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = (open, error);
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for the socket to be `open` (or closed); the last error opening it if
    /// that does not happen.
    pub fn wait(&self, open: bool, timeout: Duration) -> Result<(), String> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |(is_open, _)| *is_open != open)
            .unwrap_or_else(PoisonError::into_inner);
        match &*state {
            (is_open, _) if *is_open == open => Ok(()),
            (_, error) => Err(error.clone().unwrap_or_else(|| "timed out".into())),
        }
    }
}

/// Accepts and serves connections on `listener` at `addr`, forever.
///
/// Refusing connections closes the listening socket, since only a socket that is not listening
/// makes connect() fail with ECONNREFUSED; listening again binds a new one to the same address.
/// That bind happens in this thread's network namespace, which is why the server thread enters
/// the listener's namespace first (see [`foreign_netns`]).
pub(crate) async fn serve(listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    let mut listener = Some(listener);
    let mut control = shared.control.subscribe();
    loop {
        let listening = control.borrow_and_update().listening;
        if !listening && listener.is_some() {
            listener = None;
            shared.listening.set(false, None);
        } else if listening && listener.is_none() {
            match TcpListener::bind(addr).await {
                Ok(bound) => {
                    listener = Some(bound);
                    shared.listening.set(true, None);
                }
                Err(err) => {
                    tracing::warn!("fake API server: listening again on {addr}: {err}");
                    shared.listening.set(false, Some(err.to_string()));
                }
            }
        }
        match &listener {
            Some(listener) => tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => spawn_connection(stream, Arc::clone(&shared)),
                    // Such as a connection reset before it was accepted: only that one is lost.
                    Err(err) => tracing::debug!("fake API server: accept: {err}"),
                },
                changed = control.changed() => if changed.is_err() { return },
            },
            None if listening => {
                tokio::select! {
                    () = tokio::time::sleep(REBIND_RETRY) => {}
                    changed = control.changed() => if changed.is_err() { return },
                }
            }
            None => {
                if control.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Serves one connection until it ends or the epoch changes; dropping it closes the socket.
fn spawn_connection(stream: TcpStream, shared: Arc<Shared>) {
    let mut control = shared.control.subscribe();
    let epoch = control.borrow_and_update().epoch;
    tokio::spawn(async move {
        let service = service_fn(move |request| http::handle(Arc::clone(&shared), epoch, request));
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(stream), service);
        tokio::select! {
            served = connection => if let Err(err) = served {
                tracing::debug!("fake API server: connection: {err}");
            },
            _ = control.wait_for(|control| control.epoch != epoch) => {}
        }
    });
}

/// The network namespace `listener` belongs to, if it is not the calling thread's: the caller may
/// have made the listener on a thread inside a namespace (`Netns::tcp_listen`) and hand it over
/// from outside.
///
/// `None` also when the kernel will not tell (SIOCGSKNS needs CAP_NET_ADMIN): a caller without it
/// cannot have entered another namespace to make the listener.
pub(crate) fn foreign_netns(listener: &std::net::TcpListener) -> Option<OwnedFd> {
    // SAFETY: SIOCGSKNS takes no argument; it returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SIOCGSKNS) };
    if fd < 0 {
        tracing::debug!(
            "fake API server: SIOCGSKNS: {}; assuming the listener is in this namespace",
            io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let theirs = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let ours = std::fs::metadata("/proc/thread-self/ns/net").ok()?;
    let same = theirs
        .metadata()
        .is_ok_and(|m| (m.dev(), m.ino()) == (ours.dev(), ours.ino()));
    (!same).then(|| theirs.into())
}
