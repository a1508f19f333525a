//! The simulator's answers: a pure function of the seed, the model and the conversation.
//!
//! Nothing here knows about time, slots or faults; the engine asks this module *what* to say
//! and decides *when* on its own. Keeping it pure is what lets other crates' tests compute
//! every token a stream must carry ([`expected_answer`], [`expected_completion`]) and lets a
//! client continue a cut stream on another node with the same seed and get exactly the
//! missing tokens.
//!
//! The rules, all deterministic:
//! - **Key.** The effective seed is the config seed, mixed with the request's `seed` when it
//!   has one. It is hashed (FNV-1a, then splitmix64) together with the model id and each
//!   message's role and text. When the request continues its final assistant message, that
//!   message is left out of the key, so the answer is the same one the conversation without
//!   it would get.
//! - **Tokens.** Token `i` is a word from a fixed vocabulary picked by `splitmix64(key, i)`.
//!   Every token after the first starts with a space, so the answer text is the plain
//!   concatenation of its tokens.
//! - **Length.** Drawn from the key within `[min_answer_tokens, max_answer_tokens]`.
//! - **Continuation.** With `continue_final_message: true` and a trailing assistant message,
//!   that message's text is taken as a prefix of the answer. If it is exactly the first `k`
//!   tokens concatenated, generation resumes at token `k`. Otherwise (the client edited or
//!   trimmed it) generation resumes at token `w`, where `w` is the number of
//!   whitespace-separated words in the prefix: each token is one word, so this is the
//!   closest token boundary we can guess. Either index is clamped to the answer length.
//! - **Cap.** `max_completion_tokens` (or `max_tokens`) caps the *new* tokens; hitting it
//!   finishes with `length`, otherwise `stop`.
//! - **Prompt tokens.** An approximation, documented rather than exact: 4 per message (role
//!   and framing, as chat templates add) plus the whitespace-separated words of every
//!   message's text, including a continued assistant prefix (it is prefilled too). Counting
//!   is one linear pass over the text, without copying it, so a multi-megabyte prompt is
//!   counted (and refused, if beyond the context window) in milliseconds.

use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Content, FinishReason, Role, Usage};

use crate::config::SimConfig;

/// Words answers are made of, each with the leading space it carries after the first token.
/// Changing this list changes every answer: treat it as part of the simulator's contract.
const VOCAB: &[&str] = &[
    " the",
    " model",
    " answer",
    " is",
    " a",
    " quick",
    " response",
    " from",
    " edge",
    " node",
    " and",
    " it",
    " will",
    " route",
    " your",
    " request",
    " to",
    " nearest",
    " GPU",
    " with",
    " low",
    " latency",
    " for",
    " every",
    " token",
    " in",
    " stream",
    " we",
    " can",
    " see",
    " that",
    " this",
    " system",
    " works",
    " well",
    " under",
    " load",
    " when",
    " queue",
    " grows",
    " slowly",
    " but",
    " steady",
    " traffic",
    " keeps",
    " flowing",
    " through",
    " region",
    " of",
    " cluster",
    " so",
    " clients",
    " never",
    " wait",
    " long",
    " on",
    " dead",
    " links",
    " or",
    " busy",
    " slots",
    " because",
    " discovery",
    " ranks",
    " candidates",
    " by",
    " measured",
    " time",
    " first",
    " then",
    " health",
    " score",
    " weights",
    " each",
    " factor",
    " as",
    " policy",
    " says",
    " while",
    " operators",
    " watch",
    " metrics",
    " they",
    " trust",
    " here",
    " one",
    " simple",
    " rule",
    " holds",
    " decide",
    " once",
    " get",
    " out",
    " way",
    " voice",
    " agents",
    " need",
    " turns",
    " below",
    " three",
    " hundred",
    " milliseconds",
    " which",
    " leaves",
    " little",
    " room",
    " extra",
    " hops",
    " between",
    " user",
    " inference",
    " server",
    " at",
    " all",
    " times",
    " today",
    " tomorrow",
    " again",
    " more",
    " data",
    " flows",
    " fast",
    " now",
    " nearby",
    " there",
    " soon",
    " indeed",
    " perhaps",
    " certainly",
];

