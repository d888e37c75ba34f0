//! The cluster's private CA and the certificates it issues (rcgen).
//!
//! - The captain owns one [`Ca`] ([`Ca::load_or_create`] in its data dir).
//! - When a node registers, the captain issues it a node-proxy *server*
//!   certificate ([`Ca::issue_node_proxy`], EKU serverAuth only).
//! - Every edge gets a *client* certificate ([`Ca::issue_edge_client`], EKU
//!   clientAuth only). Because the usages are disjoint, a node's certificate
//!   cannot be used to talk to another node-proxy as if it were the edge.
//! - The edge's local development CA uses the same type to issue leaf server
//!   certificates for `*.localhost` and configured names ([`Ca::issue_server`]).
//!
//! Keys are ECDSA P-256. Key files are written with mode 0600, atomically
//! (temp file, fsync, rename).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// How long issued leaf certificates are valid.
pub const LEAF_VALIDITY: Duration = Duration::days(365);
/// How long a CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(3650);

/// PKI failures.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation failed: {what}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: no valid {what} in PEM")]
    Pem { path: PathBuf, what: &'static str },
    /// rustls cannot use the key.
    #[error("unsupported private key")]
    Key(#[source] rustls::Error),
    /// A name is neither a DNS name nor an IP address.
    #[error("invalid subject name {0:?}")]
    Name(String),
}

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}

/// A certificate authority with its signing key.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A leaf certificate and its key, PEM encoded.
#[derive(Clone)]
pub struct IssuedCert {
    /// The leaf certificate followed by the issuing CA certificate.
    pub chain_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("chain_pem", &self.chain_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Generates a new CA called `name`.
    pub fn generate(name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "zeitwork");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        let cert = params
            .self_signed(&key)
            .map_err(gen_err("CA certificate"))?;
        let cert_pem = cert.pem();
        let cert_der = cert.der().clone();
        Ok(Ca {
            cert_pem,
            cert_der,
            issuer: Issuer::new(params, key),
        })
    }

