//! HTTP/1.1 on the wire to an upstream, as plain functions over byte buffers: the request head
//! written, the answer's head read (with `httparse`), and how the answer's body is framed —
//! `content-length`, `chunked` or until the connection closes (RFC 9112 §6.3). No I/O, no
//! clock: the connection code feeds bytes in, and the fuzz target `upstream_answer` feeds
//! whatever a fuzzer makes.
//!
//! Strict where leniency is a smuggling risk: a `transfer-encoding` other than `chunked`,
//! differing `content-length`s, a chunk line without its CRLF, a size beyond 64 bits or an
//! oversized line or head are errors, and an answer that mixes `transfer-encoding` with
//! `content-length` never leaves its connection reusable.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};

/// An answer's head may be at most this large (status line and headers).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Headers in one answer, at most.
pub const MAX_HEADERS: usize = 100;
/// A chunk-size line (with any extensions), at most.
pub const MAX_CHUNK_LINE: usize = 4096;
/// All trailer lines of a chunked body together, at most.
pub const MAX_TRAILERS: usize = 16 * 1024;

/// What is wrong with an answer's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the answer's head is malformed: {0}")]
    Head(String),
    #[error("the answer's head is over {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("the answer's framing is invalid: {0}")]
    Framing(&'static str),
    #[error("the chunked body is malformed: {0}")]
    Chunked(&'static str),
    #[error("the connection ended {0}")]
    Truncated(&'static str),
}

/// The head of a request: `METHOD path HTTP/1.1`, `host`, the caller's headers (less those this
/// layer owns: `host`, `content-length`, `transfer-encoding`, `connection`) and the body's
/// `content-length` (left out for a bodiless `GET`/`HEAD`). `room` is capacity left after the
/// head for what the caller appends (a small body sent in the same write), so the buffer is
/// allocated once.
pub fn request_head(
    method: &Method,
    path_and_query: &str,
    host: &HeaderValue,
    headers: &HeaderMap,
    body_len: usize,
    room: usize,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(128 + path_and_query.len() + 48 * headers.len() + room);
    h.extend_from_slice(method.as_str().as_bytes());
    h.push(b' ');
    h.extend_from_slice(path_and_query.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    h.extend_from_slice(host.as_bytes());
    h.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if matches!(
            *name,
            header::HOST | header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION
        ) {
            continue;
        }
        h.extend_from_slice(name.as_str().as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    if body_len > 0 || !matches!(*method, Method::GET | Method::HEAD) {
        h.extend_from_slice(b"content-length: ");
        push_decimal(&mut h, body_len as u64);
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// Appends `n` in decimal (the one writer of lengths for both directions).
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Which of an answer's headers reach the caller in [`Head::headers`]. The framing headers
/// (`content-length`, `transfer-encoding`, `connection`) are read from the wire either way;
/// a header left out is checked by the parser and never copied.
#[derive(Debug, Clone, Default)]
pub enum AnswerHeaders {
    /// Every header.
    #[default]
    All,
    /// These names only: a caller that reads two headers of an answer does not pay for a map
    /// of all of them (an allocation and a copy per header, each answer).
    Only(Arc<[HeaderName]>),
}

impl AnswerHeaders {
    fn keeps(&self, name: &str) -> bool {
        match self {
            AnswerHeaders::All => true,
            AnswerHeaders::Only(names) => {
                names.iter().any(|n| n.as_str().eq_ignore_ascii_case(name))
            }
        }
    }
}

/// An answer's head, parsed.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    /// The headers [`AnswerHeaders`] asked for.
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once this answer's body has been read.
    pub reusable: bool,
}

/// Parses the answer's head at the start of `buf` and removes it from `buf`: `Ok(None)` when
/// more bytes are needed. Interim (1xx) answers before the final one are read and dropped;
/// `head_request` says the answer has no body whatever its headers say; `keep` says which
/// headers the caller gets.
pub fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    keep: &AnswerHeaders,
) -> Result<Option<Head>, WireError> {
    loop {
        // Left uninitialised: httparse writes the slots it fills (filling all of them first
        // was 3 KiB of stores, and as many cold cache lines, per answer).
        let mut slots =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return if buf.len() > MAX_HEAD_BYTES {
                    Err(WireError::HeadTooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(WireError::Head(format!("over {MAX_HEADERS} headers")));
            }
            Err(e) => return Err(WireError::Head(e.to_string())),
        };
        if len > MAX_HEAD_BYTES {
            return Err(WireError::HeadTooLarge);
        }
        let code = res.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| WireError::Head(format!("status {code} is not a status")))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(WireError::Head("101 to a request that asked for no upgrade".into()));
            }
            buf.advance(len);
            continue;
        }
        let version = if res.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        let (framing, clean) = framing(status, res.headers, head_request)?;
        let reusable =
            clean && keep_alive(version, res.headers) && !matches!(framing, Framing::Close);
        // Sized once when every header is kept; a named few grow it from empty.
        let mut headers = match keep {
            AnswerHeaders::All => HeaderMap::with_capacity(res.headers.len()),
            AnswerHeaders::Only(_) => HeaderMap::new(),
        };
        for h in res.headers.iter().filter(|h| keep.keeps(h.name)) {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| WireError::Head(format!("header name `{}`", h.name)))?;
            let value = HeaderValue::from_bytes(h.value)
                .map_err(|_| WireError::Head(format!("the value of `{}`", h.name)))?;
            headers.append(name, value);
        }
        buf.advance(len);
        return Ok(Some(Head { status, version, headers, framing, reusable }));
    }
}

