//! The accept loop and per-connection driver.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::Service;

use crate::Listener;

/// Every limit of the transport, explicit. Defaults suit an internet-facing node.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// A client must finish sending a request head within this time (slowloris defence),
    /// counted from accept for the first request (a connection that sends nothing is closed
    /// too) and, on HTTP/1.1, from the first byte of each later one. It never runs between
    /// requests: an idle keep-alive connection lives for `idle_timeout`.
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// TLS handshakes must complete within this time.
    pub tls_handshake_timeout: Duration,
    /// Open connections beyond this wait in the kernel's backlog (accept pauses).
    pub max_connections: usize,
    /// Open connections from one source address (as the listener reports it); more are
    /// closed at accept, so one host cannot hold every connection. `0`: no cap.
    pub max_connections_per_source: usize,
    /// Largest request head (HTTP/1.1 read buffer; HTTP/2 header list), bytes. At least 8 KiB.
    pub max_header_bytes: usize,
    /// Most headers in one HTTP/1.1 request.
    pub max_headers: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 flow-control windows, bytes: per stream and per connection.
    pub http2_stream_window_bytes: u32,
    pub http2_connection_window_bytes: u32,
    /// After shutdown starts, in-flight responses get this long to finish.
    pub shutdown_grace: Duration,
    /// Serve plain HTTP/1.1 requests on the inline path ([`crate::h1`]); hyper serves a
    /// connection from its first request that path does not take (and every HTTP/2 one).
    /// `false`: hyper serves every connection.
    pub http1_inline: bool,
    /// Where the transport counts what it refuses before any route runs (shared with the
    /// server's metrics).
    pub counters: Arc<EdgeCounters>,
}

/// Requests and connections the transport refuses before any route runs, by reason: a head
/// over `max_header_bytes` (hyper answers 431), a malformed head (hyper answers 400), a head
/// not received in time (closed), a source over its connection cap (closed at accept).
#[derive(Debug, Default)]
pub struct EdgeCounters {
    pub head_too_large: AtomicU64,
    pub malformed_head: AtomicU64,
    pub head_timeout: AtomicU64,
    pub source_cap: AtomicU64,
}

impl EdgeCounters {
    /// (reason, count) for each reason, as metrics label them.
    pub fn snapshot(&self) -> [(&'static str, u64); 4] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("head_too_large", get(&self.head_too_large)),
            ("malformed_head", get(&self.malformed_head)),
            ("head_timeout", get(&self.head_timeout)),
            ("source_cap", get(&self.source_cap)),
        ]
    }

