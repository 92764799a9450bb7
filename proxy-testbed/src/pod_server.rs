//! Traffic at pods: "echo" servers that answer with the pod's name, and the client requests that
//! read that name back, so a test learns which backend a connection reached; and HTTP servers that
//! answer with the name too, for load generators that speak HTTP (wrk).
//!
//! Servers are threads in the test process, not child processes: a socket belongs to the namespace
//! it was created in, so a socket bound inside the pod's namespace serves there from any thread.

use std::convert::Infallible;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
    sockopt,
};

use crate::topology::Pod;

/// How long a server thread sleeps in poll/read before it looks at its stop flag: the bound on how
/// long a testbed's drop waits for its servers.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// Connection threads only echo, so they need little stack; this lets a benchmark hold thousands.
const CONNECTION_STACK: usize = 128 * 1024;

/// What a UDP request sends: the server answers any datagram, so only its arrival matters.
const UDP_PROBE: &[u8] = b"ping\n";

impl Pod {
    /// Starts echo servers on `0.0.0.0` in this pod's namespace; they run until the testbed drops.
    ///
    /// TCP: on accept, writes `"<pod name>\n"`, then echoes every byte back until the client closes.
    /// UDP: answers every datagram with `"<pod name>\n"`. All sockets are bound before this returns
    /// (an error such as a port in use comes back here), so a request right after it succeeds.
    pub fn serve(&self, tcp_ports: &[u16], udp_ports: &[u16]) -> Result<()> {
        let any = |port| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
        let (listeners, sockets) = self
            .netns
            .run(|| -> io::Result<_> {
                let listeners = tcp_ports
                    .iter()
                    .map(|&port| TcpListener::bind(any(port)))
                    .collect::<io::Result<Vec<_>>>()?;
                let sockets = udp_ports
                    .iter()
                    .map(|&port| UdpSocket::bind(any(port)))
                    .collect::<io::Result<Vec<_>>>()?;
                Ok((listeners, sockets))
            })
            .with_context(|| format!("binding servers in pod {}", self.name))?;

        let greeting: Arc<[u8]> = format!("{}\n", self.name).into_bytes().into();
        let mut server = Server {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        let start = || -> io::Result<()> {
            for listener in listeners {
                let (stop, greeting) = (Arc::clone(&server.stop), Arc::clone(&greeting));
                server.threads.push(
                    std::thread::Builder::new()
                        .name(format!("tcp-{}", self.name))
                        .spawn(move || serve_tcp(listener, &greeting, &stop))?,
                );
            }
            for socket in sockets {
                let (stop, greeting) = (Arc::clone(&server.stop), Arc::clone(&greeting));
                server.threads.push(
                    std::thread::Builder::new()
                        .name(format!("udp-{}", self.name))
                        .spawn(move || serve_udp(socket, &greeting, &stop))?,
                );
            }
            Ok(())
        };
        if let Err(err) = start() {
            // The threads that did start must not outlive this call.
            stop_all(vec![server]);
            return Err(err).with_context(|| format!("starting servers in pod {}", self.name));
        }
        self.servers
            .add(server)
            .with_context(|| format!("serving in pod {}", self.name))
    }

    /// Starts an HTTP/1.1 server on `0.0.0.0:<port>` in this pod's namespace; it runs until the
    /// testbed drops.
    ///
    /// Every request, whatever its method and path, gets `200 OK` with the pod's name as the body
    /// (no newline). Connections are kept alive unless the request says `Connection: close` (or is
    /// HTTP/1.0 without keep-alive). The socket is bound before this returns, with the kernel's
    /// largest accept queue, so that a load generator opening thousands of connections at once is
    /// not dropped at the door.
    ///
    /// One thread serves every connection of this server: a single-threaded tokio runtime with
    /// hyper, the way one event-driven worker (nginx's, envoy's) serves a pod, so a pod costs one
    /// thread whatever its load and a benchmark with several pods spreads over the cores.
    pub fn serve_http(&self, port: u16) -> Result<()> {
        let listener = self
            .netns
            .run(|| listen_with_full_backlog(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))
            .with_context(|| {
                format!("binding an HTTP server to port {port} in pod {}", self.name)
            })?;
        let body = Bytes::from(self.name.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("http-{}", self.name))
            .spawn({
                let stop = Arc::clone(&stop);
                move || serve_http(listener, &body, &stop)
            })
            .with_context(|| format!("starting an HTTP server in pod {}", self.name))?;
        self.servers
            .add(Server {
                stop,
                threads: vec![thread],
            })
            .with_context(|| format!("serving HTTP in pod {}", self.name))
    }

    /// Connects over TCP from this pod, reads the first line (the serving pod's name) and returns it
    /// trimmed. `timeout` bounds connect and read together.
    ///
    /// The error keeps the `io::Error`, so [`io_error_kind`] tells `ConnectionRefused` (an RST: no
    /// listener, or a proxy rejecting) from `TimedOut` (packets dropped).
    pub fn tcp_request(&self, to: SocketAddrV4, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let stream = self
            .netns
            .tcp_connect(to, timeout)
            .with_context(|| format!("TCP connect from {} to {to}", self.name))?;
        read_first_line(stream, deadline)
            .with_context(|| format!("TCP reply from {to} to {}", self.name))
    }

    /// Sends one UDP datagram from this pod and returns the reply trimmed (the serving pod's name).
    ///
    /// The socket is connected, so an ICMP port unreachable comes back as `ConnectionRefused`; no
    /// reply within `timeout` is `TimedOut`.
    pub fn udp_request(&self, to: SocketAddrV4, timeout: Duration) -> Result<String> {
        let socket = self
            .netns
            .udp_bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
            .with_context(|| format!("UDP socket in {}", self.name))?;
        let reply = (|| {
            socket.connect(to)?;
            socket.set_read_timeout(Some(timeout))?;
            socket.send(UDP_PROBE)?;
            let mut buf = [0u8; 512];
            let len = socket.recv(&mut buf).map_err(timed_out_as_such)?;
            Ok::<_, io::Error>(String::from_utf8_lossy(&buf[..len]).trim().to_owned())
        })();
        reply.with_context(|| format!("UDP request from {} to {to}", self.name))
    }
}

/// The `io::ErrorKind` behind an error from [`Pod::tcp_request`] or [`Pod::udp_request`] (or any
/// error with an `io::Error` in its chain).
pub fn io_error_kind(err: &anyhow::Error) -> Option<io::ErrorKind> {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<io::Error>())
        .map(io::Error::kind)
}

