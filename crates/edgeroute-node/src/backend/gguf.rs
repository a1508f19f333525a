//! Reads the chat template and special tokens out of a GGUF file's metadata (the format
//! llama.cpp serves), without touching the tensors.
//!
//! Layout (GGUF v2/v3, little-endian): magic `GGUF`, version u32, tensor count u64, metadata
//! count u64, then `count` entries of key (u64 length + UTF-8), value type u32, value. Every
//! length read from the file is bounded before anything is allocated, so a corrupt or hostile
//! file gives an error, never an out-of-memory.

use std::io::{BufReader, Read};
use std::path::Path;

/// Largest string accepted in metadata (chat templates are a few KiB; token strings a few bytes).
const MAX_STRING: u64 = 4 * 1024 * 1024;
/// Most elements in one metadata array (vocabularies are ~32k–256k tokens).
const MAX_ARRAY: u64 = 4 * 1024 * 1024;
/// Most metadata entries.
const MAX_ENTRIES: u64 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("reading the file failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (bad magic)")]
    NotGguf,
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    Version(u32),
    #[error("malformed metadata: {0}")]
    Malformed(String),
}

/// What continuation needs from a GGUF model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GgufChat {
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// The BOS token's text (`tokenizer.ggml.tokens[tokenizer.ggml.bos_token_id]`).
    pub bos_token: Option<String>,
    /// The EOS token's text.
    pub eos_token: Option<String>,
}

pub fn read_chat(path: &Path) -> Result<GgufChat, GgufError> {
    let file = std::fs::File::open(path)?;
    parse(BufReader::with_capacity(256 * 1024, file))
}

/// Parses the metadata section from `r`.
pub fn parse(mut r: impl Read) -> Result<GgufChat, GgufError> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)?;
    if &magic != b"GGUF" {
        return Err(GgufError::NotGguf);
    }
    let version = u32_le(&mut r)?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let _tensors = u64_le(&mut r)?;
    let entries = u64_le(&mut r)?;
    if entries > MAX_ENTRIES {
        return Err(GgufError::Malformed(format!("{entries} metadata entries")));
    }
    let mut out = GgufChat::default();
    let (mut bos, mut eos, mut tokens) = (None, None, None::<Vec<String>>);
    for _ in 0..entries {
        let key = string(&mut r)?;
        let ty = u32_le(&mut r)?;
        match key.as_str() {
            "tokenizer.chat_template" if ty == STRING => out.chat_template = Some(string(&mut r)?),
            "tokenizer.ggml.bos_token_id" => bos = integer(&mut r, ty)?,
            "tokenizer.ggml.eos_token_id" => eos = integer(&mut r, ty)?,
            "tokenizer.ggml.tokens" if ty == ARRAY => {
                let elem = u32_le(&mut r)?;
                let n = bounded(u64_le(&mut r)?, MAX_ARRAY, "array")?;
                if elem != STRING {
                    return Err(GgufError::Malformed(
                        "tokenizer.ggml.tokens is not strings".into(),
                    ));
                }
                let mut v = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    v.push(string(&mut r)?);
                }
                tokens = Some(v);
            }
            _ => skip(&mut r, ty)?,
        }
    }
    let text = |id: Option<u64>| {
        let (tokens, id) = (tokens.as_ref()?, usize::try_from(id?).ok()?);
        tokens.get(id).cloned()
    };
    out.bos_token = text(bos);
    out.eos_token = text(eos);
    Ok(out)
}

const U8: u32 = 0;
const I8: u32 = 1;
const U16: u32 = 2;
const I16: u32 = 3;
const U32: u32 = 4;
const I32: u32 = 5;
const F32: u32 = 6;
const BOOL: u32 = 7;
const STRING: u32 = 8;
const ARRAY: u32 = 9;
const U64: u32 = 10;
const I64: u32 = 11;
const F64: u32 = 12;

fn bounded(n: u64, max: u64, what: &str) -> Result<u64, GgufError> {
    if n > max {
        return Err(GgufError::Malformed(format!("{what} of {n} exceeds the limit of {max}")));
    }
    Ok(n)
}

fn u32_le(r: &mut impl Read) -> Result<u32, GgufError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn u64_le(r: &mut impl Read) -> Result<u64, GgufError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn string(r: &mut impl Read) -> Result<String, GgufError> {
    let n = bounded(u64_le(r)?, MAX_STRING, "string")?;
    let mut b = Vec::with_capacity(n as usize);
    (&mut *r).take(n).read_to_end(&mut b)?;
    if b.len() as u64 != n {
        return Err(GgufError::Malformed("string runs past the end of the file".into()));
    }
    String::from_utf8(b).map_err(|_| GgufError::Malformed("string is not UTF-8".into()))
}