/// splitmix64's finaliser: a fast, well-mixed 64-bit permutation (Steele et al., 2014).
pub(crate) const fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Word `i` drawn from `key`, with its leading space.
fn spaced_word(key: u64, i: u32) -> &'static str {
    let draw = splitmix64(key.wrapping_add(u64::from(i).wrapping_mul(0xA076_1D64_78BD_642F)));
    // The remainder is below VOCAB.len(), so it fits in usize.
    VOCAB[(draw % VOCAB.len() as u64) as usize]
}

/// Word `i` drawn from `key`, without a leading space: the draw answers use, for other
/// deterministic text (transcripts).
pub(crate) fn word(key: u64, i: u32) -> &'static str {
    &spaced_word(key, i)[1..]
}

/// Mixes `bytes` and their length into `h`: eight bytes per splitmix64 round, so hashing
/// megabytes of audio stays cheap, and stable across Rust versions and platforms.
pub(crate) fn mix_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = splitmix64(h ^ u64::from_le_bytes(b));
    }
    let tail = words.remainder();
    let mut b = [0u8; 8];
    b[..tail.len()].copy_from_slice(tail);
    h = splitmix64(h ^ u64::from_le_bytes(b));
    splitmix64(h ^ bytes.len() as u64)
}

/// Distinct salts keep the length draw, the token draws and the fault rolls independent.
const LEN_SALT: u64 = 0x6C65_6E67_7468_5F5F;
const GARBAGE_SALT: u64 = 0x6761_7262_6167_6521;
const REQ_SEED_SALT: u64 = 0x7265_7173_6565_6421;

/// The seed answers are drawn from: the config seed, mixed with the request's own `seed`.
pub fn effective_seed(config_seed: u64, request_seed: Option<u64>) -> u64 {
    match request_seed {
        None => config_seed,
        Some(s) => splitmix64(config_seed ^ splitmix64(s ^ REQ_SEED_SALT)),
    }
}

/// FNV-1a: tiny and stable across Rust versions, unlike `std`'s hashers.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xCBF2_9CE4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
}

fn role_tag(role: Role) -> u8 {
    match role {
        Role::System => 1,
        Role::Developer => 2,
        Role::User => 3,
        Role::Assistant => 4,
        Role::Tool => 5,
        Role::Function => 6,
    }
}

/// One deterministic answer: the key its tokens are drawn from and its full length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    key: u64,
    len: u32,
}

impl Answer {
    fn new(seed: u64, model: &str, messages: &[ChatMessage], min: u32, max: u32) -> Self {
        let mut h = Fnv::new();
        h.write(&seed.to_le_bytes());
        h.write(model.as_bytes());
        for m in messages {
            // 0xFF never occurs in UTF-8, so it separates fields unambiguously.
            h.write(&[0xFF, role_tag(m.role)]);
            // FNV is a streaming hash: the pieces hash as their concatenation, `m.text()`.
            for piece in text_pieces(m) {
                h.write(piece.as_bytes());
            }
        }
        let key = splitmix64(h.0);
        let (lo, hi) = (min.min(max), max.max(min));
        let span = u64::from(hi - lo) + 1;
        // The remainder is below `span`, itself at most u32::MAX + 1, and `lo + rem <= hi`.
        let len = lo + (splitmix64(key ^ LEN_SALT) % span) as u32;
        Answer { key, len }
    }

    pub(crate) fn len(&self) -> u32 {
        self.len
    }

    /// Garbage of the same length: words drawn from a key derived from this one and `n` (the
    /// request number), so each garbage answer differs from the true one and from the others.
    pub(crate) fn garbled(self, n: u64) -> Answer {
        Answer { key: splitmix64(self.key ^ GARBAGE_SALT ^ splitmix64(n)), len: self.len }
    }

    /// Token `i`; the first has no leading space.
    pub(crate) fn token(&self, i: u32) -> &'static str {
        let word = spaced_word(self.key, i);
        if i == 0 { &word[1..] } else { word }
    }

    /// Where a continued prefix leaves off (see the module docs for the rule).
    fn resume_index(&self, prefix: &str) -> u32 {
        let mut rest = prefix;
        for i in 0..self.len {
            if rest.is_empty() {
                return i;
            }
            match rest.strip_prefix(self.token(i)) {
                Some(r) => rest = r,
                None => return words(prefix).min(self.len),
            }
        }
        if rest.is_empty() { self.len } else { words(prefix).min(self.len) }
    }
}

