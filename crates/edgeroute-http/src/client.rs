//! The one outbound HTTP client builder: every edgeroute component that calls out (the SDK to
//! discovery and nodes, discovery's probes, the node to its backend and Triton, the hub client)
//! builds its client here, so timeouts, pooling, TCP_NODELAY and TLS roots are set one way.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Builder, Client};
use hyper_util::rt::TokioExecutor;

/// How an outbound client connects and pools. Every field has a default.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TCP connect, at most (never the OS's two minutes). Default 1 s.
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this. Default 90 s.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host. Default unbounded.
    pub pool_max_idle_per_host: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: usize::MAX,
        }
    }
}

/// The TLS client configuration for `https://` peers: the roots in `ca_file` (PEM) when given
/// (a private fleet CA), else the Mozilla roots compiled in. ring as the provider.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    tls_config_with_identity(ca_file, None)
}

/// As [`tls_config`], presenting `identity` (a PEM certificate chain and its PEM key) when the
/// peer asks for a client certificate (mutual TLS).
pub fn tls_config_with_identity(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match ca_file {
        None => hyper_rustls::ConfigBuilderExt::with_webpki_roots(builder),
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("CA file {}: no certificate in it", path.display()));
            }
            let mut roots = rustls::RootCertStore::empty();
            for c in certs {
                roots.add(c).map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
            builder.with_root_certificates(roots)
        }
    };
    let Some((cert, key)) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("certificate file {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("certificate file {}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("key file {}: {e}", key.display()))?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client certificate {}: {e}", cert.display()))
}

/// A TCP connector: the connect timeout, TCP_NODELAY, and any scheme (the TLS layer, when
/// there is one, decides what it accepts).
pub fn tcp(opts: &ClientOptions) -> HttpConnector {
    tcp_with_resolver(opts, hyper_util::client::legacy::connect::dns::GaiResolver::new())
}

/// As [`tcp`], finding hosts' addresses with `resolver` instead of the system's.
pub fn tcp_with_resolver<R>(opts: &ClientOptions, resolver: R) -> HttpConnector<R> {
    let mut tcp = HttpConnector::new_with_resolver(resolver);
    tcp.set_connect_timeout(Some(opts.connect_timeout));
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    tcp
}

/// `http://` and `https://` (verified against `tls`'s roots), HTTP/1.1.
pub fn https_connector(
    opts: &ClientOptions,
    tls: rustls::ClientConfig,
) -> HttpsConnector<HttpConnector> {
    https_over(tcp(opts), tls)
}

/// `http://` and `https://` over a TCP connector of the caller's (its own resolver).
pub fn https_over<R>(
    tcp: HttpConnector<R>,
    tls: rustls::ClientConfig,
) -> HttpsConnector<HttpConnector<R>> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp)
}

/// The pool settings, for a client over a connector of the caller's own (a test network).
pub fn builder(opts: &ClientOptions) -> Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(opts.pool_idle_timeout).pool_max_idle_per_host(opts.pool_max_idle_per_host);
    b
}

/// A client for `http://` and `https://` peers.
pub fn https_client<B>(
    opts: &ClientOptions,
    tls: rustls::ClientConfig,
) -> Client<HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    builder(opts).build(https_connector(opts, tls))
}

/// A client for `http://` peers only (a backend on the node's private network).
pub fn plain_client<B>(opts: &ClientOptions) -> Client<HttpConnector, B>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    let mut tcp = tcp(opts);
    tcp.enforce_http(true);
    builder(opts).build(tcp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let dir = std::env::temp_dir().join(format!("edgeroute-http-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let path = dir.join("empty.pem");
        std::fs::write(&path, b"").ok();
        let err = tls_config(Some(&path)).err().unwrap_or_default();
        assert!(err.contains("no certificate"), "{err}");
        assert!(tls_config(None).is_ok(), "the compiled-in roots");
        std::fs::remove_dir_all(dir).ok();
    }
}
