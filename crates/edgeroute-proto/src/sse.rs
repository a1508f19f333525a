//! Server-sent events as OpenAI-compatible servers use them: `data: <json>\n\n`, ending with
//! `data: [DONE]\n\n`.
//!
//! [`SseDecoder`] is incremental and zero-copy where it can be: feed it bytes as they arrive
//! and take out whole events; a payload on a single `data:` line is a slice of the input
//! buffer. It bounds the size of an incomplete event so a hostile upstream cannot grow memory
//! without limit.

use bytes::{Buf, Bytes, BytesMut};

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseEvent {
    /// The JSON payload of a `data:` event.
    Data(Bytes),
    /// `data: [DONE]`: the stream finished cleanly.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("SSE event larger than {0} bytes")]
    TooLarge(usize),
}

/// Encodes a payload as one SSE data event.
pub fn data_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 8);
    b.extend_from_slice(b"data: ");
    b.extend_from_slice(payload);
    b.extend_from_slice(b"\n\n");
    b.freeze()
}

pub const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

#[derive(Debug)]
pub struct SseDecoder {
    buf: BytesMut,
    max_event: usize,
    /// How far `buf` has been scanned for an event boundary, so bytes are not rescanned.
    scanned: usize,
}

impl SseDecoder {
    pub fn new(max_event: usize) -> Self {
        SseDecoder { buf: BytesMut::new(), max_event, scanned: 0 }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer of bytes not yet decoded, for a reader that appends to it directly (what
    /// [`SseDecoder::push`] does, without a copy in between). Bytes may only be appended.
    pub fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// True when bytes of an unfinished event are buffered.
    pub fn has_partial(&self) -> bool {
        self.buf.iter().any(|b| !b.is_ascii_whitespace())
    }

    /// The next complete event, if one is buffered. Events without data (comments, `event:`
    /// or `id:` only) are skipped.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, SseError> {
        loop {
            let Some((end, sep)) = self.find_boundary() else {
                if self.buf.len() > self.max_event {
                    return Err(SseError::TooLarge(self.max_event));
                }
                return Ok(None);
            };
            let raw = self.buf.split_to(end).freeze();
            self.buf.advance(sep);
            self.scanned = 0;
            if let Some(ev) = parse_event(raw) {
                return Ok(Some(ev));
            }
        }
    }

    /// Takes every complete event buffered, as one contiguous slice of the input ready to be
    /// forwarded verbatim, stopping before `[DONE]` or an error event (`{"error": ...}`).
    /// Returns `None` when no complete event is buffered. Pass-through proxies use this to
    /// forward what arrived in one write, as nginx does, while still seeing every event.
    pub fn next_batch(&mut self) -> Result<Option<Batch>, SseError> {
        let mut end = 0usize; // bytes of `buf` covered by whole events in the batch
        let mut events = 0u32;
        let mut stop = None;
        let mut scan = 0usize;
        // The first boundary is searched for from where the last call stopped looking (less
        // the 3 bytes a separator split across pushes may have started in); events are still
        // classified from their start.
        let mut from = self.scanned.saturating_sub(3);
        while let Some((ev_end, sep, single)) = boundary(&self.buf, scan.max(from)) {
            // A search from the event's start that met no line end before the boundary saw
            // a one-line event (the usual `data: {...}`): classified without a second scan.
            let one_line = single && from <= scan;
            from = 0;
            let next = ev_end + sep;
            let ev = &self.buf[scan..ev_end];
            match if one_line { classify_line(ev) } else { classify(ev) } {
                Kind::Empty => {}
                Kind::Done => {
                    stop = Some((Stop::Done, scan, next));
                    break;
                }
                Kind::Error => {
                    let payload = parse_event(Bytes::copy_from_slice(&self.buf[scan..ev_end]));
                    let d = match payload {
                        Some(SseEvent::Data(d)) => d,
                        _ => Bytes::new(),
                    };
                    stop = Some((Stop::Error(d), scan, next));
                    break;
                }
                Kind::Data => events += 1,
            }
            end = next;
            scan = next;
        }
        if end == 0 && stop.is_none() {
            self.scanned = self.buf.len();
            if self.buf.len() > self.max_event {
                return Err(SseError::TooLarge(self.max_event));
            }
            return Ok(None);
        }
        let raw = self.buf.split_to(end).freeze();
        let ending = match stop {
            None => None,
            Some((kind, start, next)) => {
                self.buf.advance(next - start);
                Some(match kind {
                    Stop::Done => Ending::Done,
                    Stop::Error(d) => Ending::Error(d),
                })
            }
        };
        self.scanned = 0;
        Ok(Some(Batch { raw, events, ending }))
    }

    /// Finds the end of the first event (`\n\n`, `\r\n\r\n` or `\r\r`), as (end, separator length).
    fn find_boundary(&mut self) -> Option<(usize, usize)> {
        let found = boundary_from(&self.buf, self.scanned.saturating_sub(3));
        if found.is_none() {
            self.scanned = self.buf.len();
        }
        found
    }
}

/// What [`SseDecoder::next_batch`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Whole events, byte for byte as received (may be empty when the batch is only an ending).
    pub raw: Bytes,
    /// Data events in `raw`.
    pub events: u32,
    /// Set when the stream's end was reached after `raw`.
    pub ending: Option<Ending>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// `data: [DONE]`, consumed and not part of `raw`.
    Done,
    /// An error event's payload, consumed and not part of `raw`.
    Error(Bytes),
}

