//! HTTP/1.1 served inline: the connection's own task reads a request, calls the service and
//! writes its answer, with no body channel, no per-request read buffer and one write per answer
//! that is ready at once. It is the server-side twin of [`crate::upstream`], and exists for the
//! same reason: hyper's general dispatcher was the largest block of the node's per-request work.
//!
//! It serves only what [`wire::RequestParser`] takes (a plain HTTP/1.1 request framed by one
//! `content-length`). At the first request it does not take, the connection is handed to hyper
//! with every byte read so far ([`Rewind`]), and hyper serves it from then on: hyper decides
//! every doubtful case, and the inline code never has to. A body that did not come whole with
//! its head is handed to the service as the service reads it ([`Streamed`]): nothing beyond
//! the read buffer is taken from the socket before the service asks, so its admission and its
//! body deadline come first, as with hyper.
//!
//! The connection's limits are the server's: a request head must arrive within
//! `header_read_timeout` of accept or of its first byte, an idle keep-alive
//! connection is closed after `idle_timeout`, and at shutdown an idle connection closes at once
//! and a busy one after its answer, which says `connection: close`. As with hyper, a client
//! that closes the connection while its request is served cancels it (the service's future and
//! the answer's body are dropped).

pub mod wire;

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::serve::{App, ServerLimits};
use wire::{Framing, Parse, RequestHead, RequestParser};

/// Data frames up to this size are copied into the answer's write buffer (with their chunk
/// framing); larger ones are written from their own buffer.
const COPY_MAX: usize = 16 * 1024;
/// Answer bytes gathered before they are written.
const WRITE_HIGH: usize = 64 * 1024;

/// How an inline connection ended.
pub(crate) enum Ended<I> {
    Closed,
    /// hyper serves the rest of the connection, from these bytes on.
    Hyper(Rewind<I>),
}

/// Serves `io` inline until it closes or meets a request for hyper.
pub(crate) async fn serve<I, A>(
    io: I,
    app: A,
    limits: &ServerLimits,
    stop: watch::Receiver<bool>,
) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
    A: App,
{
    let max_buf = limits.max_header_bytes.max(8192);
    let accepted = Instant::now();
    let mut stopping = stop.clone();
    let conn = Conn {
        io,
        app,
        limits,
        max_buf,
        buf: BytesMut::with_capacity(max_buf),
        out: Vec::new(),
        parser: RequestParser::new(max_buf, limits.max_headers),
        timer: Box::pin(tokio::time::sleep_until(accepted + limits.header_read_timeout)),
        stopping: Box::pin(async move {
            // A dropped sender is the server gone: stop too.
            while !*stopping.borrow_and_update() {
                if stopping.changed().await.is_err() {
                    return;
                }
            }
        }),
        stop,
    };
    conn.run(accepted).await
}

struct Conn<'l, I, A> {
    io: I,
    app: A,
    limits: &'l ServerLimits,
    max_buf: usize,
    /// What has been read and not yet parsed. Requests are split off its front, and once their
    /// bytes are dropped the same allocation is used again.
    buf: BytesMut,
    /// The answer being written.
    out: Vec<u8>,
    parser: RequestParser,
    /// The connection's one timer. It is moved earlier when a deadline needs it, and later only
    /// when it fires early, so a request costs it nothing.
    timer: Pin<Box<Sleep>>,
    /// Resolves when the server stops; polled only while the connection is idle.
    stopping: Pin<Box<dyn Future<Output = ()> + Send>>,
    stop: watch::Receiver<bool>,
}

/// What waiting for bytes ended with.
enum Wait {
    Bytes,
    Deadline,
    /// End of stream, a read error, or the server stopping.
    Closed,
}

enum Next {
    KeepAlive,
    Close,
}

