//! HTTP/1.1 requests as the inline server reads them and its answers as it writes them: plain
//! functions over byte buffers, no I/O and no clock. The fuzz target `server_request` feeds
//! [`RequestParser`] whatever a fuzzer makes.
//!
//! The parser takes only the plainest request: HTTP/1.1, a method with no special framing rule
//! (not `HEAD` or `CONNECT`), an origin-form target of ordinary characters, at most one
//! `content-length` of plain digits, no `transfer-encoding`, `expect` or `upgrade`, and a head
//! within one read buffer. The body's bytes that came with the head are the request's; the rest
//! ([`RequestHead::body_rest`]) follow on the connection. Everything else is
//! [`Parse::Hyper`]: the bytes stay in the buffer and hyper serves the connection from them, so
//! every doubtful case (smuggling attempts, chunked bodies, `100-continue`, upgrades, HTTP/1.0,
//! HTTP/2's preface, malformed or oversized heads and their 400 and 431 answers) is decided by
//! hyper, as before this path existed.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version, header};
use http_body::SizeHint;

use crate::upstream::wire::push_decimal;

/// Headers in one request the parser reads itself; a request with more goes to hyper, which
/// applies the server's own count.
pub const MAX_HEADERS: usize = 100;

/// A request taken from the buffer.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The body's bytes that were in the buffer with the head (all of it, usually).
    pub body: Bytes,
    /// Body bytes still to come on the connection, after `body`.
    pub body_rest: u64,
    /// The client asked for the connection to close after this answer.
    pub close: bool,
}

impl RequestHead {
    /// The request as a service sees it, with `body` for its body.
    pub fn into_request<B>(self, body: B) -> http::Request<B> {
        let mut req = http::Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers;
        req
    }
}

/// What [`RequestParser::parse`] made of the buffer.
#[derive(Debug)]
// Returned by value once per request: boxing the request would allocate for every one.
#[allow(clippy::large_enum_variant)]
pub enum Parse {
    /// Read on: the head is not complete, and nothing is decided until the buffer holds at
    /// least `need` bytes.
    Partial { need: usize },
    /// Not for this path: hyper serves the connection from these bytes (left in the buffer).
    Hyper,
    /// The target passed the parser's checks but not `http`'s: answer 400 and close. (The
    /// parser's own character check makes this unreachable in practice.)
    BadTarget,
    /// A request, removed from the buffer with what it holds of its body.
    Request(RequestHead),
}

/// Reads requests from a connection's buffer. It keeps a scratch list between requests so
/// that parsing allocates nothing of its own.
#[derive(Debug)]
pub struct RequestParser {
    max_buf: usize,
    max_headers: usize,
    /// (name, value start, value end) of the last head, offsets into the buffer.
    scratch: Vec<(HeaderName, usize, usize)>,
}

impl RequestParser {
    /// A parser for heads of at most `max_buf` bytes and `max_headers` headers.
    pub fn new(max_buf: usize, max_headers: usize) -> Self {
        RequestParser { max_buf, max_headers: max_headers.min(MAX_HEADERS), scratch: Vec::new() }
    }