/// The values of the headers named `name` (compared without case).
fn values<'h>(
    headers: &'h [httparse::Header<'_>],
    name: &'static str,
) -> impl Iterator<Item = &'h [u8]> {
    headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
}

/// A header value as text, if it is visible ASCII (what `HeaderValue::to_str` accepts).
fn text(value: &[u8]) -> Option<&str> {
    if value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Whether the connection stays open after this answer (RFC 9112 §9.3).
fn keep_alive(version: Version, headers: &[httparse::Header<'_>]) -> bool {
    let mut close = version == Version::HTTP_10;
    for v in values(headers, "connection") {
        for token in text(v).unwrap_or("close").split(',') {
            let t = token.trim();
            if t.eq_ignore_ascii_case("close") {
                return false;
            }
            if t.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        }
    }
    !close
}

/// How the body is delimited, and whether the framing leaves the connection clean for reuse.
fn framing(
    status: StatusCode,
    headers: &[httparse::Header<'_>],
    head_request: bool,
) -> Result<(Framing, bool), WireError> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Length(0), true));
    }
    let mut te = values(headers, "transfer-encoding").peekable();
    if te.peek().is_some() {
        let mut codings = 0;
        for v in te {
            for c in text(v).ok_or(WireError::Framing("transfer-encoding"))?.split(',') {
                let c = c.trim();
                if c.is_empty() {
                    continue;
                }
                if !c.eq_ignore_ascii_case("chunked") || codings > 0 {
                    return Err(WireError::Framing("a transfer-encoding other than chunked"));
                }
                codings += 1;
            }
        }
        if codings == 0 {
            return Err(WireError::Framing("an empty transfer-encoding"));
        }
        // Both headers: chunked wins, and the connection is not trusted with another request.
        let clean = values(headers, "content-length").next().is_none();
        return Ok((Framing::Chunked(Chunked::default()), clean));
    }
    let mut length = None;
    for v in values(headers, "content-length") {
        for part in text(v).ok_or(WireError::Framing("content-length"))?.split(',') {
            let part = part.trim();
            if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(WireError::Framing("content-length is not a length"));
            }
            let n: u64 = part.parse().map_err(|_| WireError::Framing("content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(WireError::Framing("differing content-lengths"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Close, false),
    })
}

/// How an answer's body ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked(Chunked),
    /// At the end of the connection.
    Close,
}

/// What [`Framing::next`] made of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes (never empty).
    Data(Bytes),
    /// The body is complete; whatever remains in the buffer follows it.
    End,
    /// More bytes are needed.
    More,
}

impl Framing {
    /// Takes the next piece of the body from the front of `buf` (data is split off the buffer,
    /// not copied).
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Step, WireError> {
        let (skip, piece) = self.piece(buf)?;
        buf.advance(skip);
        Ok(match piece {
            Piece::Data(n) => Step::Data(buf.split_to(n).freeze()),
            Piece::End => Step::End,
            Piece::More => Step::More,
        })
    }