impl<I, A> Conn<'_, I, A>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
    A: App,
{
    async fn run(mut self, accepted: Instant) -> Ended<I> {
        // The first head must arrive within the header timeout of accept, its first byte too.
        let mut head_deadline = Some(accepted + self.limits.header_read_timeout);
        let mut idle_since = accepted;
        let mut need = 1;
        loop {
            if self.buf.len() >= need {
                match self.parser.parse(&mut self.buf) {
                    Parse::Request(head) => {
                        need = 1;
                        match self.serve_one(head).await {
                            Next::KeepAlive => {
                                head_deadline = None;
                                idle_since = Instant::now();
                                continue;
                            }
                            Next::Close => return Ended::Closed,
                        }
                    }
                    Parse::Hyper => return self.hand_over(),
                    Parse::BadTarget => {
                        self.limits.counters.malformed_head.fetch_add(1, Ordering::Relaxed);
                        let _ = self.io.write_all(BAD_REQUEST).await;
                        return Ended::Closed;
                    }
                    Parse::Partial { need: n } => {
                        need = n;
                        if head_deadline.is_none() {
                            head_deadline = Some(Instant::now() + self.limits.header_read_timeout);
                        }
                    }
                }
            }
            let idle = head_deadline.is_none();
            let deadline = head_deadline.unwrap_or(idle_since + self.limits.idle_timeout);
            match self.wait(deadline, idle).await {
                Wait::Bytes => {}
                Wait::Closed => return Ended::Closed,
                Wait::Deadline => {
                    if !idle {
                        tracing::debug!(
                            "request head not received in time; closing the connection"
                        );
                        self.limits.counters.head_timeout.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ended::Closed;
                }
            }
        }
    }

    fn hand_over(self) -> Ended<I> {
        Ended::Hyper(Rewind { prefix: self.buf.freeze(), inner: self.io })
    }

    /// Waits for more bytes until `deadline` (and, when `idle`, until the server stops).
    async fn wait(&mut self, deadline: Instant, idle: bool) -> Wait {
        let Conn { io, buf, timer, stopping, max_buf, .. } = self;
        poll_fn(|cx| {
            if idle && stopping.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wait::Closed);
            }
            match read_some(io, buf, *max_buf, cx) {
                Poll::Ready(true) => return Poll::Ready(Wait::Bytes),
                Poll::Ready(false) => return Poll::Ready(Wait::Closed),
                Poll::Pending => {}
            }
            poll_deadline(timer, deadline, cx).map(|()| Wait::Deadline)
        })
        .await
    }

    async fn serve_one(&mut self, mut head: RequestHead) -> Next {
        let asked_close = head.close;
        let first = std::mem::take(&mut head.body);
        let (body, mut feed) = if head.body_rest == 0 {
            (axum::body::Body::from(first), None)
        } else {
            let (body, feed) = streamed(first, head.body_rest);
            (axum::body::Body::new(body), Some(feed))
        };
        let answer = self.app.call(head.into_request(body));
        tokio::pin!(answer);
        let answer = {
            let Conn { io, buf, max_buf, .. } = self;
            poll_fn(|cx| {
                loop {
                    if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                    // The service waits for body bytes the buffer holds: hand them over.
                    if let Some(f) = feed.as_mut()
                        && f.rest > 0
                        && !buf.is_empty()
                        && f.wanted(cx)
                    {
                        let n = buf.len().min(usize::try_from(f.rest).unwrap_or(usize::MAX));
                        f.push(buf.split_to(n).freeze());
                        continue;
                    }
                    let before = buf.len();
                    if client_gone(io, buf, *max_buf, cx) {
                        return Poll::Ready(None);
                    }
                    if buf.len() == before || feed.as_ref().is_none_or(|f| f.rest == 0) {
                        return Poll::Pending;
                    }
                }
            })
            .await
        };
        let res = match answer {
            Some(Ok(res)) => res,
            Some(Err(never)) => match never {},
            // The client went away: its request is cancelled.
            None => return Next::Close,
        };
        // A body the service did not read to its end leaves the connection where the next
        // request cannot be found: it closes after this answer (and the body, if still held,
        // ends with an error).
        let unread = feed.take().is_some_and(|f| f.rest > 0);
        let (parts, body) = res.into_parts();
        let framing = Framing::of(parts.status, &body.size_hint());
        let closing = asked_close || unread || self.stop.has_changed().unwrap_or(true);
        self.out.clear();
        let close = wire::response_head(
            &mut self.out,
            parts.status,
            &parts.headers,
            framing,
            &date(),
            closing,
        );
        drop(parts);
        if !self.send_body(body, framing).await {
            return Next::Close;
        }
        if close {
            let _ = self.io.shutdown().await;
            return Next::Close;
        }
        Next::KeepAlive
    }

    /// Writes the head in `out` and the body after it, framed. `false`: the connection cannot
    /// carry another request (a write failed, the body failed or broke its length, the client
    /// left).
    async fn send_body(&mut self, mut body: axum::body::Body, framing: Framing) -> bool {
        let mut sent = Sent { framing, bytes: 0, big: None };
        let mut ended = framing == Framing::None;
        loop {
            if !ended {
                let Conn { io, buf, out, max_buf, .. } = self;
                match poll_fn(|cx| gather(&mut body, &mut sent, out, cx, io, buf, *max_buf)).await {
                    Gathered::More => {}
                    Gathered::End => ended = true,
                    Gathered::Failed => return false,
                }
            }
            if !self.out.is_empty() {
                if self.io.write_all(&self.out).await.is_err() {
                    return false;
                }
                self.out.clear();
            }
            if let Some(big) = sent.big.take() {
                if self.io.write_all(&big).await.is_err() {
                    return false;
                }
                if framing == Framing::Chunked {
                    self.out.extend_from_slice(wire::CHUNK_END);
                }
                continue;
            }
            if ended {
                break;
            }
        }
        self.io.flush().await.is_ok()
    }
}