fn read_first_line(stream: TcpStream, deadline: Instant) -> io::Result<String> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    // std refuses a zero read timeout (the socket API would read it as "block forever").
    stream.set_read_timeout(Some(remaining.max(Duration::from_millis(1))))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(timed_out_as_such)?;
    if !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed after {line:?}, before a full line"),
        ));
    }
    Ok(line.trim().to_owned())
}

/// A socket read timeout surfaces as `WouldBlock` (EAGAIN) on Linux; callers ask for `TimedOut`.
fn timed_out_as_such(err: io::Error) -> io::Error {
    if err.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "no reply before the timeout")
    } else {
        err
    }
}

/// Waits until `fd` is readable or `STOP_CHECK` passes; false once `stop` is set.
fn readable_unless_stopped(fd: impl AsFd, stop: &AtomicBool) -> bool {
    let timeout = u16::try_from(STOP_CHECK.as_millis()).unwrap_or(u16::MAX);
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => return true,
            Err(err) => {
                tracing::warn!("poll on a pod server socket: {err}");
                return false;
            }
        }
    }
}

fn serve_tcp(listener: TcpListener, greeting: &Arc<[u8]>, stop: &Arc<AtomicBool>) {
    // Non-blocking so that a connection that was reset between poll and accept cannot block the
    // loop past a stop.
    if let Err(err) = listener.set_nonblocking(true) {
        tracing::warn!("TCP pod server: {err}");
        return;
    }
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while readable_unless_stopped(&listener, stop) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => {
                // EMFILE and the like: the listener stays readable, so without a pause this loop
                // would spin and flood the log.
                tracing::warn!("TCP pod server accept: {err}");
                std::thread::sleep(STOP_CHECK);
                continue;
            }
        };
        // Finished connections leave the list, so a long benchmark does not grow it without end.
        connections.retain(|connection| !connection.is_finished());
        let (greeting, stop) = (Arc::clone(greeting), Arc::clone(stop));
        let spawned = std::thread::Builder::new()
            .name("tcp-conn".into())
            .stack_size(CONNECTION_STACK)
            .spawn(move || {
                if let Err(err) = echo(stream, &greeting, &stop) {
                    tracing::debug!("TCP pod server connection: {err}");
                }
            });
        match spawned {
            Ok(connection) => connections.push(connection),
            Err(err) => tracing::warn!("TCP pod server: no thread for a connection: {err}"),
        }
    }
    for connection in connections {
        // Connection threads do not panic; a join error would only repeat a panic message.
        let _ = connection.join();
    }
}

fn echo(mut stream: TcpStream, greeting: &[u8], stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(STOP_CHECK))?;
    stream.set_write_timeout(Some(STOP_CHECK))?;
    write_unless_stopped(&mut stream, greeting, stop)?;
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(len) => write_unless_stopped(&mut stream, &buf[..len], stop)?,
            Err(err) if is_timeout(&err) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// A socket timeout (`WouldBlock` on Linux, `TimedOut` elsewhere) or a signal: try again.
fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Writes all of `data`, waiting as long as the peer reads slowly, but not past a stop: a peer
/// that stops reading must not keep the server (and the testbed's drop, which joins it) blocked.
fn write_unless_stopped(
    stream: &mut TcpStream,
    mut data: &[u8],
    stop: &AtomicBool,
) -> io::Result<()> {
    while !data.is_empty() {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the server stopped",
            ));
        }
        match stream.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => data = &data[written..],
            Err(err) if is_timeout(&err) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn serve_udp(socket: UdpSocket, greeting: &Arc<[u8]>, stop: &Arc<AtomicBool>) {
    if let Err(err) = socket.set_nonblocking(true) {
        tracing::warn!("UDP pod server: {err}");
        return;
    }
    let mut buf = [0u8; 64 * 1024];
    while readable_unless_stopped(&socket, stop) {
        match socket.recv_from(&mut buf) {
            Ok((_, from)) => {
                if let Err(err) = socket.send_to(greeting, from) {
                    tracing::debug!("UDP pod server reply to {from}: {err}");
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => tracing::debug!("UDP pod server: {err}"),
        }
    }
}

/// A listening TCP socket like `TcpListener::bind` makes (`SO_REUSEADDR`, close-on-exec), but with
/// the largest accept queue the kernel allows (`net.core.somaxconn`) instead of std's 128.
fn listen_with_full_backlog(addr: SocketAddrV4) -> io::Result<TcpListener> {
    let socket = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&socket, sockopt::ReuseAddr, &true)?;
    bind(socket.as_raw_fd(), &SockaddrIn::from(addr))?;
    // -1 is read as "as many as net.core.somaxconn allows".
    listen(&socket, Backlog::MAXALLOWABLE)?;
    Ok(TcpListener::from(socket))
}

fn serve_http(listener: TcpListener, body: &Bytes, stop: &AtomicBool) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::warn!("HTTP pod server: no runtime: {err}");
            return;
        }
    };
    runtime.block_on(accept_http(listener, body, stop));
    // Dropping the runtime drops the connection tasks, which closes their sockets.
}

async fn accept_http(listener: TcpListener, body: &Bytes, stop: &AtomicBool) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!("HTTP pod server: {err}");
            return;
        }
    };
    let mut stop_check = tokio::time::interval(STOP_CHECK);
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_http_connection(stream, body.clone()));
                }
                Err(err) => {
                    tracing::warn!("HTTP pod server accept: {err}");
                    // Out of descriptors or memory: the listener stays readable, so without a
                    // pause this loop would spin and flood the log. Other errors concern one
                    // connection only, and pausing would stall a benchmark.
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) {
                        tokio::time::sleep(STOP_CHECK).await;
                    }
                }
            },
            _ = stop_check.tick() => {}
        }
    }
}

async fn serve_http_connection(stream: tokio::net::TcpStream, body: Bytes) {
    // Responses are small writes: with Nagle's algorithm one written while the previous is still
    // unacknowledged (a pipelining client) would wait for that ACK, up to the peer's delayed ACK.
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!("HTTP pod server: TCP_NODELAY: {err}");
    }
    let service = service_fn(move |_request| {
        let body = body.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
    });
    let served = http1::Builder::new()
        // hyper's header read timeout (30 s by default) needs a timer; it closes connections that
        // never send a full request.
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = served {
        tracing::debug!("HTTP pod server connection: {err}");
    }
}

/// The threads started by one `Pod::serve` or `Pod::serve_http` call.
struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// The servers of one testbed.
#[derive(Default)]
pub(crate) struct ServerSet {
    state: Mutex<ServerState>,
}

#[derive(Default)]
struct ServerState {
    /// Set by the testbed's drop: servers started afterwards would never be stopped.
    closed: bool,
    servers: Vec<Server>,
}

impl std::fmt::Debug for ServerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSet").finish_non_exhaustive()
    }
}

impl ServerSet {
    /// Takes ownership of a running server; stops it at once if the testbed is gone.
    fn add(&self, server: Server) -> Result<()> {
        let mut state = self.lock();
        if state.closed {
            drop(state);
            stop_all(vec![server]);
            bail!("the testbed has been dropped");
        }
        state.servers.push(server);
        Ok(())
    }

    /// Stops and joins every server, and refuses new ones.
    pub(crate) fn shutdown(&self) {
        let servers = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.servers)
        };
        stop_all(servers);
    }

    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Flags every server before joining any, so they wind down in parallel.
fn stop_all(servers: Vec<Server>) {
    for server in &servers {
        server.stop.store(true, Ordering::Relaxed);
    }
    for thread in servers.into_iter().flat_map(|server| server.threads) {
        if thread.join().is_err() {
            tracing::warn!("a pod server thread panicked");
        }
    }
}
