//! Embeddings: a deterministic unit vector per input text, pure.
//!
//! Component `i` of an input's vector is a uniform draw in [-1, 1) from splitmix64 of a key
//! (hashed from the seed, the model and the text) and `i`; the vector is then L2-normalised.
//! So identical inputs get identical vectors, different ones (practically) orthogonal ones,
//! and a shorter vector is the renormalised prefix of a longer one, as OpenAI's
//! `dimensions` shortening is. [`expected_embedding`] predicts every vector.
//!
//! Tokens are counted as OpenAI's rule of thumb has it: one per four bytes, rounded up.

use crate::config::SimConfig;
use crate::error::SimError;
use crate::text::{mix_bytes, splitmix64};

/// Dimensions when the request names none.
pub const DEFAULT_EMBEDDING_DIMENSIONS: u32 = 384;
/// The most dimensions a request may ask for.
pub const MAX_EMBEDDING_DIMENSIONS: u32 = 4096;
/// The most inputs in one request (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;
/// The most tokens in one input (OpenAI's limit for its embedding models).
pub const MAX_EMBEDDING_INPUT_TOKENS: u32 = 8192;
/// The most tokens in one request, all inputs together (OpenAI's limit).
pub const MAX_EMBEDDING_TOTAL_TOKENS: u32 = 300_000;

const EMBED_SALT: u64 = 0x656D_6265_6464_696E;

/// An input's size in tokens, as the simulator counts them: a token per four bytes, rounded
/// up. Usage reports and the latency model use it.
pub fn embedding_tokens(input: &str) -> u32 {
    u32::try_from(input.len().div_ceil(4)).unwrap_or(u32::MAX)
}

/// Checks a request's inputs and dimensions; returns the dimensions and the total tokens.
/// Refuses (param `input`) no inputs, more than [`MAX_EMBEDDING_INPUTS`], an empty input,
/// one over [`MAX_EMBEDDING_INPUT_TOKENS`] or all over [`MAX_EMBEDDING_TOTAL_TOKENS`], and
/// (param `dimensions`) 0 or more than [`MAX_EMBEDDING_DIMENSIONS`].
pub(crate) fn check(inputs: &[String], dimensions: Option<u32>) -> Result<(u32, u32), SimError> {
    let dims = dimensions.unwrap_or(DEFAULT_EMBEDDING_DIMENSIONS);
    if dims == 0 || dims > MAX_EMBEDDING_DIMENSIONS {
        return Err(SimError::invalid(
            "dimensions",
            "invalid_dimensions",
            format!("`dimensions` must be between 1 and {MAX_EMBEDDING_DIMENSIONS}; got {dims}."),
        ));
    }
    if inputs.is_empty() {
        return Err(SimError::invalid("input", "empty_input", "`input` has no items."));
    }
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(SimError::invalid(
            "input",
            "too_many_inputs",
            format!(
                "`input` has {} items; at most {MAX_EMBEDDING_INPUTS} are allowed.",
                inputs.len()
            ),
        ));
    }
    let mut total = 0u32;
    for (i, input) in inputs.iter().enumerate() {
        if input.is_empty() {
            return Err(SimError::invalid(
                "input",
                "empty_input",
                format!("`input[{i}]` is empty."),
            ));
        }
        let tokens = embedding_tokens(input);
        if tokens > MAX_EMBEDDING_INPUT_TOKENS {
            return Err(SimError::invalid(
                "input",
                "input_too_long",
                format!(
                    "`input[{i}]` is {tokens} tokens; the most allowed is \
                     {MAX_EMBEDDING_INPUT_TOKENS}."
                ),
            ));
        }
        total = total.saturating_add(tokens);
    }
    if total > MAX_EMBEDDING_TOTAL_TOKENS {
        return Err(SimError::invalid(
            "input",
            "input_too_long",
            format!(
                "`input` is {total} tokens in all; the most allowed is \
                 {MAX_EMBEDDING_TOTAL_TOKENS}."
            ),
        ));
    }
    Ok((dims, total))
}

/// The key an input's vector is drawn from.
pub(crate) fn embedding_key(seed: u64, model: &str, input: &str) -> u64 {
    mix_bytes(mix_bytes(seed ^ EMBED_SALT, model.as_bytes()), input.as_bytes())
}