    /// Builds a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(gen_err("parse CA key"))?;
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| PkiError::Pem {
                path: PathBuf::from(CA_CERT_FILE),
                what: "certificate",
            })?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(gen_err("parse CA certificate"))?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    /// Loads the CA from `dir` ([`CA_CERT_FILE`], [`CA_KEY_FILE`]).
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert = read(&dir.join(CA_CERT_FILE))?;
        let key = read(&dir.join(CA_KEY_FILE))?;
        Ca::from_pem(&cert, &key)
    }

    /// Writes the CA to `dir`, the key with mode 0600.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        write_atomic(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_atomic(
            &dir.join(CA_KEY_FILE),
            self.issuer.key().serialize_pem().as_bytes(),
            0o600,
        )
    }

    /// Loads the CA from `dir`, or generates and saves one when `dir` has none.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Ca, PkiError> {
        if dir.join(CA_CERT_FILE).exists() {
            return Ca::load(dir);
        }
        let ca = Ca::generate(name)?;
        ca.save(dir)?;
        Ok(ca)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A root store that trusts only this CA.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .expect("a CA we generated or parsed is a valid trust anchor");
        roots
    }

    /// A server certificate for a node's node-proxy. `names` are the DNS
    /// names and IP addresses the edge dials (the host part of
    /// [`crate::routes::Backend::node_proxy`]).
    pub fn issue_node_proxy(
        &self,
        node_id: &str,
        names: &[String],
    ) -> Result<IssuedCert, PkiError> {
        self.issue(node_id, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate for an edge.
    pub fn issue_edge_client(&self, edge_id: &str) -> Result<IssuedCert, PkiError> {
        self.issue(edge_id, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A TLS server certificate for `names` (the edge's local CA).
    pub fn issue_server(&self, names: &[String]) -> Result<IssuedCert, PkiError> {
        let cn = names.first().cloned().unwrap_or_default();
        self.issue(&cn, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn issue(
        &self,
        common_name: &str,
        names: &[String],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate().map_err(gen_err("leaf key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        for name in names {
            params.subject_alt_names.push(san(name)?);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
        let mut serial = [0u8; 16];
        rand::fill(&mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(serial.to_vec().into());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(gen_err("sign leaf certificate"))?;
        Ok(IssuedCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The role a cluster member's certificate is issued for. The extended key
/// usage carries it, so each side's TLS verification checks the other's
/// role: a node-proxy certificate can only serve (serverAuth), an edge's can
/// only be a client (clientAuth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A worker: its node-proxy's server certificate.
    Worker,
    /// An edge: its client certificate towards node-proxies.
    Edge,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Edge => "edge",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "worker" => Some(Role::Worker),
            "edge" => Some(Role::Edge),
            _ => None,
        }
    }
}

/// A certificate signed from a request.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The leaf followed by the CA certificate.
    pub chain_pem: String,
    /// The serial number, hex.
    pub serial: String,
    /// When it expires (unix seconds).
    pub not_after: i64,
}

/// A key pair and a certificate signing request for `name`: what a host
/// joining the cluster sends (the key never leaves it).
pub fn key_and_csr(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(gen_err("key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(gen_err("certificate request"))?;
    Ok((
        key.serialize_pem(),
        csr.pem().map_err(gen_err("certificate request PEM"))?,
    ))
}

impl Ca {
    /// Sign a member's certificate request: only its public key is taken
    /// from the request; the name, the addresses (`names`), the role and the
    /// validity are the CA's decision.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        role: Role,
        name: &str,
        names: &[String],
        validity: std::time::Duration,
    ) -> Result<Signed, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(gen_err("parse certificate request"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        params.distinguished_name = dn;
        for n in names {
            params.subject_alt_names.push(san(n)?);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match role {
            Role::Worker => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Edge => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::seconds(validity.as_secs().min(i64::MAX as u64) as i64);
        let mut serial = [0u8; 16];
        rand::fill(&mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(serial.to_vec().into());
        let req = rcgen::CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = req
            .signed_by(&self.issuer)
            .map_err(gen_err("sign member certificate"))?;
        Ok(Signed {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            serial: hex_of(&serial),
            not_after: (now + Duration::seconds(validity.as_secs() as i64)).unix_timestamp(),
        })
    }

    /// The CA's key, PEM (to seal it for the database; never sent anywhere).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if rustls_pki_types::DnsName::try_from(name).is_err() {
        return Err(PkiError::Name(name.to_owned()));
    }
    let dns = name
        .to_owned()
        .try_into()
        .map_err(|_| PkiError::Name(name.to_owned()))?;
    Ok(SanType::DnsName(dns))
}

impl IssuedCert {
    /// Parses the chain and key for rustls.
    pub fn to_rustls(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        parse_pem(
            self.chain_pem.as_bytes(),
            self.key_pem.as_bytes(),
            Path::new("<memory>"),
        )
    }

    /// A rustls [`CertifiedKey`] for a certificate resolver.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, PkiError> {
        let (chain, key) = self.to_rustls()?;
        certified_key(chain, &key)
    }

    /// Writes `<stem>.crt` and `<stem>.key` (0600) into `dir`.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<(), PkiError> {
        write_atomic(
            &dir.join(format!("{stem}.crt")),
            self.chain_pem.as_bytes(),
            0o644,
        )?;
        write_atomic(
            &dir.join(format!("{stem}.key")),
            self.key_pem.as_bytes(),
            0o600,
        )
    }

    /// Reads `<stem>.crt` and `<stem>.key` from `dir`.
    pub fn load(dir: &Path, stem: &str) -> Result<IssuedCert, PkiError> {
        let chain_pem = read(&dir.join(format!("{stem}.crt")))?;
        let key_pem = read(&dir.join(format!("{stem}.key")))?;
        let cert = IssuedCert { chain_pem, key_pem };
        cert.to_rustls()?;
        Ok(cert)
    }
}

/// Builds a rustls [`CertifiedKey`] from a chain and key.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, PkiError> {
    let signing = rustls::crypto::ring::sign::any_supported_type(key).map_err(PkiError::Key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// Parses a PEM chain and key; `path` only names them in errors.
pub fn parse_pem(
    chain_pem: &[u8],
    key_pem: &[u8],
    path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    let chain: Vec<_> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| PkiError::Pem {
            path: path.to_owned(),
            what: "certificate",
        })?;
    if chain.is_empty() {
        return Err(PkiError::Pem {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| PkiError::Pem {
        path: path.to_owned(),
        what: "private key",
    })?;
    Ok((chain, key))
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file atomically: temp file with `mode`, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_roundtrip_and_issue() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "test CA").unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Ca::load_or_create(dir.path(), "ignored").unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        // A leaf issued by the reloaded CA verifies against the original root.
        let leaf = again
            .issue_node_proxy("node-1", &["::1".into(), "node-1.internal".into()])
            .unwrap();
        let (chain, _key) = leaf.to_rustls().unwrap();
        let roots = Arc::new(ca.root_store());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        let name = rustls_pki_types::ServerName::try_from("node-1.internal").unwrap();
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap();
        let wrong = rustls_pki_types::ServerName::try_from("node-2.internal").unwrap();
        assert!(
            verifier
                .verify_server_cert(
                    &chain[0],
                    &chain[1..],
                    &wrong,
                    &[],
                    rustls_pki_types::UnixTime::now()
                )
                .is_err()
        );
        leaf.save(dir.path(), "np").unwrap();
        let loaded = IssuedCert::load(dir.path(), "np").unwrap();
        assert_eq!(loaded.chain_pem, leaf.chain_pem);
        loaded.certified_key().unwrap();
        assert!(matches!(
            ca.issue_server(&["bad name!".into()]),
            Err(PkiError::Name(_))
        ));
    }
}