fn words(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

/// A message's text in the pieces it is stored in: concatenated, they are `m.text()`.
fn text_pieces(m: &ChatMessage) -> impl Iterator<Item = &str> {
    let (whole, parts) = match &m.content {
        None => (None, &[][..]),
        Some(Content::Text(t)) => (Some(t.as_str()), &[][..]),
        Some(Content::Parts(parts)) => (None, &parts[..]),
    };
    whole.into_iter().chain(parts.iter().filter_map(|p| p.text.as_deref()))
}

/// `words(&m.text())` without building the text: one pass, carrying a word across pieces
/// (`"ab"` then `"cd"` is one word, as in the joined text).
fn message_words(m: &ChatMessage) -> u32 {
    let mut count = 0u32;
    let mut in_word = false;
    for piece in text_pieces(m) {
        for c in piece.chars() {
            if c.is_whitespace() {
                in_word = false;
            } else if !in_word {
                in_word = true;
                count = count.saturating_add(1);
            }
        }
    }
    count
}

/// The approximate prompt size in tokens: 4 per message plus its whitespace-separated words.
/// Linear in the text and allocation-free.
pub fn prompt_tokens(messages: &[ChatMessage]) -> u32 {
    messages.iter().fold(0u32, |acc, m| acc.saturating_add(4).saturating_add(message_words(m)))
}

/// Everything about one request's output that does not depend on time or faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) answer: Answer,
    /// Index of the first token this request generates.
    pub(crate) start: u32,
    /// One past the last token this request generates.
    pub(crate) end: u32,
    pub(crate) finish: FinishReason,
    pub(crate) prompt_tokens: u32,
}

impl Plan {
    pub(crate) fn new(seed: u64, min: u32, max: u32, req: &ChatCompletionRequest) -> Self {
        Self::counted(seed, min, max, req, prompt_tokens(&req.messages))
    }

    /// As [`Plan::new`], for a caller that already counted `prompt_tokens(&req.messages)`.
    pub(crate) fn counted(
        seed: u64,
        min: u32,
        max: u32,
        req: &ChatCompletionRequest,
        prompt_tokens: u32,
    ) -> Self {
        let seed = effective_seed(seed, req.seed);
        let prefix = match req.messages.split_last() {
            Some((last, _))
                if req.continue_final_message == Some(true) && last.role == Role::Assistant =>
            {
                Some(last.text())
            }
            _ => None,
        };
        let keyed = if prefix.is_some() {
            &req.messages[..req.messages.len() - 1]
        } else {
            &req.messages[..]
        };
        let answer = Answer::new(seed, &req.model, keyed, min, max);
        let start = prefix.as_deref().map_or(0, |p| answer.resume_index(p));
        let remaining = answer.len - start;
        let (end, finish) = match req.token_limit() {
            Some(cap) if cap < remaining => (start + cap, FinishReason::Length),
            _ => (answer.len, FinishReason::Stop),
        };
        Plan { answer, start, end, finish, prompt_tokens }
    }

    /// Tokens this request generates.
    pub(crate) fn new_tokens(&self) -> u32 {
        self.end - self.start
    }
}

/// What one request yields when nothing goes wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedCompletion {
    /// Exactly the tokens the stream carries, in order.
    pub tokens: Vec<String>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

impl ExpectedCompletion {
    /// The tokens concatenated: the non-streaming answer's content.
    pub fn text(&self) -> String {
        self.tokens.concat()
    }
}

/// The full deterministic answer to `req`'s conversation, from its first token to its last,
/// ignoring any continued prefix and any token cap. A stream cut after `k` tokens and
/// continued elsewhere with the same seed yields `expected_answer(..)[k..]` there.
pub fn expected_answer(cfg: &SimConfig, req: &ChatCompletionRequest) -> Vec<String> {
    let plan = Plan::new(cfg.seed, cfg.min_answer_tokens, cfg.max_answer_tokens, req);
    (0..plan.answer.len()).map(|i| plan.answer.token(i).to_owned()).collect()
}

