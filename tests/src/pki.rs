//! A throwaway PKI for the TLS tests (rcgen): a CA, the server's certificate for 127.0.0.1, and
//! client certificates with the subject the server maps (CN = name, OU = role), including
//! expired ones and ones from a foreign CA. Files are written as PEM into a directory.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

/// A CA that writes PEM files into `dir`.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM file).
    pub ca_file: PathBuf,
}

/// A certificate and its key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// A new CA named `name`, its certificate written to `dir/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let key = KeyPair::generate().expect("ca key");
        let ca = CertifiedIssuer::self_signed(p, key).expect("self-signed ca");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem()).expect("write ca");
        Pki {
            dir: dir.to_owned(),
            ca,
            ca_file,
        }
    }

    fn issue(&self, file: &str, p: CertificateParams) -> CertFiles {
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.ca).expect("sign leaf");
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    /// The server's certificate, valid for 127.0.0.1 and localhost.
    pub fn server(&self) -> CertFiles {
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        p.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        p.distinguished_name.push(DnType::CommonName, "es-server");
        self.issue("server", p)
    }

    /// A client certificate with subject CN = `name`, OU = `unit` (shells, commands, submitter).
    pub fn client(&self, name: &str, unit: &str) -> CertFiles {
        self.issue(&format!("{name}-{unit}"), client_params(name, unit))
    }

    /// Like [`Pki::client`], but it expired in 2021.
    pub fn expired_client(&self, name: &str, unit: &str) -> CertFiles {
        let mut p = client_params(name, unit);
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        self.issue(&format!("{name}-{unit}-expired"), p)
    }
}

fn client_params(name: &str, unit: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name
        .push(DnType::OrganizationalUnitName, unit);
    p
}