    /// Moves every body byte `buf` holds onto the end of `dst`, without the framing (a
    /// `chunked` body's chunks arrive joined): for a reader that wants the body contiguous,
    /// such as an SSE decoder, one copy and no buffer handle per chunk. True once the body is
    /// complete (whatever remains in `buf` follows it).
    pub fn drain_into(
        &mut self,
        buf: &mut BytesMut,
        dst: &mut BytesMut,
    ) -> Result<bool, WireError> {
        // The body bytes here are at most what the buffer holds: room made once.
        dst.reserve(buf.len());
        // Read in place, the buffer advanced once at the end.
        let mut at = 0;
        let ended = loop {
            let (skip, piece) = self.piece(&buf[at..])?;
            at += skip;
            match piece {
                Piece::Data(n) => {
                    dst.extend_from_slice(&buf[at..at + n]);
                    at += n;
                }
                Piece::End => break true,
                Piece::More => break false,
            }
        };
        buf.advance(at);
        Ok(ended)
    }

    /// Reads the framing at the front of `buf` up to the next body bytes, as (framing bytes
    /// to skip, what follows them): `Data(n)` says the `n` bytes after the skipped ones (never
    /// 0) are body, already counted, and the caller takes exactly them.
    fn piece(&mut self, buf: &[u8]) -> Result<(usize, Piece), WireError> {
        match self {
            Framing::Length(0) => Ok((0, Piece::End)),
            Framing::Length(n) => {
                if buf.is_empty() {
                    return Ok((0, Piece::More));
                }
                let take = usize::try_from(*n).unwrap_or(usize::MAX).min(buf.len());
                *n -= take as u64;
                Ok((0, Piece::Data(take)))
            }
            Framing::Chunked(c) => c.piece(buf),
            Framing::Close if buf.is_empty() => Ok((0, Piece::More)),
            Framing::Close => Ok((0, Piece::Data(buf.len()))),
        }
    }

    /// The connection ended: fine only for a body delimited by the end.
    pub fn at_eof(&self) -> Result<(), WireError> {
        match self {
            Framing::Close | Framing::Length(0) => Ok(()),
            Framing::Chunked(c) if c.state == ChunkState::Done => Ok(()),
            Framing::Length(_) => Err(WireError::Truncated("before content-length bytes")),
            Framing::Chunked(_) => Err(WireError::Truncated("inside the chunked body")),
        }
    }

    /// The bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Framing::Length(n) => Some(*n),
            _ => None,
        }
    }
}

/// What [`Framing::piece`] found at the front of the buffer.
enum Piece {
    Data(usize),
    End,
    More,
}

/// A `chunked` body's decoder (RFC 9112 §7.1): sizes, data, trailers (read and dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
    trailer_bytes: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

impl Chunked {
    fn piece(&mut self, buf: &[u8]) -> Result<(usize, Piece), WireError> {
        // Framing bytes read so far: the caller skips them.
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self.state {
                ChunkState::Size => {
                    let (size, line) = match plain_size_line(rest) {
                        Some(read) => read,
                        None => {
                            let Some(len) =
                                line_len(rest, MAX_CHUNK_LINE, "a chunk-size line is too long")?
                            else {
                                return Ok((at, Piece::More));
                            };
                            (chunk_size(&rest[..len])?, len + 2)
                        }
                    };
                    at += line;
                    self.state =
                        if size == 0 { ChunkState::Trailers } else { ChunkState::Data(size) };
                }
                ChunkState::Data(n) => {
                    if rest.is_empty() {
                        return Ok((at, Piece::More));
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(rest.len());
                    let left = n - take as u64;
                    self.state =
                        if left == 0 { ChunkState::DataEnd } else { ChunkState::Data(left) };
                    return Ok((at, Piece::Data(take)));
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        return if rest.first().is_some_and(|&b| b != b'\r') {
                            Err(WireError::Chunked("chunk data not followed by CRLF"))
                        } else {
                            Ok((at, Piece::More))
                        };
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(WireError::Chunked("chunk data not followed by CRLF"));
                    }
                    at += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let room = MAX_TRAILERS - self.trailer_bytes;
                    let Some(len) = line_len(rest, room, "the trailers are too long")? else {
                        return Ok((at, Piece::More));
                    };
                    at += len + 2;
                    if len == 0 {
                        self.state = ChunkState::Done;
                        return Ok((at, Piece::End));
                    }
                    self.trailer_bytes += len + 2;
                }
                ChunkState::Done => return Ok((at, Piece::End)),
            }
        }
    }
}