enum Stop {
    Done,
    Error(Bytes),
}

/// An error event looks like `{"error": ...}`; checking the prefix avoids parsing every chunk.
pub fn is_error_payload(c: &[u8]) -> bool {
    let t = c.trim_ascii_start();
    t.strip_prefix(b"{").is_some_and(|r| r.trim_ascii_start().starts_with(b"\"error\""))
}

enum Kind {
    /// No data line (a comment or `event:`/`id:` only).
    Empty,
    Done,
    Error,
    Data,
}

/// Classifies one raw event without copying it: what `parse_event` would return, minus the
/// payload.
fn classify(ev: &[u8]) -> Kind {
    let mut first: Option<&[u8]> = None;
    let mut lines = 0;
    // The lines between `\n`s and `\r`s (empty ones included), as `split` on either gives.
    let mut start = 0;
    loop {
        let eol = find_eol(ev, start);
        let line = &ev[start..eol.unwrap_or(ev.len())];
        if let Some(v) = line.strip_prefix(b"data:") {
            lines += 1;
            first.get_or_insert(v.strip_prefix(b" ").unwrap_or(v));
        }
        match eol {
            Some(i) => start = i + 1,
            None => break,
        }
    }
    kind(first, lines)
}

/// [`classify`] for an event known to hold no `\n` or `\r`: one line.
fn classify_line(ev: &[u8]) -> Kind {
    let first = ev.strip_prefix(b"data:").map(|v| v.strip_prefix(b" ").unwrap_or(v));
    kind(first, usize::from(first.is_some()))
}

fn kind(first: Option<&[u8]>, data_lines: usize) -> Kind {
    match first {
        None => Kind::Empty,
        Some(b"[DONE]") if data_lines == 1 => Kind::Done,
        Some(v) if is_error_payload(v) => Kind::Error,
        Some(_) => Kind::Data,
    }
}

/// The first `\n` or `\r` in `b` at or after `from` (`memchr`'s vectorised search: most of
/// an event is its JSON payload, which holds neither).
fn find_eol(b: &[u8], from: usize) -> Option<usize> {
    memchr::memchr2(b'\n', b'\r', b.get(from..)?).map(|i| from + i)
}

fn boundary_from(b: &[u8], start: usize) -> Option<(usize, usize)> {
    boundary(b, start).map(|(end, sep, _)| (end, sep))
}

/// The first event boundary at or after `start`, as (end, separator length, whether no line
/// end came before it).
fn boundary(b: &[u8], start: usize) -> Option<(usize, usize, bool)> {
    let mut i = start;
    let mut single = true;
    while let Some(at) = find_eol(b, i) {
        i = at;
        match b[i] {
            b'\n' if b.get(i + 1) == Some(&b'\n') => return Some((i, 2, single)),
            b'\r'
                if b.get(i + 1) == Some(&b'\n')
                    && b.get(i + 2) == Some(&b'\r')
                    && b.get(i + 3) == Some(&b'\n') =>
            {
                return Some((i, 4, single));
            }
            b'\r' if b.get(i + 1) == Some(&b'\r') => return Some((i, 2, single)),
            _ => {}
        }
        single = false;
        i += 1;
    }
    None
}

