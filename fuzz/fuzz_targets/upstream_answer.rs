//! An upstream's answer (status line, headers, body framed by `content-length`, `chunked` or
//! the connection's end), read the way the node's upstream client reads a socket: head first
//! with [`wire::parse_head`], then the body piece by piece with [`Framing::next`] (or joined
//! with [`Framing::drain_into`], as the SSE path reads it), in reads of fuzzer-chosen sizes,
//! ending with the end of stream.
//!
//! Input: byte 0 seeds the read sizes, byte 1 bit 0 marks a `HEAD` request, the rest is the
//! stream.
//!
//! Properties: nothing panics; read sizes and the way the body is taken change nothing (status, body bytes, what follows the
//! body, and whether and where it failed are the same as when the whole stream arrives in one
//! read); data pieces are never empty; a body framed by `content-length` is exactly that long;
//! a `chunked` body never reaches the caller with its framing (its bytes are a subsequence of
//! the stream's chunk data, checked by length: never more than the stream after the head);
//! keeping no header (`AnswerHeaders::Only`) gives the same status, framing, reuse and head
//! length, and fails only where the kept map would have failed on a header's name or value.

#![no_main]

use bytes::BytesMut;
use std::sync::Arc;

use edgeroute_http::upstream::wire::{self, AnswerHeaders, Framing, Step};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: Option<u16>,
    framing: Option<&'static str>,
    body: Vec<u8>,
    /// Bytes after a complete body.
    after: Option<Vec<u8>>,
    error: Option<String>,
}

fn none() -> AnswerHeaders {
    AnswerHeaders::Only(Arc::from([]))
}

fn read(parts: &[&[u8]], head_request: bool, joined: bool) -> Outcome {
    let mut out =
        Outcome { status: None, framing: None, body: Vec::new(), after: None, error: None };
    let mut buf = BytesMut::new();
    let mut parts = parts.iter();
    let head = loop {
        if !buf.is_empty() {
            let mut bare = buf.clone();
            let framed_only = wire::parse_head(&mut bare, head_request, &none());
            match wire::parse_head(&mut buf, head_request, &AnswerHeaders::All) {
                Ok(Some(h)) => {
                    // Keeping no header changes nothing of the framing, nor what is left.
                    let b = framed_only.expect("no header kept, yet an error").expect("complete");
                    assert_eq!((b.status, b.version), (h.status, h.version));
                    assert_eq!((&b.framing, b.reusable), (&h.framing, h.reusable));
                    assert!(b.headers.is_empty());
                    assert_eq!(bare, buf, "no header kept, yet another head length");
                    break h;
                }
                Ok(None) => assert!(matches!(framed_only, Ok(None))),
                Err(e) => {
                    // Only a header the caller would have been given can fail the map.
                    if let Ok(b) = framed_only {
                        assert!(b.is_some(), "{e}");
                        assert!(e.to_string().contains("header name") || e.to_string().contains("the value of"), "{e}");
                    }
                    out.error = Some(e.to_string());
                    return out;
                }
            }
        }
        match parts.next() {
            Some(p) => buf.extend_from_slice(p),
            None => {
                out.error = Some("closed before the head".into());
                return out;
            }
        }
    };
    out.status = Some(head.status.as_u16());
    let mut framing = head.framing;
    let declared = framing.remaining();
    out.framing = Some(match framing {
        Framing::Length(_) => "length",
        Framing::Chunked(_) => "chunked",
        Framing::Close => "close",
    });
    let mut joined_body = BytesMut::new();
    loop {
        let step = if joined {
            match framing.drain_into(&mut buf, &mut joined_body) {
                Ok(true) => Ok(Step::End),
                Ok(false) => Ok(Step::More),
                Err(e) => Err(e),
            }
        } else {
            framing.next(&mut buf)
        };
        out.body.extend_from_slice(&joined_body.split());
        match step {
            Ok(Step::Data(b)) => {
                assert!(!b.is_empty(), "an empty data piece");
                out.body.extend_from_slice(&b);
            }
            Ok(Step::End) => {
                let mut after = buf.to_vec();
                for p in parts.by_ref() {
                    after.extend_from_slice(p);
                }
                out.after = Some(after);
                break;
            }
            Ok(Step::More) => match parts.next() {
                Some(p) => buf.extend_from_slice(p),
                None => {
                    if let Err(e) = framing.at_eof() {
                        out.error = Some(e.to_string());
                    }
                    break;
                }
            },
            Err(e) => {
                out.error = Some(e.to_string());
                break;
            }
        }
    }
    if let Some(n) = declared
        && out.error.is_none()
    {
        assert_eq!(out.body.len() as u64, n, "content-length not honoured");
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let head_request = data[1] & 1 == 1;
    let stream = &data[2..];
    let whole = read(&[stream], head_request, false);
    let split = edgeroute_fuzz::split(stream, data[0], 97);
    let pieces = read(&split, head_request, false);
    assert_eq!(whole, pieces, "read sizes changed the answer");
    assert_eq!(read(&split, head_request, true), whole, "joined, the body differs");
    assert!(whole.body.len() <= stream.len());
});