/// An answer's body on its way out.
struct Sent {
    framing: Framing,
    /// Data bytes taken from the body.
    bytes: u64,
    /// A data frame too large to copy, to be written after what `out` holds.
    big: Option<Bytes>,
}

enum Gathered {
    /// Something to write.
    More,
    /// The body ended; `out` holds the rest of the answer.
    End,
    Failed,
}

/// Moves what the body has ready into `out`, framed; waits only when nothing is ready (and then
/// watches the client).
fn gather<I: AsyncRead + Unpin>(
    body: &mut axum::body::Body,
    sent: &mut Sent,
    out: &mut Vec<u8>,
    cx: &mut Context<'_>,
    io: &mut I,
    buf: &mut BytesMut,
    max_buf: usize,
) -> Poll<Gathered> {
    let chunked = sent.framing == Framing::Chunked;
    loop {
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers are not sent (hyper sends them only to a client that asked).
                let Ok(data) = frame.into_data() else { continue };
                if data.is_empty() {
                    continue;
                }
                sent.bytes += data.len() as u64;
                if let Framing::Length(n) = sent.framing
                    && sent.bytes > n
                {
                    tracing::debug!("an answer's body is longer than its length; closing");
                    return Poll::Ready(Gathered::Failed);
                }
                if chunked {
                    wire::chunk_start(out, data.len());
                }
                if data.len() > COPY_MAX {
                    sent.big = Some(data);
                    return Poll::Ready(Gathered::More);
                }
                out.extend_from_slice(&data);
                if chunked {
                    out.extend_from_slice(wire::CHUNK_END);
                }
                if out.len() >= WRITE_HIGH {
                    return Poll::Ready(Gathered::More);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "an answer's body failed; closing");
                return Poll::Ready(Gathered::Failed);
            }
            Poll::Ready(None) => {
                if let Framing::Length(n) = sent.framing
                    && sent.bytes != n
                {
                    tracing::debug!("an answer's body is shorter than its length; closing");
                    return Poll::Ready(Gathered::Failed);
                }
                if chunked {
                    out.extend_from_slice(wire::LAST_CHUNK);
                }
                return Poll::Ready(Gathered::End);
            }
            Poll::Pending => {
                if !out.is_empty() {
                    return Poll::Ready(Gathered::More);
                }
                if client_gone(io, buf, max_buf, cx) {
                    return Poll::Ready(Gathered::Failed);
                }
                return Poll::Pending;
            }
        }
    }
}

/// A request body the connection hands over as the service reads it: [`Streamed`] is the
/// service's side, [`Feed`] the connection's.
fn streamed(first: Bytes, rest: u64) -> (Streamed, Feed) {
    let flow = Arc::new(Mutex::new(Flow {
        remaining: first.len() as u64 + rest,
        chunk: (!first.is_empty()).then_some(first),
        wanted: false,
        cut: false,
        waker: None,
        driver: None,
    }));
    (Streamed { flow: Arc::clone(&flow) }, Feed { flow, rest })
}

struct Flow {
    /// Bytes not yet taken by the service (`chunk` included).
    remaining: u64,
    /// Bytes handed over and not yet taken.
    chunk: Option<Bytes>,
    /// The service waits for bytes.
    wanted: bool,
    /// The connection ended (or stopped feeding) before the body did.
    cut: bool,
    /// The service's task, waiting for bytes.
    waker: Option<Waker>,
    /// The connection's task, woken when the service comes to want bytes: a service may read
    /// its body from a task of its own.
    driver: Option<Waker>,
}

fn lock(flow: &Mutex<Flow>) -> std::sync::MutexGuard<'_, Flow> {
    flow.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The service's side of a streamed request body.