/// The usual chunk-size line, read in one pass: 1 to 16 hexadecimal digits and CRLF, as (size,
/// line length with its CRLF). `None` for anything else (an extension, an error, a line not
/// complete yet), which [`line_len`] and [`chunk_size`] then read; where this reads a line,
/// they read the same.
fn plain_size_line(buf: &[u8]) -> Option<(u64, usize)> {
    let mut size = 0u64;
    for (i, &d) in buf.iter().enumerate().take(17) {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            b'\r' if i > 0 && buf.get(i + 1) == Some(&b'\n') => return Some((size, i + 2)),
            _ => return None,
        };
        if i == 16 {
            return None;
        }
        size = size << 4 | u64::from(v);
    }
    None
}

/// The length of the CRLF-terminated line at the front of `buf` (without its CRLF), read in
/// place: the caller parses `buf[..len]` and advances past `len + 2` bytes. `None` while
/// incomplete. A line longer than `max` (CRLF included) is the error `too_long`, a bare LF an
/// error too.
fn line_len(buf: &[u8], max: usize, too_long: &'static str) -> Result<Option<usize>, WireError> {
    let Some(lf) = buf[..buf.len().min(max)].iter().position(|&b| b == b'\n') else {
        return if buf.len() >= max { Err(WireError::Chunked(too_long)) } else { Ok(None) };
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(WireError::Chunked("a line ends in a bare LF"));
    }
    Ok(Some(lf - 1))
}

/// `1*HEXDIG [ BWS ";" extensions ]`: the size; extensions are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(WireError::Chunked("a chunk size is not hexadecimal"));
    }
    if digits > 16 {
        return Err(WireError::Chunked("a chunk size is over 64 bits"));
    }
    let rest = &line[digits..];
    let after_ws =
        rest.iter().position(|b| *b != b' ' && *b != b'\t').map_or(&[][..], |i| &rest[i..]);
    if !after_ws.is_empty() && after_ws[0] != b';' {
        return Err(WireError::Chunked("junk after a chunk size"));
    }
    if after_ws.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(WireError::Chunked("a control byte in a chunk extension"));
    }
    // At most 16 hexadecimal digits: the value fits in 64 bits.
    Ok(line[..digits].iter().fold(0u64, |n, &d| n << 4 | u64::from(hex_value(d))))
}