/// The unit vector of `dims` components drawn from `key`.
pub(crate) fn vector(key: u64, dims: u32) -> Vec<f32> {
    let raw: Vec<f64> = (0..u64::from(dims))
        .map(|i| {
            let x = splitmix64(key.wrapping_add(i.wrapping_mul(0xA076_1D64_78BD_642F)));
            // The top 53 bits as a fraction in [0, 1), mapped to [-1, 1).
            (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        // Never drawn in practice; a unit vector all the same.
        let mut v = vec![0.0; raw.len()];
        v[0] = 1.0;
        return v;
    }
    raw.iter().map(|x| (x / norm) as f32).collect()
}

/// Exactly the vector a fault-free request gives `input` for `model`, or the error the
/// request fails with before queueing.
pub fn expected_embedding(
    cfg: &SimConfig,
    model: &str,
    input: &str,
    dimensions: Option<u32>,
) -> Result<Vec<f32>, SimError> {
    let inputs = [input.to_owned()];
    let (dims, _) = check(&inputs, dimensions)?;
    Ok(vector(embedding_key(cfg.seed, model, input), dims))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
    }

    #[test]
    fn vectors_are_deterministic_unit_length_and_distinct() {
        let cfg = SimConfig::default();
        let a = expected_embedding(&cfg, "m", "hello", None).unwrap();
        assert_eq!(a.len(), 384);
        assert_eq!(a, expected_embedding(&cfg, "m", "hello", None).unwrap());
        assert!((dot(&a, &a) - 1.0).abs() < 1e-5);
        let b = expected_embedding(&cfg, "m", "hello!", None).unwrap();
        assert!(dot(&a, &b).abs() < 0.3, "unrelated texts are far apart");
        // Another model or seed embeds differently.
        assert_ne!(a, expected_embedding(&cfg, "m2", "hello", None).unwrap());
        let seeded = SimConfig { seed: 7, ..SimConfig::default() };
        assert_ne!(a, expected_embedding(&seeded, "m", "hello", None).unwrap());
        // Components spread over both signs.
        assert!(a.iter().any(|x| *x > 0.0) && a.iter().any(|x| *x < 0.0));
    }

    #[test]
    fn a_shorter_vector_is_the_renormalised_prefix() {
        let cfg = SimConfig::default();
        let long = expected_embedding(&cfg, "m", "text", Some(4096)).unwrap();
        let short = expected_embedding(&cfg, "m", "text", Some(8)).unwrap();
        assert_eq!(long.len(), 4096);
        let scale = short[0] / long[0];
        for (s, l) in short.iter().zip(&long) {
            assert!((s - l * scale).abs() < 1e-5);
        }
        let one = expected_embedding(&cfg, "m", "text", Some(1)).unwrap();
        assert_eq!(one.len(), 1);
        assert!((one[0].abs() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn limits_are_enforced_with_the_param_named() {
        let code = |inputs: Vec<String>, dims: Option<u32>| match check(&inputs, dims) {
            Err(SimError::InvalidInput { param, code, .. }) => (param, code),
            other => panic!("{other:?}"),
        };
        let one = || vec!["x".to_owned()];
        assert_eq!(code(one(), Some(0)), ("dimensions", "invalid_dimensions"));
        assert_eq!(code(one(), Some(4097)), ("dimensions", "invalid_dimensions"));
        assert_eq!(code(vec![], None), ("input", "empty_input"));
        assert_eq!(code(vec!["a".into(), String::new()], None), ("input", "empty_input"));
        assert_eq!(code(vec!["x".into(); 2049], None), ("input", "too_many_inputs"));
        assert_eq!(code(vec!["x".repeat(32_769)], None), ("input", "input_too_long"));
        // Each input within its limit, together beyond the request's.
        assert_eq!(code(vec!["x".repeat(32_768); 37], None), ("input", "input_too_long"));
        assert_eq!(check(&vec!["x".into(); 2048], Some(4096)), Ok((4096, 2048)));
        assert_eq!(check(&["abcde".to_owned()], None), Ok((384, 2)));
        assert_eq!((embedding_tokens("abcd"), embedding_tokens("abcde")), (1, 2));
    }
}
