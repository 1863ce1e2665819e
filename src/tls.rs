//! TLS certificates: the pair each TLS listener presents, re-read from disk while the
//! process runs, and the CA files that `https://` backends are verified with.
//!
//! A listener's pair sits behind an `ArcSwap` inside a rustls certificate resolver, so a
//! reload changes what the next handshakes get and leaves open connections alone. A new
//! pair goes into service only when both files parse and the key belongs to the
//! certificate; otherwise the old pair keeps serving.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use pingora::protocols::tls::CaType;
use pingora::utils::tls::WrappedX509;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

/// Why a certificate, key or CA file cannot be used. Every variant names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// The file holds no PEM `CERTIFICATE` block, or one that is not valid base64/DER.
    #[error("{path}: no usable PEM certificate ({reason})")]
    NoCertificate { path: PathBuf, reason: String },
    /// The file holds no PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[error("{path}: no usable PEM private key ({reason})")]
    NoKey { path: PathBuf, reason: String },
    /// The key parsed but rustls cannot sign with it, or the certificate is malformed.
    #[error("{path}: {reason}")]
    Unusable { path: PathBuf, reason: String },
    /// Both files are fine on their own, but the key is not the certificate's.
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

/// A certificate chain and its key, checked to belong together, with a digest of the files
/// they came from (a reload of unchanged files is a no-op).
struct Loaded {
    key: Arc<CertifiedKey>,
    files_sha256: [u8; 32],
}

/// The certificate of one TLS listener; the listener's rustls config resolves every
/// handshake through it.
pub struct ListenerCert {
    /// The listener's address, for logs and metric labels.
    pub listener: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    current: ArcSwap<Loaded>,
    /// Digest of the files last refused and why: the same broken files are reported as
    /// refused again without being parsed again (and logged and counted only once).
    last_refused: Mutex<Option<([u8; 32], String)>>,
}

/// What [`ListenerCert::reload`] found.
#[derive(Debug)]
pub enum CertReload {
    /// The files are the pair in service.
    Unchanged,
    /// A new pair went into service.
    Loaded,
    /// The files were refused now; the pair in service stays.
    Refused(CertError),
    /// The files are the ones refused before, for this reason; the pair in service stays.
    StillRefused(String),
}

impl ListenerCert {
    /// Load the pair; fails (naming the file) if it is unreadable, not PEM, or mismatched.
    pub fn load(listener: &str, cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let loaded = load_pair(cert_path, key_path)?;
        Ok(ListenerCert {
            listener: listener.to_string(),
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: ArcSwap::from_pointee(loaded),
            last_refused: Mutex::new(None),
        })
    }

    /// Re-read both files; a pair that loads goes into service.
    pub fn reload(&self) -> CertReload {
        let (cert_pem, key_pem) = match read_pair(&self.cert_path, &self.key_path) {
            Ok(pems) => pems,
            Err(e) => return CertReload::Refused(e),
        };
        let digest = files_digest(&cert_pem, &key_pem);
        if digest == self.current.load().files_sha256 {
            return CertReload::Unchanged;
        }
        let mut last_refused = self.last_refused.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((refused, why)) = &*last_refused {
            if *refused == digest {
                return CertReload::StillRefused(why.clone());
            }
        }
        match parse_pair(&self.cert_path, &cert_pem, &self.key_path, &key_pem) {
            Ok(loaded) => {
                self.current.store(Arc::new(loaded));
                *last_refused = None;
                CertReload::Loaded
            }
            Err(e) => {
                *last_refused = Some((digest, e.to_string()));
                CertReload::Refused(e)
            }
        }
    }
}

impl fmt::Debug for ListenerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerCert")
            .field("listener", &self.listener)
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ListenerCert {
    /// Every client gets the pair in service now, whatever name it asked for.
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| CertError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), CertError> {
    Ok((read_file(cert_path)?, read_file(key_path)?))
}

fn files_digest(cert_pem: &[u8], key_pem: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert_pem.len() as u64).to_le_bytes());
    h.update(cert_pem);
    h.update(key_pem);
    h.finalize().into()
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<Loaded, CertError> {
    let (cert_pem, key_pem) = read_pair(cert_path, key_path)?;
    parse_pair(cert_path, &cert_pem, key_path, &key_pem)
}

