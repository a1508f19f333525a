//! TLS for talking to nodes (and discovery) over `https://`.

use std::sync::Arc;

/// The TLS client configuration for `https://` nodes: the roots in `ca_file` (PEM) when given
/// (a private fleet CA), else the Mozilla roots compiled in.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?;
    let Some(path) = ca_file else {
        return Ok(hyper_rustls::ConfigBuilderExt::with_webpki_roots(builder).with_no_client_auth());
    };
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
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}