    fn connection_error(&self, e: &(dyn std::error::Error + 'static)) {
        let Some(h) = e.downcast_ref::<hyper::Error>() else { return };
        if h.is_parse_too_large() {
            self.head_too_large.fetch_add(1, Ordering::Relaxed);
        } else if h.is_parse() {
            self.malformed_head.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_connections_per_source: 512,
            max_header_bytes: 16 * 1024,
            max_headers: HYPER_MAX_HEADERS,
            http2_max_concurrent_streams: 100,
            http2_stream_window_bytes: 65_536,
            http2_connection_window_bytes: 1024 * 1024,
            http1_inline: true,
            counters: Arc::default(),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// What [`serve`] serves: an axum [`axum::Router`], or a service of the caller's own that
/// answers some requests itself before handing the rest to one (the node's inference routes).
/// It must always be ready, as a `Router` is: `call` is made without `poll_ready`.
pub trait App:
    Service<
        Request<axum::body::Body>,
        Response = Response<axum::body::Body>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> App for S where
    S: Service<
            Request<axum::body::Body>,
            Response = Response<axum::body::Body>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves `app` on connections from `listener` until `shutdown` resolves, then stops
/// accepting, asks every connection to finish gracefully, and waits up to
/// `limits.shutdown_grace` before cutting what remains.
pub async fn serve<L: Listener, A: App>(
    mut listener: L,
    app: A,
    limits: ServerLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let limits = Arc::new(limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let sources = Sources::new(limits.max_connections_per_source);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut accept_backoff = Duration::from_millis(5);
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (io, addr) = match accepted {
            Ok(x) => {
                accept_backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                // Out of file descriptors: back off instead of spinning or exiting.
                if matches!(e.raw_os_error(), Some(23) | Some(24)) {
                    tracing::warn!(error = %e, backoff_ms = accept_backoff.as_millis() as u64, "accept failed; backing off");
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                } else {
                    tracing::debug!(error = %e, "accept error");
                }
                continue;
            }
        };
        let Some(source) = sources.enter(L::source(&addr)) else {
            tracing::debug!(?addr, "too many connections from this source; closing");
            limits.counters.source_cap.fetch_add(1, Ordering::Relaxed);
            drop(io);
            continue;
        };
        let app = app.clone();
        let limits = limits.clone();
        let tls = tls.clone();
        let stop = stop_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let _source = source;
            match tls {
                None => serve_io(io, app, &limits, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(io))
                        .await
                    {
                        Ok(Ok(tls_io)) if tls_io.get_ref().1.alpn_protocol() == Some(b"h2") => {
                            serve_connection(tls_io, app, &limits, stop).await
                        }
                        Ok(Ok(tls_io)) => serve_io(tls_io, app, &limits, stop).await,
                        Ok(Err(e)) => tracing::debug!(?addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(?addr, "TLS handshake timed out"),
                    }
                }
            }
        });
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let grace = tokio::time::sleep(limits.shutdown_grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = conns.join_next() => if next.is_none() { break },
            () = &mut grace => {
                tracing::warn!(remaining = conns.len(), "shutdown grace expired; closing connections");
                conns.abort_all();
                while conns.join_next().await.is_some() {}
                break;
            }
        }
    }
}

/// What the connection's watchdogs read: how many requests it has in flight and when that last
/// changed (the idle watchdog), and the request-head deadline.
///
/// The head deadline replaces hyper's `header_read_timeout`, which starts as soon as an
/// HTTP/1.1 connection goes idle and so closes keep-alive connections after a few seconds, and
/// which does not cover hyper-util's read of the protocol preface at all. Ours is armed at
/// accept (the first request head, HTTP/1 or the HTTP/2 preface and first request, must arrive
/// in time) and, on HTTP/1, by the first byte of each later request read while the connection
/// is idle; it is disarmed when a request head has been parsed (the service is called). An idle
/// keep-alive connection is then governed by the idle watchdog alone (as is the rare head whose
/// first bytes were pipelined behind a request still in flight: they arm nothing).
struct Activity {
    origin: Instant,
    active: AtomicUsize,
    last_ms: AtomicU64,
    /// When the head deadline was armed, nanoseconds since `origin` plus one; 0 = disarmed.
    head_armed: AtomicU64,
    /// Wakes the head watchdog when the deadline is armed while it waits for that.
    head_notify: Notify,
    head_waiting: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            origin: Instant::now(),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            head_armed: AtomicU64::new(0),
            head_notify: Notify::new(),
            head_waiting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        self.last_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Arms the head deadline from now, unless it is already armed. The watchdog is woken only
    /// when it waits for this; while it sleeps towards an earlier deadline it reads the new one
    /// when that sleep ends, so a request costs it no wake and no timer.
    fn arm_head(&self) {
        let at = (self.origin.elapsed().as_nanos() as u64).saturating_add(1);
        if self.head_armed.compare_exchange(0, at, Ordering::SeqCst, Ordering::Relaxed).is_ok()
            && self.head_waiting.load(Ordering::SeqCst)
        {
            self.head_notify.notify_one();
        }
    }

    fn disarm_head(&self) {
        self.head_armed.store(0, Ordering::Release);
    }
}

/// Resolves when a request head has been awaited longer than `timeout` since the deadline was
/// armed.
async fn head_watch(activity: Arc<Activity>, timeout: Duration) {
    let sleep = tokio::time::sleep(timeout);
    tokio::pin!(sleep);
    loop {
        let mut armed = activity.head_armed.load(Ordering::SeqCst);
        if armed == 0 {
            let notified = activity.head_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Either `arm_head` sees this flag and notifies, or this load sees its deadline.
            activity.head_waiting.store(true, Ordering::SeqCst);
            armed = activity.head_armed.load(Ordering::SeqCst);
            if armed == 0 {
                notified.await;
            }
            activity.head_waiting.store(false, Ordering::SeqCst);
            if armed == 0 {
                continue;
            }
        }
        let deadline = activity.origin + Duration::from_nanos(armed - 1) + timeout;
        sleep.as_mut().reset(deadline);
        sleep.as_mut().await;
        if activity.head_armed.load(Ordering::SeqCst) == armed {
            return;
        }
    }
}

/// hyper's HTTP/1.1 header count when none is set (`hyper::proto::h1::role`).
const HYPER_MAX_HEADERS: usize = 100;

/// The HTTP/2 connection preface, as hyper-util's auto builder detects it.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks, told from its first bytes as the auto builder does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    /// This many bytes of the HTTP/2 preface matched so far.
    Sniffing(usize),
    Http1,
    Http2,
}

pin_project_lite::pin_project! {
    /// The accepted stream, watched: on HTTP/1, bytes that arrive while no request is in flight
    /// are the start of a request head and arm the head deadline. HTTP/2 frames (pings,
    /// settings, window updates) arrive on idle connections too, so there only the accept-time
    /// deadline applies.
    struct HeadWatched<I> {
        #[pin]
        inner: I,
        activity: Arc<Activity>,
        proto: Proto,
    }
}

impl<I> HeadWatched<I> {
    fn new(inner: I, activity: Arc<Activity>) -> Self {
        HeadWatched { inner, activity, proto: Proto::Sniffing(0) }
    }
}

fn sniff(proto: Proto, bytes: &[u8]) -> Proto {
    match proto {
        Proto::Sniffing(n) => {
            let take = bytes.len().min(H2_PREFACE.len() - n);
            if bytes[..take] != H2_PREFACE[n..n + take] {
                Proto::Http1
            } else if n + take == H2_PREFACE.len() {
                Proto::Http2
            } else {
                Proto::Sniffing(n + take)
            }
        }
        known => known,
    }
}

impl<I: tokio::io::AsyncRead> tokio::io::AsyncRead for HeadWatched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                *this.proto = sniff(*this.proto, new);
                if *this.proto == Proto::Http1 && this.activity.active.load(Ordering::Acquire) == 0
                {
                    this.activity.arm_head();
                }
            }
        }
        res
    }
}