/// The value of an ASCII hexadecimal digit.
fn hex_value(d: u8) -> u8 {
    match d {
        b'0'..=b'9' => d - b'0',
        _ => (d | 0x20) - b'a' + 10,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn head(bytes: &[u8]) -> Result<Option<Head>, WireError> {
        parse_head(&mut BytesMut::from(bytes), false, &AnswerHeaders::All)
    }

    /// The whole body of `answer`'s framing, fed `step` bytes at a time.
    fn body(
        framing: &mut Framing,
        bytes: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Vec<u8>), WireError> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match framing.next(&mut buf)? {
                Step::Data(b) => {
                    assert!(!b.is_empty());
                    out.extend_from_slice(&b);
                }
                Step::End => {
                    let mut rest = buf.to_vec();
                    rest.extend_from_slice(&bytes[fed..]);
                    return Ok((out, rest));
                }
                Step::More => {
                    if fed == bytes.len() {
                        framing.at_eof()?;
                        return Ok((out, Vec::new()));
                    }
                    let n = step.min(bytes.len() - fed);
                    buf.extend_from_slice(&bytes[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    /// [`body`] through [`Framing::drain_into`]: the same body, joined in one buffer.
    fn drained(
        framing: &mut Framing,
        bytes: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Vec<u8>), WireError> {
        let (mut buf, mut out) = (BytesMut::new(), BytesMut::new());
        let mut fed = 0;
        loop {
            if framing.drain_into(&mut buf, &mut out)? {
                let mut rest = buf.to_vec();
                rest.extend_from_slice(&bytes[fed..]);
                return Ok((out.to_vec(), rest));
            }
            assert!(buf.is_empty() || !matches!(framing, Framing::Length(_) | Framing::Close));
            if fed == bytes.len() {
                framing.at_eof()?;
                return Ok((out.to_vec(), Vec::new()));
            }
            let n = step.min(bytes.len() - fed);
            buf.extend_from_slice(&bytes[fed..fed + n]);
            fed += n;
        }
    }

    #[test]
    fn a_request_head_carries_host_and_length_and_none_of_the_callers_framing() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.insert(header::HOST, HeaderValue::from_static("evil"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let host = HeaderValue::from_static("up:8000");
        let got = request_head(&Method::POST, "/v1/chat/completions?x=1", &host, &h, 12, 0);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: up:8000\r\nauthorization: Bearer k\r\ncontent-length: 12\r\n\r\n"
        );
        let get = request_head(&Method::GET, "/v1/models", &host, &HeaderMap::new(), 0, 0);
        assert_eq!(
            String::from_utf8(get).unwrap(),
            "GET /v1/models HTTP/1.1\r\nhost: up:8000\r\n\r\n"
        );
    }

    #[test]
    fn a_head_arrives_whole_or_asks_for_more() {
        let full =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        for cut in 0..full.len() - 2 {
            assert!(head(&full[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        let mut buf = BytesMut::from(&full[..]);
        let h = parse_head(&mut buf, false, &AnswerHeaders::All).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.reusable);
        assert_eq!(&buf[..], b"{}", "the head is taken, the body left");
    }

    #[test]
    fn interim_answers_are_skipped_and_an_unasked_upgrade_refused() {
        let h = head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.status, 204);
        assert_eq!(h.framing, Framing::Length(0));
        assert!(head(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n").is_err());
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_header() {
        let reusable = |s: &[u8]| head(s).unwrap().unwrap().reusable;
        assert!(reusable(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(!reusable(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"));
        assert!(!reusable(
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!reusable(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(reusable(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!reusable(b"HTTP/1.1 200 OK\r\n\r\n"), "delimited by the close");
        assert!(!reusable(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n"
        ));
    }

    /// A caller that names the headers it reads gets those (any case on the wire) and no
    /// other, and the framing and reuse come out as when every header is kept: they are read
    /// from the wire, not from the caller's map.
    #[test]
    fn only_the_named_headers_are_kept_and_the_framing_is_read_either_way() {
        let only = AnswerHeaders::Only(Arc::from([header::CONTENT_TYPE, header::RETRY_AFTER]));
        for answer in [
            &b"HTTP/1.1 429 Too Many Requests\r\nDate: x\r\nRetry-After: 3\r\nContent-Type: text/plain\r\ncontent-length: 2\r\n\r\nno"[..],
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\nx-other: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nCONNECTION: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
        ] {
            let all = head(answer).unwrap().unwrap();
            let some = parse_head(&mut BytesMut::from(answer), false, &only).unwrap().unwrap();
            let text = String::from_utf8_lossy(answer);
            assert_eq!((some.status, some.version), (all.status, all.version), "{text}");
            assert_eq!(some.framing, all.framing, "{text}");
            assert_eq!(some.reusable, all.reusable, "{text}");
            let kept: Vec<_> = some.headers.keys().map(|k| k.as_str()).collect();
            let want: Vec<_> = all
                .headers
                .keys()
                .map(|k| k.as_str())
                .filter(|k| *k == "content-type" || *k == "retry-after")
                .collect();
            assert_eq!(kept, want, "{text}");
            for k in kept {
                assert_eq!(some.headers[k], all.headers[k]);
            }
        }
        let none = AnswerHeaders::Only(Arc::from([]));
        let bad = b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n";
        assert!(parse_head(&mut BytesMut::from(&bad[..]), false, &none).is_err());
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: ,\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n",
        ] {
            assert!(head(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let same = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(same.unwrap().unwrap().framing, Framing::Length(5));
    }

    #[test]
    fn an_endless_head_is_refused_at_its_limit() {
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        while big.len() <= MAX_HEAD_BYTES {
            big.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(head(&big).is_err());
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(head(&many).is_err());
    }

    #[test]
    fn chunked_bodies_decode_alike_whatever_the_read_sizes() {
        let wire = b"4\r\ndata\r\n7;name=\"v\"\r\n: token\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in 1..wire.len() {
            let mut f = Framing::Chunked(Chunked::default());
            let (out, rest) = body(&mut f, wire, step).unwrap();
            assert_eq!(out, b"data: tokenabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert_eq!(rest, b"NEXT", "step {step}: what follows the body stays");
            let mut f = Framing::Chunked(Chunked::default());
            assert_eq!(drained(&mut f, wire, step).unwrap(), (out, rest), "drained, step {step}");
        }
    }

    #[test]
    fn drained_bodies_match_their_pieces_for_every_framing() {
        let cases: [(Framing, &[u8]); 4] = [
            (Framing::Length(5), b"hello, and the next answer"),
            (Framing::Length(0), b"next"),
            (Framing::Close, b"until the end"),
            (Framing::Chunked(Chunked::default()), b"3\r\nabc\r\n0\r\n\r\n"),
        ];
        for (framing, wire) in cases {
            for step in 1..=wire.len() {
                let by_piece = body(&mut framing.clone(), wire, step).unwrap();
                let joined = drained(&mut framing.clone(), wire, step).unwrap();
                assert_eq!(joined, by_piece, "{framing:?}, step {step}");
            }
        }
        // A failure is the same failure either way.
        let cut = b"5\r\nab";
        let f = Framing::Chunked(Chunked::default());
        assert_eq!(drained(&mut f.clone(), cut, 2), body(&mut f.clone(), cut, 2));
        assert!(drained(&mut f.clone(), cut, 2).is_err());
    }

    #[test]
    fn chunk_sizes_are_hexadecimal_in_either_case_up_to_64_bits() {
        for (line, size) in [
            (&b"0"[..], 0u64),
            (b"9", 9),
            (b"a", 10),
            (b"F", 15),
            (b"fF", 255),
            (b"1a2B", 0x1a2b),
            (b"0000000000000010", 16),
            (b"ffffffffffffffff", u64::MAX),
            (b"10 ;ext=1", 16),
        ] {
            assert_eq!(chunk_size(line), Ok(size), "{}", String::from_utf8_lossy(line));
        }
        for bad in [&b"g"[..], b"", b"00000000000000001", b"1x", b" 1"] {
            assert!(chunk_size(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    /// Every line the one-pass reader reads, the general reader reads alike; every line it
    /// leaves, the general one still sees (all strings up to 6 bytes over an alphabet of
    /// digits, letters, blanks, `;`, CR and LF, and the 16- and 17-digit edges).
    #[test]
    fn the_plain_size_line_reads_as_the_general_reader_does() {
        let alphabet = b"09afAFg ;\r\n";
        let mut lines: Vec<Vec<u8>> = vec![Vec::new()];
        let mut last = lines.clone();
        for _ in 0..6 {
            last = last
                .iter()
                .flat_map(|l| {
                    alphabet.iter().map(move |&b| {
                        let mut l = l.clone();
                        l.push(b);
                        l
                    })
                })
                .collect();
            lines.extend(last.iter().cloned());
        }
        lines.push(b"ffffffffffffffff\r\n".to_vec());
        lines.push(b"10000000000000000\r\n".to_vec());
        let mut read = 0;
        for line in &lines {
            let general = line_len(line, MAX_CHUNK_LINE, "long").and_then(|len| {
                len.map(|len| Ok((chunk_size(&line[..len])?, len + 2))).transpose()
            });
            match plain_size_line(line) {
                Some(got) => {
                    read += 1;
                    assert_eq!(general, Ok(Some(got)), "{}", String::from_utf8_lossy(line));
                }
                None => assert!(
                    !matches!(general, Ok(Some((_, len))) if !line[..len - 2].contains(&b';')
                        && !line[..len - 2].contains(&b' ')),
                    "the plain reader left a plain line: {}",
                    String::from_utf8_lossy(line)
                ),
            }
        }
        assert!(read > 1000, "only {read} lines were plain");
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"x\r\n"[..],
            b"4\r\ndataXX",
            b"4\ndata\r\n0\r\n\r\n",
            b"4 x\r\ndata\r\n",
            b"11111111111111111\r\n",
            b"-1\r\n",
            b"4\r\ndata\r\n0\r\nbad\n\r\n",
        ] {
            let mut f = Framing::Chunked(Chunked::default());
            assert!(body(&mut f, bad, 3).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let mut long = b"4;".to_vec();
        long.resize(MAX_CHUNK_LINE + 1, b'a');
        let mut f = Framing::Chunked(Chunked::default());
        assert_eq!(
            body(&mut f, &long, 1000).unwrap_err(),
            WireError::Chunked("a chunk-size line is too long")
        );
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < MAX_TRAILERS + 100 {
            trailers.extend_from_slice(b"x-t: 1\r\n");
        }
        let mut f = Framing::Chunked(Chunked::default());
        assert!(body(&mut f, &trailers, 512).is_err());
    }

    #[test]
    fn a_truncated_body_is_an_error_and_a_close_delimited_one_is_not() {
        let mut f = Framing::Length(10);
        assert!(body(&mut f, b"12345", 2).is_err());
        let mut f = Framing::Chunked(Chunked::default());
        assert!(body(&mut f, b"5\r\n12345\r\n", 4).is_err());
        let mut f = Framing::Close;
        assert_eq!(body(&mut f, b"all of it", 4).unwrap().0, b"all of it");
        let mut f = Framing::Length(4);
        assert_eq!(body(&mut f, b"1234extra", 3).unwrap(), (b"1234".to_vec(), b"extra".to_vec()));
    }
}
