//! TLS material from PEM files: the HTTPS server's certificate, and the MQTT client's trust
//! roots and optional client certificate. rustls with the ring provider throughout.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{TlsConfiguration, Transport};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use thiserror::Error;

use crate::config::MqttUrl;

/// Why TLS material could not be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file holds no certificate.
    #[error("{} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key.
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The file's content is not usable.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error("the private key in {} does not match the certificate in {}: {reason}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
    /// No CA to trust the broker with.
    #[error(
        "the system has no CA certificates to check the broker's with: set [mqtt] tls_ca (or \
         --tls-ca) to the CA that signed it, or install the system's CA bundle"
    )]
    NoRoots,
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where a TLS client finds its trust roots and, for mutual TLS, its own identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFiles {
    /// CA certificates (PEM) that sign the server's certificate; `None` trusts the system's.
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM), for servers that require one.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
}

/// The one crypto provider we build with; named explicitly so that no process-wide default
/// has to be installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Largest PEM file read; certificate chains are a few KiB (and `/dev/zero` never ends).
const MAX_PEM_BYTES: u64 = 1024 * 1024;

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read as _;
    let err = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(err)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            reason: format!("larger than {MAX_PEM_BYTES} bytes: not a PEM certificate or key"),
        });
    }
    Ok(bytes)
}

/// Reads every certificate of a PEM file; at least one must be there.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(path, &read(path)?)
}

fn parse_certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(path, &read(path)?)
}

fn parse_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        e => TlsError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        },
    })
}

/// Checks that a certificate chain and key, read from the files `cert` and `key`, belong
/// together.
pub fn check_pair(
    cert: &Path,
    key: &Path,
    chain: Vec<CertificateDer<'static>>,
    private: PrivateKeyDer<'static>,
) -> Result<(), TlsError> {
    CertifiedKey::from_der(chain, private, &provider())
        .map(|_| ())
        .map_err(|e| TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: e.to_string(),
        })
}

/// The system's CA certificates.
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(roots)
}

/// A TLS client config that trusts `files.ca` (or the system's roots) and presents the
/// client certificate when one is given.
pub fn client_config(files: &ClientFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match &files.ca {
        Some(ca) => {
            for cert in load_certs(ca)? {
                roots.add(cert).map_err(|e| TlsError::Invalid {
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => roots = system_roots()?,
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| TlsError::Mismatch {
                cert: cert.clone(),
                key: key.clone(),
                reason: e.to_string(),
            })?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A TLS client config that trusts `roots`, without a client certificate.
pub fn client_config_trusting(roots: RootCertStore) -> Result<Arc<ClientConfig>, TlsError> {
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// The rumqttc transport for `url`: plain TCP for `mqtt://`, TLS with `files` for `mqtts://`.
pub fn mqtt_transport(url: &MqttUrl, files: &ClientFiles) -> Result<Transport, TlsError> {
    if !url.tls {
        return Ok(Transport::Tcp);
    }
    Ok(Transport::Tls(TlsConfiguration::Rustls(client_config(
        files,
    )?)))
}

/// The HTTPS listener's config from a certificate chain and key, checked before use.
pub fn server_config(
    cert: &Path,
    key: &Path,
) -> Result<salvo::conn::rustls::RustlsConfig, TlsError> {
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    check_pair(
        cert,
        key,
        parse_certs(cert, &cert_pem)?,
        parse_key(key, &key_pem)?,
    )?;
    let keycert = salvo::conn::rustls::Keycert::new()
        .cert(cert_pem)
        .key(key_pem);
    Ok(salvo::conn::rustls::RustlsConfig::new(keycert))
}