impl<I: tokio::io::AsyncWrite> tokio::io::AsyncWrite for HeadWatched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Open connections per source address, capped.
#[derive(Clone)]
struct Sources {
    cap: usize,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// One open connection from a source; leaving forgets the source at zero (the table holds
/// only sources with open connections, so it is bounded by `max_connections`).
struct SourceGuard {
    sources: Sources,
    ip: Option<std::net::IpAddr>,
}

impl Sources {
    fn new(cap: usize) -> Sources {
        Sources { cap, open: Arc::default() }
    }

    /// Counts a connection from `ip`; `None` when that source is at its cap.
    fn enter(&self, ip: Option<std::net::IpAddr>) -> Option<SourceGuard> {
        let ip = ip.filter(|_| self.cap > 0);
        if let Some(ip) = ip {
            let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = open.entry(ip).or_default();
            if *n >= self.cap {
                return None;
            }
            *n += 1;
        }
        Some(SourceGuard { sources: self.clone(), ip })
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut open = self.sources.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ip);
            }
        }
    }
}

/// Serves a connection inline while it sends what that path takes, then on hyper.
async fn serve_io<I, A: App>(io: I, app: A, limits: &ServerLimits, stop: watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if !limits.http1_inline {
        return serve_connection(io, app, limits, stop).await;
    }
    match crate::h1::serve(io, app.clone(), limits, stop.clone()).await {
        crate::h1::Ended::Closed => {}
        crate::h1::Ended::Hyper(io) => serve_connection(io, app, limits, stop).await,
    }
}

async fn serve_connection<I, A: App>(
    io: I,
    app: A,
    limits: &ServerLimits,
    stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    // Armed at accept: a connection that sends no request (not even a first byte) is closed.
    activity.arm_head();
    let svc = TrackedService { app, activity: activity.clone() };

    let mut builder = auto::Builder::new(TokioExecutor::new());
    let mut h1 = builder.http1();
    h1.timer(TokioTimer::new())
        // Our head deadline replaces hyper's (see `Activity`).
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    // hyper's own limit is the same count, checked in slots on the stack; naming any count
    // makes it allocate and fill that many slots for every request (~2,500 instructions).
    if limits.max_headers != HYPER_MAX_HEADERS {
        h1.max_headers(limits.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .initial_stream_window_size(limits.http2_stream_window_bytes)
        .initial_connection_window_size(limits.http2_connection_window_bytes)
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));

    let io = HeadWatched::new(io, activity.clone());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let head = head_watch(activity.clone(), limits.header_read_timeout);
    tokio::pin!(head);
    let close = close_watch(activity, limits.idle_timeout, stop);
    tokio::pin!(close);
    // Each of the three is polled only when its own waker has fired: the connection is woken
    // several times per request, and polling the two watchdogs each time (a timer and a
    // `watch` receiver) cost more than the rest of this loop together.
    let wakers = Branches::new();
    let mut closing = false;
    let end = std::future::poll_fn(|cx| {
        wakers.parent(cx.waker());
        if let Some(w) = wakers.take(Branch::Head)
            && head.as_mut().poll(&mut Context::from_waker(w)).is_ready()
        {
            return Poll::Ready(None);
        }
        if !closing
            && let Some(w) = wakers.take(Branch::Close)
            && close.as_mut().poll(&mut Context::from_waker(w)).is_ready()
        {
            closing = true;
            conn.as_mut().graceful_shutdown();
            wakers.mark(Branch::Conn);
        }
        match wakers.take(Branch::Conn) {
            Some(w) => conn.as_mut().poll(&mut Context::from_waker(w)).map(Some),
            None => Poll::Pending,
        }
    })
    .await;
    match end {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            tracing::debug!(error = %e, "connection ended with error");
            limits.counters.connection_error(e.as_ref());
        }
        None => {
            tracing::debug!("request head not received in time; closing the connection");
            limits.counters.head_timeout.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The parts of a connection's driver, each with a waker of its own.
#[derive(Clone, Copy)]
enum Branch {
    Conn = 0,
    Head = 1,
    Close = 2,
}

/// One waker per [`Branch`]: waking one marks it and wakes the task, so the driver polls only
/// the parts that asked to be polled (as `FuturesUnordered` does for its futures).
struct Branches {
    wakers: [Waker; 3],
    flags: [Arc<BranchWaker>; 3],
    task: Arc<std::sync::Mutex<Option<Waker>>>,
}

struct BranchWaker {
    woken: std::sync::atomic::AtomicBool,
    task: Arc<std::sync::Mutex<Option<Waker>>>,
}

impl std::task::Wake for BranchWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(w) = task.as_ref() {
            w.wake_by_ref();
        }
    }
}