fn parse_event(raw: Bytes) -> Option<SseEvent> {
    let mut single: Option<Bytes> = None;
    let mut joined: Option<Vec<u8>> = None;
    let mut pos = 0;
    while pos < raw.len() {
        let rest = &raw[pos..];
        let len = find_eol(rest, 0).unwrap_or(rest.len());
        let line_start = pos;
        pos += len;
        // Skip the line terminator (\n, \r or \r\n).
        if raw.get(pos) == Some(&b'\r') {
            pos += 1;
        }
        if raw.get(pos) == Some(&b'\n') {
            pos += 1;
        }
        let line = &raw[line_start..line_start + len];
        let Some(value) = line.strip_prefix(b"data:") else { continue };
        let offset = line_start + 5 + usize::from(value.first() == Some(&b' '));
        let value = raw.slice(offset..line_start + len);
        match (&mut single, &mut joined) {
            (None, None) => single = Some(value),
            (Some(first), None) => {
                let mut v = first.to_vec();
                v.push(b'\n');
                v.extend_from_slice(&value);
                joined = Some(v);
            }
            (_, Some(v)) => {
                v.push(b'\n');
                v.extend_from_slice(&value);
            }
        }
    }
    let data = match joined {
        Some(v) => Bytes::from(v),
        None => single?,
    };
    if &data[..] == b"[DONE]" { Some(SseEvent::Done) } else { Some(SseEvent::Data(data)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(d: &mut SseDecoder) -> Vec<SseEvent> {
        std::iter::from_fn(|| d.next_event().unwrap()).collect()
    }

    #[test]
    fn decodes_openai_stream_split_anywhere() {
        let wire = b"data: {\"a\":1}\n\n: keep-alive\n\ndata:{\"b\":2}\r\n\r\ndata: [DONE]\n\n";
        for cut in 0..wire.len() {
            let mut d = SseDecoder::new(1024);
            d.push(&wire[..cut]);
            let mut evs = all(&mut d);
            d.push(&wire[cut..]);
            evs.extend(all(&mut d));
            assert_eq!(
                evs,
                vec![
                    SseEvent::Data(Bytes::from_static(b"{\"a\":1}")),
                    SseEvent::Data(Bytes::from_static(b"{\"b\":2}")),
                    SseEvent::Done
                ],
                "cut at {cut}"
            );
            assert!(!d.has_partial());
        }
    }

    #[test]
    fn multiline_data_is_joined_and_partial_is_visible() {
        let mut d = SseDecoder::new(1024);
        d.push(b"event: x\ndata: a\ndata: b\n\ndata: {\"c\"");
        assert_eq!(d.next_event().unwrap(), Some(SseEvent::Data(Bytes::from_static(b"a\nb"))));
        assert_eq!(d.next_event().unwrap(), None);
        assert!(d.has_partial());
    }

    #[test]
    fn oversized_event_is_an_error() {
        let mut d = SseDecoder::new(8);
        d.push(b"data: 0123456789");
        assert_eq!(d.next_event(), Err(SseError::TooLarge(8)));
    }

    #[test]
    fn frames_round_trip() {
        let mut d = SseDecoder::new(1024);
        d.push(&data_frame(b"{\"x\":true}"));
        d.push(DONE_FRAME);
        assert_eq!(
            all(&mut d),
            vec![SseEvent::Data(Bytes::from_static(b"{\"x\":true}")), SseEvent::Done]
        );
    }

    #[test]
    fn batches_forward_whole_events_verbatim_and_stop_at_endings() {
        let mut d = SseDecoder::new(1024);
        d.push(b"data: {\"a\":1}\n\n: ping\n\ndata: {\"b\":2}\n\ndata: {\"c\"");
        let b = d.next_batch().unwrap().unwrap();
        assert_eq!(&b.raw[..], &b"data: {\"a\":1}\n\n: ping\n\ndata: {\"b\":2}\n\n"[..]);
        assert_eq!((b.events, b.ending), (2, None));
        assert_eq!(d.next_batch().unwrap(), None, "a partial event is held back");
        d.push(b":3}\n\ndata: [DONE]\n\ndata: trailing\n\n");
        let b = d.next_batch().unwrap().unwrap();
        assert_eq!(&b.raw[..], &b"data: {\"c\":3}\n\n"[..]);
        assert_eq!(b.ending, Some(Ending::Done));

        let mut d = SseDecoder::new(1024);
        d.push(b"data: {\"x\":1}\n\ndata: { \"error\": {\"message\":\"boom\"}}\n\n");
        let b = d.next_batch().unwrap().unwrap();
        assert_eq!(b.events, 1);
        assert!(matches!(b.ending, Some(Ending::Error(ref e)) if e.starts_with(b"{ \"error\"")));
    }

    /// The decoder as it was before its scans went eight bytes at a time (issue 13): a byte
    /// loop for boundaries and `split` for lines. The differential tests below hold the fast
    /// scans to it.
    mod reference {
        use super::super::{Kind, is_error_payload};

        pub fn boundary_from(b: &[u8], start: usize) -> Option<(usize, usize)> {
            let mut i = start;
            while i < b.len() {
                match b[i] {
                    b'\n' if b.get(i + 1) == Some(&b'\n') => return Some((i, 2)),
                    b'\r'
                        if b.get(i + 1) == Some(&b'\n')
                            && b.get(i + 2) == Some(&b'\r')
                            && b.get(i + 3) == Some(&b'\n') =>
                    {
                        return Some((i, 4));
                    }
                    b'\r' if b.get(i + 1) == Some(&b'\r') => return Some((i, 2)),
                    _ => {}
                }
                i += 1;
            }
            None
        }

        pub fn classify(ev: &[u8]) -> Kind {
            let mut first: Option<&[u8]> = None;
            let mut lines = 0;
            for line in ev.split(|&c| c == b'\n' || c == b'\r') {
                if let Some(v) = line.strip_prefix(b"data:") {
                    lines += 1;
                    first.get_or_insert(v.strip_prefix(b" ").unwrap_or(v));
                }
            }
            match first {
                None => Kind::Empty,
                Some(b"[DONE]") if lines == 1 => Kind::Done,
                Some(v) if is_error_payload(v) => Kind::Error,
                Some(_) => Kind::Data,
            }
        }
    }

    /// The old `next_batch` on a plain buffer, minus the remembered scan position.
    fn reference_next_batch(
        buf: &mut BytesMut,
        max_event: usize,
    ) -> Result<Option<Batch>, SseError> {
        let mut end = 0usize;
        let mut events = 0u32;
        let mut stop = None;
        let mut scan = 0usize;
        while let Some((ev_end, sep)) = reference::boundary_from(buf, scan) {
            let next = ev_end + sep;
            match reference::classify(&buf[scan..ev_end]) {
                Kind::Empty => {}
                Kind::Done => {
                    stop = Some((Stop::Done, scan, next));
                    break;
                }
                Kind::Error => {
                    let d = match parse_event(Bytes::copy_from_slice(&buf[scan..ev_end])) {
                        Some(SseEvent::Data(d)) => d,
                        _ => Bytes::new(),
                    };
                    stop = Some((Stop::Error(d), scan, next));
                    break;
                }
                Kind::Data => events += 1,
            }
            end = next;
            scan = next;
        }
        if end == 0 && stop.is_none() {
            if buf.len() > max_event {
                return Err(SseError::TooLarge(max_event));
            }
            return Ok(None);
        }
        let raw = buf.split_to(end).freeze();
        let ending = match stop {
            None => None,
            Some((kind, start, next)) => {
                buf.advance(next - start);
                Some(match kind {
                    Stop::Done => Ending::Done,
                    Stop::Error(d) => Ending::Error(d),
                })
            }
        };
        Ok(Some(Batch { raw, events, ending }))
    }

    fn kind_name(k: Kind) -> &'static str {
        match k {
            Kind::Empty => "empty",
            Kind::Done => "done",
            Kind::Error => "error",
            Kind::Data => "data",
        }
    }

    #[test]
    fn find_eol_finds_the_first_line_end_from_every_offset() {
        let text = b"data: {\"a\":1}\r\n\r\nxx\n\rdata:\r\r0123456789abcdef\n";
        for len in 0..=text.len() {
            let b = &text[..len];
            for from in 0..=len + 1 {
                let naive = b
                    .get(from..)
                    .and_then(|r| r.iter().position(|&c| c == b'\n' || c == b'\r'))
                    .map(|p| from + p);
                assert_eq!(find_eol(b, from), naive, "len {len}, from {from}");
            }
        }
        // A match in every lane of a word, and bytes one off from `\n` and `\r` (a borrow
        // from a neighbouring byte must not be taken for a match).
        for lane in 0..16 {
            let mut b = [0x0bu8; 16];
            b[..lane].fill(0x0c);
            b[lane] = if lane % 2 == 0 { b'\n' } else { b'\r' };
            assert_eq!(find_eol(&b, 0), Some(lane), "lane {lane}");
        }
        assert_eq!(find_eol(&[0x09, 0x0b, 0x0c, 0x0e, 0x8a, 0x8d, 0x00, 0xff, 0x0b], 0), None);
    }

    proptest! {
        #[test]
        fn find_eol_agrees_with_a_byte_loop(
            b in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), 0u8..0x10, 0x70u8..0x90, any::<u8>()],
                0..64,
            ),
            from in 0usize..70,
        ) {
            let naive = b
                .get(from..)
                .and_then(|r| r.iter().position(|&c| c == b'\n' || c == b'\r'))
                .map(|p| from + p);
            prop_assert_eq!(find_eol(&b, from), naive);
        }

        /// The fast scans find the same boundaries and classify events the same as the byte
        /// loops, on input dense in separators and SSE fields.
        #[test]
        fn fast_scans_agree_with_the_byte_loops(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("\n"), Just("\r"), Just("\r\n"), Just("\n\n"), Just("\r\r"),
                    Just("data:"), Just("data: "), Just("[DONE]"), Just("{\"error\":1}"),
                    Just(": ping"), Just("event: x"), Just("abcdefghijklmnopq"), Just("{\"p\":7}"),
                ],
                0..40,
            ),
            start in 0usize..64,
        ) {
            let b: Vec<u8> = parts.concat().into_bytes();
            prop_assert_eq!(boundary_from(&b, start), reference::boundary_from(&b, start));
            let mut scan = 0;
            while let Some((end, sep)) = boundary_from(&b, scan) {
                let ev = &b[scan..end];
                prop_assert_eq!(kind_name(classify(ev)), kind_name(reference::classify(ev)));
                scan = end + sep;
            }
            let rest = &b[scan..];
            prop_assert_eq!(kind_name(classify(rest)), kind_name(reference::classify(rest)));
        }

        /// Batches are the same whether a stream arrives at once or in pieces (the remembered
        /// scan position must not skip a separator split across pushes).
        #[test]
        fn batches_do_not_depend_on_how_the_input_is_split(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("\n"), Just("\r"), Just("\r\n"), Just("\n\n"),
                    Just("data: "), Just("[DONE]"), Just("{\"error\":1}"), Just("xyz"),
                ],
                0..40,
            ),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let wire: Vec<u8> = parts.concat().into_bytes();
            let run = |pieces: Vec<&[u8]>| {
                let mut d = SseDecoder::new(1 << 16);
                let mut out = Vec::new();
                for p in pieces {
                    d.push(p);
                    while let Some(b) = d.next_batch().unwrap() {
                        let end = b.ending.is_some();
                        out.push(b);
                        if end {
                            return out;
                        }
                    }
                }
                out
            };
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts {
                pieces.push(&wire[at..c]);
                at = c;
            }
            pieces.push(&wire[at..]);
            // Batch by batch, the decoder answers as the old one did (a decoder goes on after
            // an ending, so keep feeding both to the end).
            let mut d = SseDecoder::new(64);
            let mut old = BytesMut::new();
            for p in &pieces {
                d.push(p);
                old.extend_from_slice(p);
                loop {
                    let (new, reference) = (d.next_batch(), reference_next_batch(&mut old, 64));
                    prop_assert_eq!(&new, &reference);
                    if !matches!(new, Ok(Some(_))) {
                        break;
                    }
                }
            }
            // Compare the concatenation of what was forwarded, the event count and the ending.
            let flat = |bs: Vec<Batch>| {
                let raw: Vec<u8> = bs.iter().flat_map(|b| b.raw.to_vec()).collect();
                let events: u32 = bs.iter().map(|b| b.events).sum();
                (raw, events, bs.last().and_then(|b| b.ending.clone()))
            };
            prop_assert_eq!(flat(run(pieces)), flat(run(vec![&wire[..]])));
        }
    }

    proptest! {
        /// Batches and single events agree: same data events, however the input is split.
        #[test]
        fn batches_agree_with_events(payloads in proptest::collection::vec("[a-z0-9 ]{0,12}", 0..8), cut in 0usize..200) {
            let mut wire = Vec::new();
            for p in &payloads {
                wire.extend_from_slice(&data_frame(format!("{{\"p\":\"{p}\"}}").as_bytes()));
            }
            wire.extend_from_slice(DONE_FRAME);
            let cut = cut.min(wire.len());
            let mut d = SseDecoder::new(4096);
            let mut raw = Vec::new();
            let mut events = 0;
            let mut done = false;
            for part in [&wire[..cut], &wire[cut..]] {
                d.push(part);
                while let Some(b) = d.next_batch().unwrap() {
                    raw.extend_from_slice(&b.raw);
                    events += b.events;
                    if b.ending == Some(Ending::Done) { done = true; }
                }
            }
            prop_assert!(done);
            prop_assert_eq!(events as usize, payloads.len());
            prop_assert_eq!(raw.len() + DONE_FRAME.len(), wire.len());
        }

        #[test]
        fn never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..10)) {
            let mut d = SseDecoder::new(256);
            for c in chunks {
                d.push(&c);
                while let Ok(Some(_)) = d.next_event() {}
                d.push(&c);
                while let Ok(Some(_)) = d.next_batch() {}
            }
        }
    }
}