/// Exactly what a fault-free run of `req` streams: the new tokens (after any continued
/// prefix, within any cap), the finish reason and the usage.
pub fn expected_completion(cfg: &SimConfig, req: &ChatCompletionRequest) -> ExpectedCompletion {
    let plan = Plan::new(cfg.seed, cfg.min_answer_tokens, cfg.max_answer_tokens, req);
    ExpectedCompletion {
        tokens: (plan.start..plan.end).map(|i| plan.answer.token(i).to_owned()).collect(),
        finish_reason: plan.finish,
        usage: Usage::new(plan.prompt_tokens, plan.new_tokens()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> SimConfig {
        SimConfig::default()
    }

    fn req(text: &str) -> ChatCompletionRequest {
        ChatCompletionRequest::new("sim-llama", vec![ChatMessage::new(Role::User, text)])
    }

    fn continued(text: &str, prefix: &str) -> ChatCompletionRequest {
        let mut r = req(text);
        r.messages.push(ChatMessage::new(Role::Assistant, prefix));
        r.continue_final_message = Some(true);
        r
    }

    #[test]
    fn vocabulary_tokens_are_single_words_with_one_leading_space() {
        for w in VOCAB {
            assert!(w.starts_with(' ') && !w[1..].is_empty(), "{w:?}");
            assert!(!w[1..].contains(char::is_whitespace), "{w:?}");
        }
    }

    #[test]
    fn same_request_same_answer_and_spacing() {
        let a = expected_answer(&cfg(), &req("hello there"));
        assert_eq!(a, expected_answer(&cfg(), &req("hello there")));
        assert!((16..=64).contains(&a.len()), "{}", a.len());
        assert!(!a[0].starts_with(' '));
        assert!(a[1..].iter().all(|t| t.starts_with(' ')));
    }

    #[test]
    fn seeds_model_and_messages_all_change_the_answer() {
        let base = expected_answer(&cfg(), &req("hello"));
        let mut seeded = req("hello");
        seeded.seed = Some(7);
        let with_seed = expected_answer(&cfg(), &seeded);
        assert_ne!(base, with_seed);
        seeded.seed = Some(8);
        assert_ne!(with_seed, expected_answer(&cfg(), &seeded));
        let other_cfg = SimConfig { seed: 1, ..cfg() };
        assert_ne!(base, expected_answer(&other_cfg, &req("hello")));
        assert_ne!(base, expected_answer(&cfg(), &req("hello!")));
        let mut other_model = req("hello");
        other_model.model = "other".into();
        assert_ne!(base, expected_answer(&cfg(), &other_model));
    }

    #[test]
    fn length_stays_within_bounds_and_varies() {
        let c = SimConfig { min_answer_tokens: 3, max_answer_tokens: 5, ..cfg() };
        let lens: Vec<usize> =
            (0..40).map(|i| expected_answer(&c, &req(&format!("q{i}"))).len()).collect();
        assert!(lens.iter().all(|l| (3..=5).contains(l)), "{lens:?}");
        for l in 3..=5 {
            assert!(lens.contains(&l), "length {l} never drawn: {lens:?}");
        }
    }

    #[test]
    fn cap_finishes_with_length_and_counts_usage() {
        let mut r = req("hello");
        let full = expected_answer(&cfg(), &r);
        r.max_tokens = Some(5);
        let e = expected_completion(&cfg(), &r);
        assert_eq!(e.tokens, full[..5]);
        assert_eq!(e.finish_reason, FinishReason::Length);
        assert_eq!(e.usage, Usage::new(5, 5));
        // max_completion_tokens wins over max_tokens.
        r.max_completion_tokens = Some(2);
        assert_eq!(expected_completion(&cfg(), &r).tokens, full[..2]);
        // A cap at or above the answer's length is not hit.
        r.max_completion_tokens = Some(u32::try_from(full.len()).unwrap());
        let e = expected_completion(&cfg(), &r);
        assert_eq!((e.tokens.len(), e.finish_reason), (full.len(), FinishReason::Stop));
    }

    #[test]
    fn continuation_resumes_exactly_after_the_prefix() {
        let full = expected_answer(&cfg(), &req("tell me"));
        for k in [0, 1, 5, full.len() - 1, full.len()] {
            let prefix = full[..k].concat();
            let e = expected_completion(&cfg(), &continued("tell me", &prefix));
            assert_eq!(e.tokens, full[k..], "k={k}");
            assert_eq!(e.usage.completion_tokens as usize, full.len() - k);
            assert_eq!(e.finish_reason, FinishReason::Stop);
            // The continued answer is the same as the conversation without the prefix.
            assert_eq!(expected_answer(&cfg(), &continued("tell me", &prefix)), full);
        }
    }

    #[test]
    fn continuation_off_a_token_boundary_resumes_at_its_word_count() {
        let full = expected_answer(&cfg(), &req("tell me"));
        // Three words that are not the answer's: resume at token 3.
        let e = expected_completion(&cfg(), &continued("tell me", "xx yy zz"));
        assert_eq!(e.tokens, full[3..]);
        // Half a token: two whole tokens and a cut word count as three words.
        let partial = format!("{}{}", full[..2].concat(), &full[2][..2]);
        let e = expected_completion(&cfg(), &continued("tell me", &partial));
        assert_eq!(e.tokens, full[3..]);
        // A prefix longer than the answer leaves nothing to say.
        let long = format!("{} more", full.concat());
        let e = expected_completion(&cfg(), &continued("tell me", &long));
        assert!(e.tokens.is_empty());
        assert_eq!(e.finish_reason, FinishReason::Stop);
    }

    #[test]
    fn continuation_needs_the_flag_and_a_trailing_assistant() {
        let full = expected_answer(&cfg(), &req("tell me"));
        let mut r = continued("tell me", &full[..3].concat());
        r.continue_final_message = None;
        // Without the flag the assistant message is just history: a new, different answer.
        assert_ne!(expected_completion(&cfg(), &r).tokens, full[3..]);
        assert_ne!(expected_answer(&cfg(), &r), full);
    }

    #[test]
    fn cap_applies_to_new_tokens_of_a_continuation() {
        let full = expected_answer(&cfg(), &req("tell me"));
        let mut r = continued("tell me", &full[..4].concat());
        r.max_completion_tokens = Some(3);
        let e = expected_completion(&cfg(), &r);
        assert_eq!(e.tokens, full[4..7]);
        assert_eq!(e.finish_reason, FinishReason::Length);
        assert_eq!(e.usage.completion_tokens, 3);
    }

    #[test]
    fn prompt_tokens_count_words_and_messages() {
        let msgs = vec![
            ChatMessage::new(Role::System, "be brief"),
            ChatMessage::new(Role::User, "  what is\nthe time "),
        ];
        assert_eq!(prompt_tokens(&msgs), 4 + 2 + 4 + 4);
        assert_eq!(prompt_tokens(&[]), 0);
    }

    fn parts_message(pieces: &[&str]) -> ChatMessage {
        let parts = pieces
            .iter()
            .map(|t| serde_json::json!({"type": "text", "text": t}))
            .chain(std::iter::once(serde_json::json!({"type": "image_url"})))
            .collect::<Vec<_>>();
        serde_json::from_value(serde_json::json!({"role": "user", "content": parts})).unwrap()
    }

    #[test]
    fn prompt_tokens_join_text_parts_as_text_does() {
        // "ab" + "cd" is one word; a space at a part boundary separates.
        let m = parts_message(&["hello ab", "cd there", " x"]);
        assert_eq!(m.text(), "hello abcd there x");
        assert_eq!(prompt_tokens(&[m]), 4 + 4);
        assert_eq!(
            prompt_tokens(&[ChatMessage { content: None, ..ChatMessage::new(Role::User, "") }]),
            4
        );
    }

    #[test]
    fn counting_a_multi_megabyte_prompt_is_linear() {
        let big = "lorem ipsum ".repeat(300_000); // 3.6 MB, 600k words
        let msgs = vec![ChatMessage::new(Role::User, big)];
        let t = std::time::Instant::now();
        assert_eq!(prompt_tokens(&msgs), 4 + 600_000);
        // Generous for an unoptimised build on a busy machine; quadratic work takes minutes.
        assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}", t.elapsed());
    }

    proptest! {
        #[test]
        fn parts_count_and_hash_as_their_joined_text(
            pieces in proptest::collection::vec("[a-c \n]{0,6}", 0..5),
        ) {
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let m = parts_message(&refs);
            let joined = ChatMessage::new(Role::User, m.text());
            prop_assert_eq!(prompt_tokens(std::slice::from_ref(&m)), 4 + words(&m.text()));
            prop_assert_eq!(
                Answer::new(1, "m", std::slice::from_ref(&m), 1, 64),
                Answer::new(1, "m", &[joined], 1, 64)
            );
        }

        #[test]
        fn any_cut_point_continues_seamlessly(seed: u64, text in "[a-z ]{0,30}", cut in 0usize..80) {
            let c = SimConfig { seed, ..cfg() };
            let full = expected_answer(&c, &req(&text));
            let k = cut.min(full.len());
            let e = expected_completion(&c, &continued(&text, &full[..k].concat()));
            let mut joined = full[..k].to_vec();
            joined.extend(e.tokens);
            prop_assert_eq!(joined, full);
        }
    }
}
