//! Where the bearer token may go: over TLS (`https://`) to any host, over plaintext `http://`
//! only to a loopback host (`127.0.0.0/8`, `[::1]`, `localhost`) — unless the application opts
//! in to plaintext on a private network ([`crate::ClientConfig::allow_plaintext`]). Pure: the
//! URL is read, nothing is resolved or dialled, so a refusal happens before any connection.
//!
//! Applied three times: a discovery URL that fails is a configuration error at
//! [`crate::Client::new`] ([`crate::ClientError::PlaintextToken`]); a node that fails is no
//! candidate (dropped from discovery's answers and from a persisted list, so the session goes
//! to the next one); and every request that would carry the token checks its URL once more
//! before it is sent. `/health` probes never carry the token.

use edgeroute_proto::discovery::Candidate;
use http::Uri;

/// Whether a request to `url` may carry the bearer token: `https://`, or `http://` to a
/// loopback host, or any `http://` when `allow_plaintext`. Anything else (another scheme, no
/// scheme, a URL that does not parse) is refused.
pub fn token_may_go(url: &str, allow_plaintext: bool) -> bool {
    let Ok(uri) = url.parse::<Uri>() else { return false };
    match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("https") => true,
        Some("http") => allow_plaintext || uri.host().is_some_and(is_loopback),
        _ => false,
    }
}

/// `localhost` (any case, a trailing dot allowed), an address in `127.0.0.0/8`, or `[::1]`.
pub fn is_loopback(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Keeps the candidates the token may go to; says which were dropped, once each.
pub(crate) fn retain(candidates: &mut Vec<Candidate>, allow_plaintext: bool) -> usize {
    let before = candidates.len();
    candidates.retain(|c| {
        let ok = token_may_go(&c.url, allow_plaintext);
        if !ok {
            tracing::warn!(
                node = %c.id,
                url = %c.url,
                "edgeroute client: node skipped: the token is not sent over plaintext to a \
                 host that is not loopback (serve it over https, or allow_plaintext)"
            );
        }
        ok
    });
    before - candidates.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_anywhere_plaintext_only_to_loopback() {
        for ok in [
            "https://node.example:8443",
            "HTTPS://node.example",
            "https://10.0.0.1",
            "http://127.0.0.1:8000",
            "http://127.255.255.254",
            "http://localhost:7070/",
            "http://LOCALHOST.:7070",
            "http://[::1]:7070",
        ] {
            assert!(token_may_go(ok, false), "{ok}");
        }
        for refused in [
            "http://10.255.255.1",
            "http://10.255.255.1:8000",
            "http://node.example",
            "http://128.0.0.1",
            "http://0.0.0.0:8000",
            "http://[::2]:8000",
            "http://[::ffff:7f00:1]:8000",
            "http://localhost.evil.example",
            "http://127.0.0.1.nip.io",
            "http://127.0.0.1@evil.example",
            "ftp://127.0.0.1",
            "node.example:8000",
            "127.0.0.1:8000",
            "",
            "http://",
        ] {
            assert!(!token_may_go(refused, false), "{refused}");
        }
        assert!(token_may_go("http://10.255.255.1", true), "a private network, opted in");
        assert!(!token_may_go("ftp://10.0.0.1", true), "still http(s) only");
    }
}
