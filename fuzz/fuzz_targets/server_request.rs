//! Requests as the inline HTTP/1.1 server reads a socket ([`RequestParser::parse`]): bytes
//! arrive in reads of fuzzer-chosen sizes, and the parser is asked again whenever the buffer
//! holds as many bytes as it last said it needs, as the connection does.
//!
//! Input: byte 0 seeds the read sizes, byte 1 picks the buffer size (64 bytes to 16 KiB), the
//! rest is the stream.
//!
//! Properties: nothing panics; read sizes change nothing (the requests taken, their bodies as
//! the connection hands them over, and where and how the stream ends up with hyper, are the
//! same as when everything arrives in one read); a request's body is exactly its
//! `content-length`; a request is consumed exactly (what is left is the stream after it); a
//! head is never beyond the buffer; a hand-over to hyper leaves every byte in the buffer; no
//! request is taken with a `transfer-encoding`, `expect` or `upgrade` header.

#![no_main]

use bytes::BytesMut;
use edgeroute_http::h1::wire::{Parse, RequestParser};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
struct Taken {
    method: String,
    uri: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    close: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    requests: Vec<Taken>,
    /// Where the stream went to hyper (offset of its first unconsumed byte), or the 400.
    end: Option<(&'static str, usize)>,
}

fn read(parts: &[&[u8]], max_buf: usize) -> Outcome {
    let mut parser = RequestParser::new(max_buf, 100);
    let mut out = Outcome { requests: Vec::new(), end: None };
    let mut buf = BytesMut::new();
    let mut consumed = 0;
    let mut need = 1;
    let mut parts = parts.iter();
    loop {
        if buf.len() >= need {
            let before = buf.clone();
            match parser.parse(&mut buf) {
                Parse::Request(r) => {
                    let used = before.len() - buf.len();
                    assert_eq!(&before[used..], &buf[..], "a request was not consumed exactly");
                    let head_len = used - r.body.len();
                    assert!(head_len <= max_buf, "a head beyond the buffer");
                    assert_eq!(&before[head_len..used], &r.body[..]);
                    for name in ["transfer-encoding", "expect", "upgrade"] {
                        assert!(!r.headers.contains_key(name), "taken with `{name}`");
                    }
                    let declared = r
                        .headers
                        .get("content-length")
                        .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
                    assert_eq!(
                        declared.unwrap_or(0),
                        r.body.len() as u64 + r.body_rest,
                        "content-length not honoured"
                    );
                    // The rest of the body follows on the connection, as the driver hands it over.
                    let mut body = r.body.to_vec();
                    let mut rest = r.body_rest;
                    consumed += used;
                    let mut taken = Taken {
                        method: r.method.to_string(),
                        uri: r.uri.to_string(),
                        headers: r
                            .headers
                            .iter()
                            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                            .collect(),
                        body: Vec::new(),
                        close: r.close,
                    };
                    while rest > 0 {
                        let n = buf.len().min(usize::try_from(rest).unwrap_or(usize::MAX));
                        body.extend_from_slice(&buf.split_to(n));
                        rest -= n as u64;
                        consumed += n;
                        if rest > 0 {
                            match parts.next() {
                                Some(p) => buf.extend_from_slice(p),
                                None => {
                                    taken.body = body;
                                    out.requests.push(taken);
                                    out.end = Some(("cut", consumed));
                                    return out;
                                }
                            }
                        }
                    }
                    taken.body = body;
                    out.requests.push(taken);
                    need = 1;
                    continue;
                }
                Parse::Hyper => {
                    assert_eq!(before, buf, "bytes taken from what hyper gets");
                    out.end = Some(("hyper", consumed));
                    return out;
                }
                Parse::BadTarget => {
                    out.end = Some(("400", consumed));
                    return out;
                }
                Parse::Partial { need: n, .. } => {
                    assert_eq!(before, buf, "bytes taken by a partial parse");
                    assert!(n > buf.len(), "asked for no more bytes");
                    need = n;
                }
            }
        }
        match parts.next() {
            Some(p) => buf.extend_from_slice(p),
            None => return out,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max_buf = 64usize << (data[1] % 9);
    let stream = &data[2..];
    let whole = read(&[stream], max_buf);
    let split = edgeroute_fuzz::split(stream, data[0], 61);
    assert_eq!(read(&split, max_buf), whole, "read sizes changed the requests");
});
