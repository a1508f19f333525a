//! Reading a JSON request body with a size limit and errors that name the offending field.

use axum::body::Body;
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;

use crate::ApiError;

/// Reads at most `limit` bytes and parses them as `T`. Errors are precise 4xx: 413 when the
/// body is too large, 400 naming the JSON path (`messages[0].role`) on a type error.
pub async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    parse_json(&read_body(body, limit).await?)
}

/// Reads at most `limit` bytes of a request body; 413 beyond.
pub async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::payload_too_large(limit))
        }
        Err(e) => {
            Err(ApiError::invalid_request(None, format!("Could not read the request body: {e}")))
        }
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::invalid_request(
            None,
            "The request body is empty; a JSON object was expected.",
        ));
    }
    // The common case pays for no path tracking; only a failure is parsed again, with
    // serde_path_to_error, to name the field at fault. The body is checked as UTF-8 once, as a
    // whole: parsed from a `&str`, serde_json checks no string again (from bytes it checks
    // each one, most of a small body's cost beyond its tokens). A body that is not UTF-8 is
    // parsed from its bytes, for the same error as before.
    let first = match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    };
    let first = match first {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let Err(e) = serde_path_to_error::deserialize::<_, T>(de) else {
        // The value itself is fine: something follows it.
        return Err(ApiError::invalid_request(
            None,
            format!("We could not parse the JSON body of your request: {first}"),
        ));
    };
    let path = e.path().to_string();
    let inner = e.into_inner();
    Err(if inner.is_syntax() || inner.is_eof() {
        ApiError::invalid_request(
            None,
            format!("We could not parse the JSON body of your request: {inner}"),
        )
    } else if path == "." {
        ApiError::invalid_request(None, format!("Invalid request body: {inner}"))
    } else {
        ApiError::invalid_request(Some(&path), format!("Invalid value for '{path}': {inner}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct T {
        a: Vec<Inner>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    #[tokio::test]
    async fn errors_are_precise() {
        let e =
            read_json::<T>(Body::from("{\"a\":[{\"n\":1},{\"n\":\"x\"}]}"), 100).await.unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.body.error.param.as_deref(), Some("a[1].n"));
        let e = read_json::<T>(Body::from("{\"a\":"), 100).await.unwrap_err();
        assert!(e.body.error.message.contains("parse"), "{e}");
        let e = read_json::<T>(Body::from(vec![b' '; 101]), 100).await.unwrap_err();
        assert_eq!(e.status, 413);
        let e = read_json::<T>(Body::empty(), 100).await.unwrap_err();
        assert!(e.body.error.message.contains("empty"));
        assert!(read_json::<T>(Body::from("{\"a\":[]}"), 100).await.is_ok());
        assert!(read_json::<T>(Body::from(" {\"a\":[]}\n "), 100).await.is_ok());
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Text {
        s: String,
    }

    /// A UTF-8 body is parsed from text, any other from bytes: either way the same value or
    /// the same error as parsing the bytes.
    #[test]
    fn text_and_bytes_parse_alike() {
        let bodies: [&[u8]; 8] = [
            "{\"s\":\"héllo \\u00e9 ✓\"}".as_bytes(),
            b"{\"s\":1}",
            b"{\"s\":\"a\"",
            b"{\"s\":\"\\ud800\"}",
            b"{\"s\":\"\xff\"}",
            b"{\"s\":\"a\",\"s\":\"b\"}",
            b"[\"a\"]",
            b"{\"s\":\"a\"}\xff",
        ];
        for body in bodies {
            let ours = parse_json::<Text>(body);
            match serde_json::from_slice::<Text>(body) {
                Ok(v) => assert_eq!(ours.unwrap(), v),
                Err(e) => {
                    let ours = ours.unwrap_err();
                    assert_eq!(ours.status, 400);
                    let inner = e.to_string();
                    let msg = &ours.body.error.message;
                    assert!(
                        msg.contains(&inner) || e.classify() == serde_json::error::Category::Data,
                        "{msg} / {inner}"
                    );
                }
            }
        }
        assert_eq!(
            parse_json::<Text>("{\"s\":\"héllo\"}".as_bytes()).unwrap(),
            Text { s: "héllo".into() }
        );
        let e = parse_json::<Text>(b"{\"s\":\"\xff\"}").unwrap_err();
        assert!(e.body.error.message.contains("invalid unicode code point"), "{e}");
    }

    #[test]
    fn nothing_may_follow_the_value() {
        let e = parse_json::<T>(b"{\"a\":[]} {\"a\":[]}").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.body.error.message.contains("trailing"), "{e}");
        assert!(parse_json::<T>(b"{\"a\":[]}garbage").is_err());
    }
}
