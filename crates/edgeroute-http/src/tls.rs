//! TLS termination with rustls from PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
pub use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("could not read certificate chain from {path}: {source}")]
    Certs { path: String, source: rustls_pki_types::pem::Error },
    #[error("{path} holds no certificate")]
    NoCerts { path: String },
    #[error("could not read private key from {path}: {source}")]
    Key { path: String, source: rustls_pki_types::pem::Error },
    #[error("certificate and key do not form a valid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A server's `[tls]` section (the node's and discovery's): absent means plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain.
    pub cert_file: std::path::PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
}

impl TlsSection {
    /// The acceptor for these files ([`acceptor_from_pem_files`]).
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        acceptor_from_pem_files(&self.cert_file, &self.key_file)
    }
}

/// Builds an acceptor offering HTTP/2 and HTTP/1.1 by ALPN, with rustls' safe defaults
/// (TLS 1.2 and 1.3) on the ring provider.
pub fn acceptor_from_pem_files(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|source| TlsError::Certs { path: cert.display().to_string(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts { path: cert.display().to_string() });
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|source| TlsError::Key { path: key.display().to_string(), source })?;
    acceptor(certs, key)
}

pub fn acceptor(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}
