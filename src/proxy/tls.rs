//! TLS (https/wss) from a PEM certificate chain and key.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, ServerConfig};

use super::ProxyError;

/// Build the acceptor, naming the file at fault in any error.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ProxyError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ProxyError::TlsCert {
            path: cert.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ProxyError::TlsCert {
            path: cert.to_owned(),
            detail: "no CERTIFICATE found in the PEM file".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| ProxyError::TlsKey {
        path: key.to_owned(),
        detail: e.to_string(),
    })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key_der))
            .map_err(|e| ProxyError::TlsConfig {
                cert: cert.to_owned(),
                key: key.to_owned(),
                source: e,
            })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
