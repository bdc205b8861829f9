//! Test certificates and [`TlsCluster`], a throwaway cluster that speaks only TLS on TCP.
//!
//! [`Certs`] makes, fresh for each test with `rcgen` (pure Rust, no openssl binary needed):
//! a CA; a server certificate it signs, by default for DNS `localhost` and IP `127.0.0.1`; a
//! client certificate for user [`CERT_USER`]; and a second, unrelated CA, for "a certificate
//! from another CA" tests. The client-side files (PEM) live in a directory of the test
//! process's own user, the client key mode 0600 as libpq demands.
//!
//! [`TlsCluster`] runs a [`Cluster`] with `ssl = on`, the server key mode 0600 owned by the
//! server's user, and by default a pg_hba.conf whose TCP lines are all `hostssl`: trust for
//! `postgres`, `cert` authentication for [`CERT_USER`]. A plaintext login over TCP is
//! refused. The admin client still works, over the Unix socket. [`TlsCluster::with_hba`]
//! takes another pg_hba.conf, e.g. one that refuses the TLS sessions the server offers.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::cluster::{Cluster, ClusterOptions};
use super::scratch::ScratchDir;

/// The user that logs in with a client certificate (its common name).
pub const CERT_USER: &str = "certuser";

/// PEM files of one test's certificates; see the module docs. Removed on drop.
pub struct Certs {
    dir: ScratchDir,
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// A CA that signed nothing the server has.
    pub other_ca: PathBuf,
    /// The client certificate (CN = [`CERT_USER`]) and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// The server's certificate and key, in PEM, for [`TlsCluster`] to install.
    pub server_cert_pem: String,
    pub server_key_pem: String,
    /// The CA's certificate in PEM, which the server uses to verify client certificates.
    pub ca_pem: String,
}

impl Certs {
    /// Certificates with the server's for `localhost` and 127.0.0.1.
    pub fn new() -> Certs {
        Certs::for_server_names(&["localhost", "127.0.0.1"])
    }

    /// Certificates with the server's for `names`: DNS names, or IP addresses when they
    /// parse as one. The first is also the subject's common name.
    pub fn for_server_names(names: &[&str]) -> Certs {
        let (ca_key, ca_cert, ca_pem) = ca("metadata-batcher test CA");
        let (_, _, other_ca_pem) = ca("metadata-batcher unrelated test CA");

        let server_key = KeyPair::generate().expect("server key");
        let mut server = CertificateParams::new(Vec::<String>::new()).expect("server params");
        server.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        server.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().expect("a DNS name")),
            })
            .collect();
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server
            .signed_by(&server_key, &ca_cert, &ca_key)
            .expect("sign the server certificate");

        let client_key = KeyPair::generate().expect("client key");
        let mut client = CertificateParams::new(Vec::<String>::new()).expect("client params");
        client
            .distinguished_name
            .push(DnType::CommonName, CERT_USER);
        client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client
            .signed_by(&client_key, &ca_cert, &ca_key)
            .expect("sign the client certificate");

        let dir = ScratchDir::for_client("certs");
        Certs {
            ca: dir.write("ca.pem", &ca_pem, 0o644),
            other_ca: dir.write("other_ca.pem", &other_ca_pem, 0o644),
            client_cert: dir.write("client.pem", client_cert.pem(), 0o644),
            client_key: dir.write("client.key", client_key.serialize_pem(), 0o600),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            ca_pem,
            dir,
        }
    }

    /// The directory holding the client-side files.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Default for Certs {
    fn default() -> Self {
        Certs::new()
    }
}

fn ca(common_name: &str) -> (KeyPair, rcgen::Certificate, String) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-sign the CA");
    let pem = cert.pem();
    (key, cert, pem)
}

/// A throwaway cluster that accepts only TLS on TCP; see the module docs.
pub struct TlsCluster {
    // Field order is drop order: the server stops before its certificates go.
    pub cluster: Cluster,
    pub certs: Certs,
}

impl TlsCluster {
    /// A TLS-only cluster whose certificate names `localhost` and 127.0.0.1.
    pub fn start_new() -> TlsCluster {
        TlsCluster::with_certs(Certs::new())
    }

    /// A TLS-only cluster presenting the server certificate of `certs`.
    pub fn with_certs(certs: Certs) -> TlsCluster {
        TlsCluster::with_hba(
            certs,
            &format!(
                "# The Unix socket, for the harness's admin client only.\n\
                 local all all trust\n\
                 hostssl all postgres 127.0.0.1/32 trust\n\
                 hostssl all {CERT_USER} 127.0.0.1/32 cert\n"
            ),
        )
    }

    /// A cluster with `ssl = on` presenting the server certificate of `certs`, and `hba` as
    /// its whole pg_hba.conf (with a `local` line: the harness's admin client needs one).
    pub fn with_hba(certs: Certs, hba: &str) -> TlsCluster {
        let options = ClusterOptions {
            conf: vec![
                "ssl = on".to_owned(),
                "ssl_cert_file = 'server.crt'".to_owned(),
                "ssl_key_file = 'server.key'".to_owned(),
                "ssl_ca_file = 'ca.pem'".to_owned(),
            ],
            hba: Some(hba.to_owned()),
            files: vec![
                (
                    "server.crt".to_owned(),
                    certs.server_cert_pem.clone().into_bytes(),
                    0o644,
                ),
                (
                    "server.key".to_owned(),
                    certs.server_key_pem.clone().into_bytes(),
                    0o600,
                ),
                (
                    "ca.pem".to_owned(),
                    certs.ca_pem.clone().into_bytes(),
                    0o644,
                ),
            ],
            ..ClusterOptions::default()
        };
        let cluster = Cluster::with_options(options);
        cluster
            .admin()
            .batch_execute(&format!("CREATE ROLE {CERT_USER} LOGIN"))
            .expect("create the cert user");
        TlsCluster { cluster, certs }
    }

    pub fn port(&self) -> u16 {
        self.cluster.port()
    }

    /// A libpq key=value string for user `postgres` at `localhost` with `sslmode` and this
    /// CA as `sslrootcert`.
    pub fn conninfo(&self, sslmode: &str) -> String {
        format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode={sslmode} sslrootcert={}",
            self.port(),
            self.certs.ca.display()
        )
    }

    /// The same as a URL.
    pub fn url(&self, sslmode: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode={sslmode}&sslrootcert={}",
            self.port(),
            self.certs.ca.display()
        )
    }

    /// A libpq key=value string for [`CERT_USER`] with the client certificate.
    pub fn cert_user_conninfo(&self) -> String {
        format!(
            "host=localhost port={} user={CERT_USER} dbname=postgres sslmode=verify-full \
             sslrootcert={} sslcert={} sslkey={}",
            self.port(),
            self.certs.ca.display(),
            self.certs.client_cert.display(),
            self.certs.client_key.display()
        )
    }
}

/// 127.0.0.1, for tests that connect by address.
pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