/// Every `CERTIFICATE` block of a PEM file, in order; at least one.
fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::NoCertificate {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn parse_pair(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<Loaded, CertError> {
    let certs = parse_certs(cert_path, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::NoKey {
        path: key_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let provider = provider();
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| CertError::Unusable {
                path: key_path.to_path_buf(),
                reason: format!("the private key is not usable: {e}"),
            })?;
    let certified = CertifiedKey::new(certs, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            })
        }
        // ring's keys all know their public half; anything else is a bad certificate.
        Err(e) => {
            return Err(CertError::Unusable {
                path: cert_path.to_path_buf(),
                reason: format!("the certificate is not usable: {e}"),
            })
        }
    }
    Ok(Loaded {
        key: Arc::new(certified),
        files_sha256: files_digest(cert_pem, key_pem),
    })
}

/// The process's rustls crypto provider: ring, as Pingora installs it.
fn provider() -> Arc<CryptoProvider> {
    pingora::tls::install_default_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The CAs of a backend's `ca_file`, in the form Pingora's connector takes.
#[derive(Debug, Clone)]
pub struct CaFile {
    pub certs: Arc<CaType>,
    /// Part of the file's SHA-256: connections verified with other CAs never share a pool.
    pub digest: u64,
}

/// Load a backend's `ca_file`. Every certificate must parse and be usable as a trust
/// anchor, so a bad file is refused when the config is loaded rather than failing every
/// handshake later.
pub fn load_ca_file(path: &Path) -> Result<CaFile, CertError> {
    let pem = read_file(path)?;
    let sha = Sha256::digest(&pem);
    let digest = u64::from_le_bytes(sha[..8].try_into().expect("8 bytes"));
    let certs = parse_certs(path, &pem)?;
    let mut anchors = rustls::RootCertStore::empty();
    let mut out = Vec::with_capacity(certs.len());
    for (i, der) in certs.into_iter().enumerate() {
        let unusable = |reason: String| CertError::Unusable {
            path: path.to_path_buf(),
            reason: format!("certificate #{} is not a usable CA: {reason}", i + 1),
        };
        // Pingora parses these again with x509-parser (and panics on a failure there), so
        // both parsers must accept the certificate before it is handed over.
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| unusable(e.to_string()))?;
        anchors
            .add(der.clone())
            .map_err(|e| unusable(e.to_string()))?;
        out.push(WrappedX509::new(
            der.to_vec(),
            pingora::utils::tls::parse_x509,
        ));
    }
    Ok(CaFile {
        certs: Arc::from(out.into_boxed_slice()),
        digest,
    })
}

/// Why a TLS handshake with a backend failed, as the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTlsFailure {
    /// The backend's certificate did not verify (unknown issuer, wrong name, expired...).
    CertificateInvalid,
    /// Any other handshake failure (no common protocol version, not TLS at all...).
    Handshake,
}

impl UpstreamTlsFailure {
    /// Classify a Pingora connect error whose type is `TLSHandshakeFailure`. Pingora keeps
    /// only the rustls error's text; rustls words every certificate verdict
    /// "invalid peer certificate: ..." (pinned by a test below).
    pub fn of(error: &pingora::Error) -> Self {
        if error.to_string().contains("invalid peer certificate") {
            UpstreamTlsFailure::CertificateInvalid
        } else {
            UpstreamTlsFailure::Handshake
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            UpstreamTlsFailure::CertificateInvalid => "certificate not trusted",
            UpstreamTlsFailure::Handshake => "TLS handshake failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_words_certificate_errors_as_classified() {
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert!(e.to_string().contains("invalid peer certificate"), "{e}");
        let pe = pingora::Error::explain(
            pingora::ErrorType::TLSHandshakeFailure,
            format!("TLS connect() failed: {e}, SNI: x"),
        );
        assert_eq!(
            UpstreamTlsFailure::of(&pe),
            UpstreamTlsFailure::CertificateInvalid
        );
        let other = pingora::Error::explain(
            pingora::ErrorType::TLSHandshakeFailure,
            "tls connect error: received corrupt message",
        );
        assert_eq!(
            UpstreamTlsFailure::of(&other),
            UpstreamTlsFailure::Handshake
        );
    }

    #[test]
    fn missing_and_empty_files_are_refused_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let err = ListenerCert::load("a", &missing, &missing).unwrap_err();
        assert!(
            matches!(&err, CertError::Read { path, .. } if path == &missing),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let err = load_ca_file(&empty).unwrap_err();
        assert!(matches!(err, CertError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("empty.pem"), "{err}");
    }
}
