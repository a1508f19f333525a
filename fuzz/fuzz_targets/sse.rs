//! Server-sent events from an upstream, split into chunks at fuzzer-chosen points and fed to
//! [`SseDecoder`], one event at a time (`next_event`) and in batches (`next_batch`).
//!
//! Input: byte 0-1 pick `max_event` (16..4111), byte 2 seeds the chunk sizes, the rest is the
//! stream.
//!
//! Properties: nothing panics; chunking does not change the events decoded; the decoder
//! refuses (`TooLarge`) exactly when an unfinished event outgrows `max_event`, so it never
//! holds more than that without saying so; batches forward whole events verbatim (re-decoding
//! their bytes gives as many data events as they announced).

#![no_main]

use edgeroute_proto::sse::{Ending, SseDecoder, SseError, SseEvent};
use libfuzzer_sys::fuzz_target;

/// Bytes after the last event boundary (`\n\n`, `\r\n\r\n`, `\r\r`), scanning as the decoder
/// does: from the start of each event.
fn unfinished(b: &[u8]) -> usize {
    let (mut i, mut start) = (0, 0);
    while i < b.len() {
        let sep = match b[i] {
            b'\n' if b.get(i + 1) == Some(&b'\n') => 2,
            b'\r' if b[i + 1..].starts_with(b"\n\r\n") => 4,
            b'\r' if b.get(i + 1) == Some(&b'\r') => 2,
            _ => 0,
        };
        if sep > 0 {
            i += sep;
            start = i;
        } else {
            i += 1;
        }
    }
    b.len() - start
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let max_event = 16 + usize::from(u16::from_le_bytes([data[0], data[1]]) % 4096);
    let stream = &data[3..];
    let parts = edgeroute_fuzz::split(stream, data[2], 64);

    // The whole stream at once, with no size limit: the reference.
    let mut whole = SseDecoder::new(usize::MAX);
    whole.push(stream);
    let mut expected = Vec::new();
    while let Some(ev) = whole.next_event().expect("no limit, no error") {
        expected.push(ev);
    }

    // Event by event, chunked.
    let mut d = SseDecoder::new(max_event);
    let mut got = Vec::new();
    let mut fed = 0;
    let mut too_large = false;
    'feed: for part in &parts {
        d.push(part);
        fed += part.len();
        loop {
            match d.next_event() {
                Ok(Some(ev)) => got.push(ev),
                Ok(None) => break,
                Err(SseError::TooLarge(n)) => {
                    assert_eq!(n, max_event);
                    assert!(
                        unfinished(&stream[..fed]) > max_event,
                        "TooLarge with only {} unfinished bytes (limit {max_event})",
                        unfinished(&stream[..fed])
                    );
                    too_large = true;
                    break 'feed;
                }
            }
        }
        assert!(
            unfinished(&stream[..fed]) <= max_event,
            "holds {} unfinished bytes without refusing (limit {max_event})",
            unfinished(&stream[..fed])
        );
        let partial =
            stream[fed - unfinished(&stream[..fed])..fed].iter().any(|b| !b.is_ascii_whitespace());
        assert_eq!(d.has_partial(), partial);
    }
    if !too_large {
        assert_eq!(got, expected, "chunking changed the events");
    } else {
        assert!(expected.starts_with(&got), "events before the refusal differ");
    }

    // Batches, chunked: forwarded bytes re-decode to the data events they announced.
    let mut d = SseDecoder::new(max_event);
    let mut forwarded = Vec::new();
    let mut announced = 0u64;
    'batches: for part in &parts {
        d.push(part);
        loop {
            match d.next_batch() {
                Ok(Some(b)) => {
                    forwarded.extend_from_slice(&b.raw);
                    announced += u64::from(b.events);
                    if let Some(Ending::Error(p)) = &b.ending {
                        assert!(edgeroute_proto::sse::is_error_payload(p) || p.is_empty());
                    }
                }
                Ok(None) => break,
                Err(_) => break 'batches,
            }
        }
    }
    let mut re = SseDecoder::new(usize::MAX);
    re.push(&forwarded);
    let mut data_events = 0u64;
    while let Some(ev) = re.next_event().expect("no limit, no error") {
        match ev {
            SseEvent::Data(_) => data_events += 1,
            SseEvent::Done => panic!("[DONE] was forwarded inside a batch"),
        }
    }
    assert_eq!(data_events, announced, "a batch announced a different number of events");
});