    /// Parses the request at the start of `buf`. Only [`Parse::Request`] and
    /// [`Parse::BadTarget`] consume bytes.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Parse {
        self.scratch.clear();
        let mut slots =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let head_len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut req,
            buf,
            &mut slots[..self.max_headers],
        ) {
            Ok(httparse::Status::Complete(n)) if n <= self.max_buf => n,
            Ok(httparse::Status::Partial) if buf.len() < self.max_buf => {
                return Parse::Partial { need: buf.len() + 1 };
            }
            // Too large, too many headers, malformed: hyper answers (431 or 400) and counts.
            Ok(_) | Err(_) => return Parse::Hyper,
        };
        if req.version != Some(1) {
            return Parse::Hyper;
        }
        let method = match req.method {
            Some("GET") => Method::GET,
            Some("POST") => Method::POST,
            Some("PUT") => Method::PUT,
            Some("DELETE") => Method::DELETE,
            Some("PATCH") => Method::PATCH,
            Some("OPTIONS") => Method::OPTIONS,
            _ => return Parse::Hyper,
        };
        let Some(path) = req.path.filter(|p| plain_target(p.as_bytes())) else {
            return Parse::Hyper;
        };
        let base = buf.as_ptr().addr();
        let path_at = path.as_ptr().addr() - base;
        let path_end = path_at + path.len();
        let mut body_len: Option<u64> = None;
        let mut close = false;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length") {
                match (body_len, decimal(h.value)) {
                    (None, Some(n)) => body_len = Some(n),
                    _ => return Parse::Hyper,
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"expect")
                || name.eq_ignore_ascii_case(b"upgrade")
            {
                return Parse::Hyper;
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Parse::Hyper;
                    }
                }
            }
            let Ok(name) = HeaderName::from_bytes(name) else { return Parse::Hyper };
            let at = h.value.as_ptr().addr() - base;
            self.scratch.push((name, at, at + h.value.len()));
        }
        let body_len = body_len.unwrap_or(0);
        let here = (buf.len() - head_len).min(usize::try_from(body_len).unwrap_or(usize::MAX));
        let body_rest = body_len - here as u64;
        let mut head = buf.split_to(head_len + here).freeze();
        let body = head.split_off(head_len);
        let mut headers = HeaderMap::with_capacity(self.scratch.len());
        for (name, at, end) in self.scratch.drain(..) {
            // httparse admits only bytes a `HeaderValue` admits (tab, visible ASCII, obs-text).
            match HeaderValue::from_maybe_shared(head.slice(at..end)) {
                Ok(v) => {
                    headers.append(name, v);
                }
                Err(_) => return Parse::BadTarget,
            }
        }
        let Ok(uri) = Uri::from_maybe_shared(head.slice(path_at..path_end)) else {
            return Parse::BadTarget;
        };
        Parse::Request(RequestHead { method, uri, headers, body, body_rest, close })
    }
}

/// An origin-form target (`/path?query`) of unreserved, sub-delimiter and `:@/?%` characters:
/// what every API client sends. Anything rarer goes to hyper.
fn plain_target(t: &[u8]) -> bool {
    t.first() == Some(&b'/')
        && t.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'@'
                        | b'/'
                        | b'?'
                        | b'%'
                )
        })
}

/// A `content-length` of 1 to 19 digits and nothing else (no sign, blank or list).
fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// How an answer's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body may follow (1xx, 204, 304).
    None,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
}

impl Framing {
    /// The framing for an answer of `status` whose body has `hint`: its length when the body
    /// knows it exactly, chunked otherwise.
    pub fn of(status: StatusCode, hint: &SizeHint) -> Framing {
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::None
        } else {
            match hint.exact() {
                Some(n) => Framing::Length(n),
                None => Framing::Chunked,
            }
        }
    }
}

