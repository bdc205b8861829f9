//! TLS with libpq's `sslmode` semantics, over rustls (feature `tls`).
//!
//! | sslmode | encrypted | certificate checked | host name checked |
//! |---|---|---|---|
//! | `disable` | never | - | - |
//! | `allow`, `prefer` | when it works out (see [`connector`](super::connector)) | no | no |
//! | `require` | always | only if a root certificate is given (then as `verify-ca`) | no |
//! | `verify-ca` | always | yes | no |
//! | `verify-full` | always | yes | yes |
//!
//! Why rustls (docs/postgres.md): pure Rust, so building the crate needs no system OpenSSL
//! or its headers, and the `ring` provider is named here explicitly instead of relying on
//! a process-wide default that another crate in the service might set differently.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::conninfo::{RootCerts, SslMode, TlsParams};
use super::error::ConnectError;

/// The rustls connector for `params`, or `None` for `sslmode=disable`.
pub(crate) fn connector(params: &TlsParams) -> Result<Option<MakeRustlsConnect>, ConnectError> {
    let mode = params.effective_mode();
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| ConnectError::config(format!("TLS setup: {err}")).with_source(err))?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = root_store(params.root_certs.as_ref())?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| {
                    ConnectError::config(format!("TLS setup: {err}")).with_source(err)
                })?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(Relaxed {
                    chain: Some(webpki),
                    algorithms,
                })
            }
        }
        _ => Arc::new(Relaxed {
            chain: None,
            algorithms,
        }),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &params.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs(cert, "sslcert")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|err| {
                ConnectError::config(format!(
                    "cannot read the client key sslkey={}: {err}",
                    key.display()
                ))
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|err| {
                ConnectError::config(format!(
                    "the client certificate and key do not fit together: {err}"
                ))
                .with_source(err)
            })?
        }
    };
    Ok(Some(MakeRustlsConnect::new(config)))
}

fn root_store(roots: Option<&RootCerts>) -> Result<RootCertStore, ConnectError> {
    let mut store = RootCertStore::empty();
    match roots {
        None => {
            return Err(ConnectError::config(
                "sslmode verify-ca/verify-full needs trusted roots, and neither sslrootcert \
                 nor ~/.postgresql/root.crt is there: give the server's CA with \
                 sslrootcert=/path/ca.pem, or sslrootcert=system for the platform's roots"
                    .to_owned(),
            ))
        }
        Some(RootCerts::System) => {
            let loaded = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err(ConnectError::config(format!(
                    "sslrootcert=system, but no trusted root could be loaded from the \
                     platform ({} errors; first: {})",
                    loaded.errors.len(),
                    loaded
                        .errors
                        .first()
                        .map_or_else(|| "none".to_owned(), ToString::to_string)
                )));
            }
        }
        Some(RootCerts::File(path)) => {
            for cert in read_certs(path, "sslrootcert")? {
                store.add(cert).map_err(|err| {
                    ConnectError::config(format!(
                        "sslrootcert={} holds a certificate rustls cannot use as a root: {err}",
                        path.display()
                    ))
                })?;
            }
        }
    }
    Ok(store)
}

fn read_certs(path: &Path, parameter: &str) -> Result<Vec<CertificateDer<'static>>, ConnectError> {
    let unreadable = |err: &dyn fmt::Display| {
        ConnectError::config(format!("cannot read {parameter}={}: {err}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| unreadable(&err))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| unreadable(&err))?;
    if certs.is_empty() {
        return Err(unreadable(&"no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The verifier of every mode but `verify-full`: `verify-ca` (`chain` set: the chain must
/// lead to a trusted root, the name is not checked) and `allow`, `prefer` and `require`
/// without a root (no `chain`: the certificate is not checked, as libpq does). The
/// handshake's signatures are verified either way, so the session is bound to whatever key
/// the server presented.
#[derive(Debug)]
struct Relaxed {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the chain before the name, so a name error means the chain passed.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            result => result,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_build_connectors() {
        let params = |mode| TlsParams {
            mode,
            root_certs: None,
            client_cert: None,
        };
        assert!(connector(&params(SslMode::Disable)).unwrap().is_none());
        for mode in [SslMode::Allow, SslMode::Prefer, SslMode::Require] {
            assert!(connector(&params(mode)).unwrap().is_some());
        }
        let err = connector(&params(SslMode::VerifyFull)).err().unwrap();
        assert!(err.to_string().contains("sslrootcert"), "{err}");
        let missing = TlsParams {
            mode: SslMode::VerifyCa,
            root_certs: Some(RootCerts::File("/nonexistent/ca.pem".into())),
            client_cert: None,
        };
        let err = connector(&missing).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