/// An unsigned or signed integer of any width, as u64 (negative ids are treated as absent).
fn integer(r: &mut impl Read, ty: u32) -> Result<Option<u64>, GgufError> {
    let width = scalar_width(ty).ok_or_else(|| {
        GgufError::Malformed(format!("a token id has value type {ty}, not an integer"))
    })?;
    let mut b = [0u8; 8];
    r.read_exact(&mut b[..width])?;
    let v = u64::from_le_bytes(b);
    let negative = match ty {
        I8 => b[0] & 0x80 != 0,
        I16 => b[1] & 0x80 != 0,
        I32 => b[3] & 0x80 != 0,
        I64 => b[7] & 0x80 != 0,
        U8 | U16 | U32 | U64 => false,
        _ => return Err(GgufError::Malformed(format!("a token id has value type {ty}"))),
    };
    Ok((!negative).then_some(v))
}

fn scalar_width(ty: u32) -> Option<usize> {
    Some(match ty {
        U8 | I8 | BOOL => 1,
        U16 | I16 => 2,
        U32 | I32 | F32 => 4,
        U64 | I64 | F64 => 8,
        _ => return None,
    })
}

fn skip(r: &mut impl Read, ty: u32) -> Result<(), GgufError> {
    let discard = |r: &mut dyn Read, n: u64| -> Result<(), GgufError> {
        let copied = std::io::copy(&mut (&mut *r).take(n), &mut std::io::sink())?;
        if copied != n {
            return Err(GgufError::Malformed("value runs past the end of the file".into()));
        }
        Ok(())
    };
    if let Some(w) = scalar_width(ty) {
        return discard(r, w as u64);
    }
    match ty {
        STRING => {
            let n = bounded(u64_le(r)?, MAX_STRING, "string")?;
            discard(r, n)
        }
        ARRAY => {
            let elem = u32_le(r)?;
            let n = bounded(u64_le(r)?, MAX_ARRAY, "array")?;
            match scalar_width(elem) {
                Some(w) => discard(r, n * w as u64),
                None if elem == STRING => (0..n).try_for_each(|_| {
                    let len = bounded(u64_le(r)?, MAX_STRING, "string")?;
                    discard(r, len)
                }),
                None => Err(GgufError::Malformed(format!("array of value type {elem}"))),
            }
        }
        _ => Err(GgufError::Malformed(format!("unknown value type {ty}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a GGUF v3 header with the given metadata entries.
    struct Writer(Vec<u8>, u64);

    impl Writer {
        fn new() -> Self {
            Writer(Vec::new(), 0)
        }
        fn str(&mut self, s: &str) {
            self.0.extend_from_slice(&(s.len() as u64).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
        }
        fn key(&mut self, k: &str, ty: u32) {
            self.1 += 1;
            self.str(k);
            self.0.extend_from_slice(&ty.to_le_bytes());
        }
        fn finish(self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&0u64.to_le_bytes());
            out.extend_from_slice(&self.1.to_le_bytes());
            out.extend(self.0);
            out
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = Writer::new();
        w.key("general.name", STRING);
        w.str("tiny");
        w.key("general.alignment", U32);
        w.0.extend_from_slice(&32u32.to_le_bytes());
        w.key("tokenizer.ggml.scores", ARRAY);
        w.0.extend_from_slice(&F32.to_le_bytes());
        w.0.extend_from_slice(&3u64.to_le_bytes());
        w.0.extend_from_slice(&[0u8; 12]);
        w.key("tokenizer.ggml.tokens", ARRAY);
        w.0.extend_from_slice(&STRING.to_le_bytes());
        w.0.extend_from_slice(&3u64.to_le_bytes());
        for t in ["<unk>", "<s>", "</s>"] {
            w.str(t);
        }
        w.key("tokenizer.ggml.bos_token_id", U32);
        w.0.extend_from_slice(&1u32.to_le_bytes());
        w.key("tokenizer.ggml.eos_token_id", I32);
        w.0.extend_from_slice(&2i32.to_le_bytes());
        w.key("tokenizer.chat_template", STRING);
        w.str("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}");
        w.finish()
    }

    #[test]
    fn reads_the_template_and_special_tokens() {
        let got = parse(&sample()[..]).unwrap();
        assert_eq!(
            got,
            GgufChat {
                chat_template: Some(
                    "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}".into()
                ),
                bos_token: Some("<s>".into()),
                eos_token: Some("</s>".into()),
            }
        );
    }

    #[test]
    fn refuses_bad_input_without_panicking_or_allocating() {
        assert!(matches!(parse(&b"GGML\0\0\0\0"[..]), Err(GgufError::NotGguf)));
        let mut v1 = b"GGUF".to_vec();
        v1.extend_from_slice(&1u32.to_le_bytes());
        assert!(matches!(parse(&v1[..]), Err(GgufError::Version(1))));
        // Every truncation of a valid file is an error, not a panic.
        let full = sample();
        for cut in 0..full.len() {
            assert!(parse(&full[..cut]).is_err(), "truncated at {cut} parsed");
        }
        // A huge declared string length is refused before allocating.
        let mut w = Writer::new();
        w.0.extend_from_slice(&u64::MAX.to_le_bytes());
        w.1 = 1;
        assert!(matches!(parse(&w.finish()[..]), Err(GgufError::Malformed(_))));
    }
}
