//! https to etcd: the certificates the client trusts and the one it presents. They are
//! parsed and checked when the client is configured, which the server does at start-up:
//! a file that is not what it should be is an error there, naming it, and not a failed
//! handshake later; and the files are read before the sandbox shuts file access.

use std::fmt;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use thiserror::Error;
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};

/// Why TLS settings cannot be used; each names the input at fault.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("the CA bundle: {0}")]
    Ca(String),
    #[error("the system's root certificates: {0}")]
    SystemRoots(String),
    #[error("the client certificate: {0}")]
    Cert(String),
    #[error("the client key: {0}")]
    Key(String),
    #[error("the client certificate and key do not go together: {0}")]
    Pair(String),
}

/// What an https client of etcd trusts, and the certificate it shows etcd (for etcd's
/// `--client-cert-auth`).
#[derive(Clone)]
pub struct EtcdTls {
    roots: Arc<Vec<Certificate<'static>>>,
    client: Option<ClientCert>,
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("EtcdTls")
            .field("roots", &self.roots.len())
            .field("client_cert", &self.client.is_some())
            .finish()
    }
}

/// The crypto ureq's rustls uses; named in every TLS setting given to ureq, because ureq
/// without its own provider feature panics when asked to connect with none.
///
/// ring, as ureq's own default: a small C and assembly build, where aws-lc-rs (rustls'
/// default) is a far larger one. rustls 0.23.48 deprecates ring's provider for having no
/// post-quantum key exchange (a recorded session could one day be decrypted); moving to
/// aws-lc-rs is this function and the rustls features in Cargo.toml.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM text (other sections, such as keys, are skipped).
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))
}

/// `certs` as roots: refused when none of them is a certificate rustls can use (an empty
/// store would fail every handshake with a far less helpful message).
fn roots(certs: Vec<CertificateDer<'static>>) -> Result<Arc<Vec<Certificate<'static>>>, String> {
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    let mut store = rustls::RootCertStore::empty();
    let (added, ignored) = store.add_parsable_certificates(certs.iter().cloned());
    if added == 0 {
        return Err(format!("{ignored} certificates, none usable as a root"));
    }
    if ignored > 0 {
        log::warn!(
            "etcd TLS: {ignored} of {} CA certificates are unusable and ignored",
            certs.len()
        );
    }
    Ok(Arc::new(
        certs
            .iter()
            .map(|cert| Certificate::from_der(cert.as_ref()).to_owned())
            .collect(),
    ))
}

impl EtcdTls {
    /// Trusting the certificates of `ca_pem`, a PEM bundle (etcdctl's `--cacert`).
    pub fn with_ca(ca_pem: &[u8]) -> Result<EtcdTls, TlsError> {
        let certs = certificates(ca_pem).map_err(TlsError::Ca)?;
        Ok(EtcdTls {
            roots: roots(certs).map_err(TlsError::Ca)?,
            client: None,
        })
    }

    /// Trusting the system's root certificates, read now (where OpenSSL finds them:
    /// `SSL_CERT_FILE`, `SSL_CERT_DIR`, or the distribution's bundle).
    pub fn with_system_roots() -> Result<EtcdTls, TlsError> {
        let found = rustls_native_certs::load_native_certs();
        let roots = roots(found.certs).map_err(|reason| {
            let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
            match errors.is_empty() {
                true => TlsError::SystemRoots(reason),
                false => TlsError::SystemRoots(format!("{reason} ({})", errors.join("; "))),
            }
        })?;
        Ok(EtcdTls {
            roots,
            client: None,
        })
    }

    /// Also presenting the certificate (chain) of `cert_pem`, whose private key is
    /// `key_pem` (etcdctl's `--cert` and `--key`).
    pub fn with_client_cert(self, cert_pem: &[u8], key_pem: &[u8]) -> Result<EtcdTls, TlsError> {
        let chain = certificates(cert_pem).map_err(TlsError::Cert)?;
        if chain.is_empty() {
            return Err(TlsError::Cert("no PEM certificate in it".into()));
        }
        // Both parsers take the file's first private key of any kind (PKCS#1, PKCS#8, SEC1):
        // rustls' to check it, ureq's for ureq (whose key kinds are not public).
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                TlsError::Key("no PEM private key in it".into())
            }
            other => TlsError::Key(format!("not PEM: {other}")),
        })?;
        let key_for_ureq =
            PrivateKey::from_pem(key_pem).map_err(|e| TlsError::Key(e.to_string()))?;
        // What ureq does with the pair when it first connects, where a refusal is a panic:
        // the key must load, and match the certificate's public key.
        let provider = provider();
        provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::Key(format!("cannot be used: {e}")))?;
        CertifiedKey::from_der(chain.clone(), key, &provider)
            .map_err(|e| TlsError::Pair(e.to_string()))?;
        let chain: Vec<Certificate<'static>> = chain
            .iter()
            .map(|cert| Certificate::from_der(cert.as_ref()).to_owned())
            .collect();
        Ok(EtcdTls {
            client: Some(ClientCert::new_with_certs(&chain, key_for_ureq)),
            ..self
        })
    }

    /// Whether a client certificate is shown.
    pub(super) fn has_client_cert(&self) -> bool {
        self.client.is_some()
    }

    /// The settings ureq connects with.
    pub(super) fn ureq_config(&self) -> TlsConfig {
        TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(provider())
            .root_certs(RootCerts::Specific(Arc::clone(&self.roots)))
            .client_cert(self.client.clone())
            .build()
    }
}

/// The settings of a client without TLS: ureq's defaults would panic on an https URL
/// (its bundled roots and its own provider are not built in); these fail the handshake
/// instead, trusting no one. The client refuses https endpoints before that; this covers
/// a redirect.
pub(super) fn no_tls() -> TlsConfig {
    TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(provider())
        .root_certs(RootCerts::Specific(Arc::new(Vec::new())))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_and_named() {
        assert!(matches!(
            EtcdTls::with_ca(b"not a certificate"),
            Err(TlsError::Ca(_))
        ));
        let broken = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(EtcdTls::with_ca(broken), Err(TlsError::Ca(e)) if e.contains("PEM")));
        // Valid PEM around bytes that are no certificate.
        let not_der = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(EtcdTls::with_ca(not_der), Err(TlsError::Ca(_))));
    }

    #[test]
    fn a_client_certificate_and_key_must_be_there() {
        let tls = || EtcdTls {
            roots: Arc::new(Vec::new()),
            client: None,
        };
        let key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let cert = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let no_cert = tls().with_client_cert(key, key);
        assert!(matches!(no_cert, Err(TlsError::Cert(e)) if e.contains("no PEM certificate")));
        let no_key = tls().with_client_cert(cert, cert);
        assert!(matches!(no_key, Err(TlsError::Key(e)) if e.contains("no PEM private key")));
        let broken_key = tls().with_client_cert(cert, b"-----BEGIN PRIVATE KEY-----\n");
        assert!(matches!(broken_key, Err(TlsError::Key(e)) if e.contains("not PEM")));
        // Both there, but the key's bytes are no key.
        let not_a_key = tls().with_client_cert(cert, key);
        assert!(matches!(not_a_key, Err(TlsError::Key(e)) if e.contains("cannot be used")));
    }
}