/// Writes an answer's head to `out`: the status line, the service's headers (less the framing
/// headers, which are this layer's), the framing, `date` unless the service set one, and
/// `connection: close` when `close`. Returns whether the connection closes after this answer
/// (`close`, or the service's own `connection: close`).
pub fn response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Framing,
    date: &[u8],
    mut close: bool,
) -> bool {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut said_close = false;
    for (name, value) in headers {
        match *name {
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING => continue,
            header::CONNECTION => {
                said_close |= value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            }
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    if close && !said_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    close |= said_close;
    out.extend_from_slice(b"\r\n");
    close
}

/// The size line that starts a chunk of `len` bytes (`len` > 0), in upper-case hex as hyper writes it.
pub fn chunk_start(out: &mut Vec<u8>, len: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789ABCDEF"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// What ends a chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";
/// The last chunk of a chunked body, with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> (Parse, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let p = RequestParser::new(16 * 1024, 100).parse(&mut buf);
        (p, buf)
    }

    fn request(bytes: &[u8]) -> RequestHead {
        match parse(bytes).0 {
            Parse::Request(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn to_hyper(bytes: &[u8]) {
        let (p, buf) = parse(bytes);
        assert!(matches!(p, Parse::Hyper), "{:?}: {p:?}", String::from_utf8_lossy(bytes));
        assert_eq!(&buf[..], bytes, "the bytes stay for hyper");
    }

    #[test]
    fn a_plain_post_is_read_with_its_body_and_leaves_what_follows() {
        let raw = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: n\r\nAuthorization: Bearer t\r\nContent-Length: 5\r\nX-Edgeroute-Session: s-1\r\n\r\nhelloGET / HTTP/1.1\r\n";
        let (p, buf) = parse(raw);
        let Parse::Request(r) = p else { panic!("{p:?}") };
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.uri.path(), "/v1/chat/completions");
        assert_eq!(r.uri.query(), Some("x=1"));
        assert_eq!(&r.body[..], b"hello");
        assert_eq!(r.headers["authorization"], "Bearer t");
        assert_eq!(r.headers["x-edgeroute-session"], "s-1");
        assert_eq!(r.headers.len(), 4);
        assert!(!r.close);
        assert_eq!(r.body_rest, 0);
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
        let req = r.into_request(());
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn repeated_headers_keep_every_value_in_order() {
        let r = request(b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nA: 3\r\n\r\n");
        let all: Vec<_> = r.headers.get_all("a").iter().collect();
        assert_eq!(all, ["1", "3"]);
        assert!(r.body.is_empty());
    }

    #[test]
    fn connection_close_is_noticed() {
        assert!(request(b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n").close);
    }

    #[test]
    fn an_incomplete_head_asks_for_more_and_an_incomplete_body_says_what_is_to_come() {
        match parse(b"POST / HTTP/1.1\r\nContent-Len").0 {
            Parse::Partial { need: 29 } => {}
            other => panic!("{other:?}"),
        }
        let (p, buf) = parse(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");
        let Parse::Request(r) = p else { panic!("{p:?}") };
        assert_eq!((&r.body[..], r.body_rest), (&b"abc"[..], 7));
        assert!(buf.is_empty());
        // A body far beyond the buffer is streamed too: the service's own limits decide.
        let r = request(b"POST / HTTP/1.1\r\nContent-Length: 9999999999\r\n\r\n");
        assert_eq!((r.body.len(), r.body_rest), (0, 9_999_999_999));
    }

    #[test]
    fn everything_unusual_goes_to_hyper() {
        for raw in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nab",
            b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\na",
            b"POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\na",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"HEAD / HTTP/1.1\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            b"BREW / HTTP/1.1\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\n\r\n",
            b"GET * HTTP/1.1\r\n\r\n",
            b"GET /a#b HTTP/1.1\r\n\r\n",
            b"GET /a{b} HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            to_hyper(raw);
        }
    }

    #[test]
    fn a_head_beyond_the_buffer_goes_to_hyper() {
        let mut p = RequestParser::new(64, 100);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nx: "[..]);
        buf.extend_from_slice(&[b'a'; 64]);
        assert!(matches!(p.parse(&mut buf), Parse::Hyper));
        let mut buf = BytesMut::from(&b"POST / HTTP/1.1\r\ncontent-length: 40\r\n\r\nab"[..]);
        assert!(matches!(p.parse(&mut buf), Parse::Request(RequestHead { body_rest: 38, .. })));
    }

    #[test]
    fn more_headers_than_the_count_go_to_hyper() {
        let mut p = RequestParser::new(16 * 1024, 2);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n"[..]);
        assert!(matches!(p.parse(&mut buf), Parse::Hyper));
    }

    #[test]
    fn answers_are_framed_by_length_or_chunks_and_say_close() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let mut out = Vec::new();
        let date = b"Sun, 06 Dec 2026 19:00:00 GMT";
        let close = response_head(&mut out, StatusCode::OK, &h, Framing::Length(12), date, false);
        assert!(!close);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\ndate: Sun, 06 Dec 2026 19:00:00 GMT\r\n\r\n"
        );
        let mut out = Vec::new();
        h.insert(header::DATE, HeaderValue::from_static("then"));
        let close = response_head(
            &mut out,
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            Framing::Chunked,
            date,
            true,
        );
        assert!(close);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ndate: then\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let mut out = Vec::new();
        assert!(response_head(&mut out, StatusCode::NO_CONTENT, &h, Framing::None, date, false));
        assert!(!String::from_utf8(out).unwrap().contains("content-length"));
    }

    #[test]
    fn framing_follows_the_status_and_the_size_hint() {
        assert_eq!(Framing::of(StatusCode::OK, &SizeHint::with_exact(3)), Framing::Length(3));
        assert_eq!(Framing::of(StatusCode::OK, &SizeHint::new()), Framing::Chunked);
        assert_eq!(Framing::of(StatusCode::NO_CONTENT, &SizeHint::with_exact(0)), Framing::None);
        assert_eq!(Framing::of(StatusCode::NOT_MODIFIED, &SizeHint::new()), Framing::None);
    }

    #[test]
    fn chunk_sizes_are_hex() {
        for (n, s) in [(1, "1\r\n"), (15, "F\r\n"), (16, "10\r\n"), (65_535, "FFFF\r\n")] {
            let mut out = Vec::new();
            chunk_start(&mut out, n);
            assert_eq!(out, s.as_bytes());
        }
    }
}