struct Streamed {
    flow: Arc<Mutex<Flow>>,
}

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let mut f = lock(&self.flow);
        if let Some(b) = f.chunk.take() {
            f.remaining -= b.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if f.remaining == 0 {
            return Poll::Ready(None);
        }
        if f.cut {
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection ended before the request body",
            ))));
        }
        f.wanted = true;
        if !f.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            f.waker = Some(cx.waker().clone());
        }
        if let Some(d) = f.driver.take()
            && !d.will_wake(cx.waker())
        {
            d.wake();
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.flow).remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(lock(&self.flow).remaining)
    }
}

/// The connection's side of a streamed request body.
struct Feed {
    flow: Arc<Mutex<Flow>>,
    /// Body bytes still on the socket.
    rest: u64,
}

impl Feed {
    /// The service waits for bytes and has none; if not, the connection's task is woken when
    /// it comes to.
    fn wanted(&self, cx: &Context<'_>) -> bool {
        let mut f = lock(&self.flow);
        if f.wanted && f.chunk.is_none() {
            return true;
        }
        if !f.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            f.driver = Some(cx.waker().clone());
        }
        false
    }

    fn push(&mut self, bytes: Bytes) {
        self.rest -= bytes.len() as u64;
        let mut f = lock(&self.flow);
        f.wanted = false;
        f.chunk = Some(match f.chunk.take() {
            None => bytes,
            Some(held) => {
                let mut joined = BytesMut::with_capacity(held.len() + bytes.len());
                joined.extend_from_slice(&held);
                joined.extend_from_slice(&bytes);
                joined.freeze()
            }
        });
        if let Some(w) = f.waker.take() {
            w.wake();
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        if self.rest > 0 {
            let mut f = lock(&self.flow);
            f.cut = true;
            if let Some(w) = f.waker.take() {
                w.wake();
            }
        }
    }
}

/// Reads what the socket has into `buf` (up to `max_buf` bytes in all): `Ready(true)` when
/// bytes came, `Ready(false)` at the end of the stream or on an error.
fn read_some<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    max_buf: usize,
    cx: &mut Context<'_>,
) -> Poll<bool> {
    // Reclaims the allocation once the requests split off it are dropped.
    buf.reserve(max_buf.saturating_sub(buf.len()));
    match tokio_util::io::poll_read_buf(Pin::new(io), cx, buf) {
        Poll::Ready(Ok(n)) => Poll::Ready(n > 0),
        Poll::Ready(Err(_)) => Poll::Ready(false),
        Poll::Pending => Poll::Pending,
    }
}

/// While a request is served: whether the client has closed the connection. Bytes it sends
/// meanwhile (a pipelined request) are kept, up to the buffer's size.
fn client_gone<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    max_buf: usize,
    cx: &mut Context<'_>,
) -> bool {
    while buf.len() < max_buf {
        match read_some(io, buf, max_buf, cx) {
            Poll::Ready(true) => {}
            Poll::Ready(false) => return true,
            Poll::Pending => return false,
        }
    }
    false
}

/// `Ready` once `deadline` has passed. The timer is moved only when it would fire late, or
/// when it fired before `deadline`.
fn poll_deadline(timer: &mut Pin<Box<Sleep>>, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        std::task::ready!(timer.as_mut().poll(cx));
        if timer.deadline() >= deadline {
            return Poll::Ready(());
        }
        timer.as_mut().reset(deadline);
    }
}

const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// The `date` header's value, formatted once a second per thread (as hyper does). It reads the
/// system clock itself, as hyper's own did: the header is the transport's, not a decision.
#[allow(clippy::disallowed_methods)]
fn date() -> [u8; 29] {
    thread_local! {
        static CACHE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let (at, cached) = c.get();
        if at == secs {
            return cached;
        }
        let mut d = [b' '; 29];
        let mut w = &mut d[..];
        let _ =
            std::io::Write::write_fmt(&mut w, format_args!("{}", httpdate::HttpDate::from(now)));
        c.set((secs, d));
        d
    })
}

/// A connection handed to hyper: the bytes already read come first.
pub(crate) struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_date_is_an_imf_fixdate() {
        let d = date();
        let s = std::str::from_utf8(&d).unwrap();
        assert!(s.ends_with(" GMT"), "{s}");
        assert!(httpdate::parse_http_date(s).is_ok(), "{s}");
    }
}
