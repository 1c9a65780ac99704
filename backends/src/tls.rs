//! The TLS settings of the http and s3 backends' HTTP clients, with the trusted roots loaded
//! once per process.
//!
//! Each backend builds its own `reqwest::Client` (its own connection pool, used from its own
//! tokio runtime). Left to itself, reqwest builds a new rustls-platform-verifier `Verifier` for
//! every client, and on Linux that reads and decodes the whole system trust store again
//! (`SSL_CERT_FILE` / `SSL_CERT_DIR`, else the distribution's bundle and certificate
//! directory, decoding some 150 PEM certificates): milliseconds of CPU per client, and a sharded
//! checkpoint opens a backend per shard, twice per load (check, then load).
//!
//! Here the verifier is built once per set of extra roots and shared (an `Arc`) by the clients
//! that trust exactly those roots: it holds an immutable root store and keeps no state between
//! verifications, so sharing it changes nothing but the cost. A backend given extra roots (the
//! http backend's `root_certificates_pem`, the s3 backend's `AWS_CA_BUNDLE`) gets the verifier
//! of those roots, never another's, and a backend given none never gets one that holds them.
//! Each client still gets its own `ClientConfig` (and with it its own TLS session cache, as
//! before), built as reqwest builds it: every TLS version, ALPN `h2` then `http/1.1`, SNI, no
//! client certificate.
//!
//! The system's roots (and the `SSL_CERT_*` variables) are read when the first backend of the
//! process that needs them is opened; a later change to them is seen by a new process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Distinct sets of extra roots kept; past this, a new set's verifier is built but not kept (a
/// program cycling through many private CAs must not grow the cache without bound).
const MAX_CACHED: usize = 16;

type Verifiers = HashMap<Vec<CertificateDer<'static>>, Arc<rustls_platform_verifier::Verifier>>;

static VERIFIERS: OnceLock<Mutex<Verifiers>> = OnceLock::new();

/// The crypto provider: the process default, after installing rustls' `ring` provider as that
/// default when the process has none yet (rustls is built without a default provider).
fn provider() -> Arc<CryptoProvider> {
    if let Some(p) = CryptoProvider::get_default() {
        return p.clone();
    }
    // Another thread may win the race: either provider is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match CryptoProvider::get_default() {
        Some(p) => p.clone(),
        None => Arc::new(rustls::crypto::ring::default_provider()),
    }
}

/// The certificates of a PEM bundle (text outside PEM blocks is skipped; an empty result is
/// for the caller to judge).
pub(crate) fn parse_pem_bundle(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid certificate encoding: {e}"))
}

/// The verifier trusting the system's roots plus `extra_roots`: the process's one for that set.
fn verifier(
    extra_roots: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<rustls_platform_verifier::Verifier>, rustls::Error> {
    let cache = VERIFIERS.get_or_init(Default::default);
    if let Some(v) = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&extra_roots)
    {
        return Ok(v.clone());
    }
    // Built outside the lock (it reads files); two threads may both build one, and the first
    // kept wins. A failure (no system roots, a malformed extra root) is not kept: the next
    // backend tries again.
    let v = Arc::new(if extra_roots.is_empty() {
        rustls_platform_verifier::Verifier::new(provider)?
    } else {
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra_roots.clone(), provider)?
    });
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(kept) = map.get(&extra_roots) {
        return Ok(kept.clone());
    }
    if map.len() < MAX_CACHED {
        map.insert(extra_roots, v.clone());
    }
    Ok(v)
}

/// A rustls client configuration as reqwest would build it for a client with
/// `tls_certs_merge(extra_roots)` and otherwise default TLS settings, for
/// `ClientBuilder::tls_backend_preconfigured`, with the shared verifier. Errors are reqwest's
/// ("No CA certificates were loaded from the system", a malformed root).
pub(crate) fn client_config(
    extra_roots: Vec<CertificateDer<'static>>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = verifier(extra_roots, provider.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // reqwest's defaults: SNI on (rustls' default too), HTTP/2 offered before HTTP/1.1.
    config.enable_sni = true;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A throwaway self-signed CA certificate, distinct per call: (DER, PEM).
    pub(crate) fn ca(name: &str) -> (CertificateDer<'static>, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.der().clone(), cert.pem())
    }

    #[test]
    fn one_verifier_per_set_of_extra_roots() {
        let p = provider();
        let (a, b) = (ca("tls cache a").0, ca("tls cache b").0);
        let Ok(sys) = verifier(Vec::new(), p.clone()) else {
            // No system roots on this machine (the platform verifier then refuses to build):
            // nothing to share.
            return;
        };
        let sys2 = verifier(Vec::new(), p.clone()).unwrap();
        let va = verifier(vec![a.clone()], p.clone()).unwrap();
        let va2 = verifier(vec![a.clone()], p.clone()).unwrap();
        let vb = verifier(vec![b.clone()], p.clone()).unwrap();
        let vab = verifier(vec![a, b], p).unwrap();
        assert!(Arc::ptr_eq(&sys, &sys2), "the system roots are loaded once");
        assert!(
            Arc::ptr_eq(&va, &va2),
            "the same extra roots share a verifier"
        );
        for (x, y) in [
            (&sys, &va),
            (&sys, &vb),
            (&va, &vb),
            (&va, &vab),
            (&sys, &vab),
        ] {
            assert!(!Arc::ptr_eq(x, y), "other roots, another verifier");
        }
    }

    #[test]
    fn client_config_offers_h2_then_http11() {
        let Ok(c) = client_config(Vec::new()) else {
            return; // no system roots here
        };
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(c.enable_sni);
    }

    #[test]
    fn pem_bundles() {
        assert_eq!(parse_pem_bundle(b"not a certificate\n").unwrap(), vec![]);
        let (der, pem) = ca("tls pem");
        let (der2, pem2) = ca("tls pem 2");
        let bundle = format!("# two roots\n{pem}\n{pem2}");
        assert_eq!(
            parse_pem_bundle(bundle.as_bytes()).unwrap(),
            vec![der, der2]
        );
        let bad = b"-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n";
        assert!(parse_pem_bundle(bad).is_err());
    }
}
