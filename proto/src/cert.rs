//! Who a certificate says its holder is: the subject `CN` (agent or submitter name) and `OU`
//! (role or scope). The server reads them off a client's certificate at each call; an agent reads
//! its own at start so that a name or role the server would refuse is reported before it dials.

/// The subject `CN` and `OU` of a DER certificate.
pub fn subject(der: &[u8]) -> Result<(String, String), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    names(&cert)
}

/// The subject `CN` and `OU` of a parsed certificate (for callers that read more of it).
pub fn names(cert: &x509_parser::certificate::X509Certificate) -> Result<(String, String), String> {
    let subject = cert.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_owned)
    };
    let name = first(&mut subject.iter_common_name())
        .filter(|n| !n.is_empty())
        .ok_or("the certificate has no subject CN (the agent or submitter name)")?;
    let unit = first(&mut subject.iter_organizational_unit()).ok_or_else(|| {
        format!(
            "the certificate of {name} has no subject OU (shells, commands, submitter or admin)"
        )
    })?;
    Ok((name, unit))
}

/// The subject of the first certificate of a PEM file's content.
pub fn pem_subject(pem: &[u8]) -> Result<(String, String), String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("not a PEM certificate: {e}"))?;
    subject(&pem.contents)
}

/// When the first certificate of a PEM file's content stopped being valid, if it has: RFC 3339
/// text of its `notAfter` (None while valid, or when unreadable).
pub fn pem_expired_at(pem: &[u8], now_unix: i64) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let not_after = cert.validity().not_after;
    (not_after.timestamp() < now_unix).then(|| not_after.to_string())
}