impl Branches {
    /// Every branch starts marked: each is polled once.
    fn new() -> Branches {
        let task = Arc::new(std::sync::Mutex::new(None));
        let flags = [0, 1, 2]
            .map(|_| Arc::new(BranchWaker { woken: true.into(), task: Arc::clone(&task) }));
        let wakers = [0, 1, 2].map(|i| Waker::from(Arc::clone(&flags[i])));
        Branches { wakers, flags, task }
    }

    /// Records the task's waker, the one every branch wakes.
    fn parent(&self, waker: &Waker) {
        let mut task = self.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !task.as_ref().is_some_and(|t| t.will_wake(waker)) {
            *task = Some(waker.clone());
        }
    }

    /// The branch's waker if it was woken since it was last polled (the mark is cleared
    /// before the poll, so a wake during it is kept).
    fn take(&self, b: Branch) -> Option<&Waker> {
        let i = b as usize;
        self.flags[i].woken.swap(false, Ordering::AcqRel).then_some(&self.wakers[i])
    }

    fn mark(&self, b: Branch) {
        self.flags[b as usize].woken.store(true, Ordering::Release);
    }
}

/// Resolves when the server is stopping or the connection has been idle for `idle_timeout`:
/// either way it is asked to finish gracefully.
async fn close_watch(
    activity: Arc<Activity>,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let idle = idle_watch(activity, idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
            () = &mut idle => return,
        }
    }
}

/// Resolves once the connection has had no request in flight for `timeout`.
async fn idle_watch(activity: Arc<Activity>, timeout: Duration) {
    loop {
        let last = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
        tokio::time::sleep_until(activity.origin + last + timeout).await;
        let last_now = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
        if activity.active.load(Ordering::Relaxed) == 0 && last_now == last {
            return;
        }
        if activity.active.load(Ordering::Relaxed) > 0 {
            // Busy: look again after another full period; the end of the request touches `last`.
            tokio::time::sleep(timeout).await;
        }
    }
}

#[derive(Clone)]
struct TrackedService<A> {
    app: A,
    activity: Arc<Activity>,
}

impl<A: App> hyper::service::Service<Request<Incoming>> for TrackedService<A> {
    type Response = Response<TrackedBody>;
    type Error = std::convert::Infallible;
    type Future = Tracked<A::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // A request head has been parsed: the head deadline is met.
        self.activity.disarm_head();
        self.activity.active.fetch_add(1, Ordering::AcqRel);
        self.activity.touch();
        let guard = ActiveGuard(self.activity.clone());
        let mut app = self.app.clone();
        Tracked { inner: app.call(req.map(axum::body::Body::new)), guard: Some(guard) }
    }
}

pin_project_lite::pin_project! {
    /// The app's answer to one request, its body tracked until it ends: the app's own future
    /// type, not boxed again.
    struct Tracked<F> {
        #[pin]
        inner: F,
        guard: Option<ActiveGuard>,
    }
}

impl<F> Future for Tracked<F>
where
    F: Future<Output = Result<Response<axum::body::Body>, std::convert::Infallible>>,
{
    type Output = Result<Response<TrackedBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = match std::task::ready!(this.inner.poll(cx)) {
            Ok(res) => res,
            Err(never) => match never {},
        };
        let guard = this.guard.take();
        Poll::Ready(Ok(res.map(|inner| TrackedBody { inner, _guard: guard })))
    }
}

/// Marks the request finished when the response body is done or dropped (client gone).
struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    struct TrackedBody {
        #[pin]
        inner: axum::body::Body,
        _guard: Option<ActiveGuard>,
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves at Ctrl-C or SIGTERM: the shutdown future every edgeroute command hands [`serve`].
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// The runtime a server command runs on: one worker thread gives a single event loop (like an
/// nginx worker), 0 one thread per core, N that many.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads == 1 {
        return tokio::runtime::Builder::new_current_thread().enable_all().build();
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 1 {
        b.worker_threads(worker_threads);
    }
    b.enable_all().build()
}
