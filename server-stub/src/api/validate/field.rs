//! The error every check answers: the field, with its path, and what would be accepted. Its own
//! module so that the kind-specific checks (shells.rs, commands.rs) and the entry points
//! (mod.rs) share it without importing each other, with the checks of values every kind uses
//! (names, ids, CIDRs, short text).

use es_proto::limits::clip;
use ipnet::Ipv4Net;

/// A field that failed validation and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

/// A [`FieldError`] for `field`.
pub fn bad(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A name (app, subnet): 1 to 64 letters, digits, `-`, `_`, `.`.
pub fn name_ok(field: &str, v: &str) -> Result<(), FieldError> {
    if v.is_empty() {
        return Err(bad(field, "is empty"));
    }
    if v.len() > 64 {
        return Err(bad(field, "at most 64 characters"));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(bad(
            field,
            format!("{v:?} contains {c:?}; use letters, digits, - _ ."),
        ));
    }
    Ok(())
}

pub fn id_ok(field: &str, v: &str, prefix: &str) -> Result<(), FieldError> {
    if !v.starts_with(prefix)
        || v.len() <= prefix.len()
        || v.len() > 64
        || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(bad(
            field,
            format!(
                "{:?} is not an id like {prefix}0123456789abcdef",
                clip(v, 80)
            ),
        ));
    }
    Ok(())
}

/// A short free-form value (instance type, zone, device name): at most `max` bytes, printable.
pub fn short(field: &str, v: &str, max: usize) -> Result<(), FieldError> {
    if v.len() > max || v.chars().any(|c| c.is_control()) {
        return Err(bad(field, format!("at most {max} bytes of printable text")));
    }
    Ok(())
}

pub fn cidr(field: &str, v: &str) -> Result<Ipv4Net, FieldError> {
    let net: Ipv4Net = v.parse().map_err(|_| {
        bad(
            field,
            format!("{:?} is not an IPv4 CIDR like 10.1.0.0/16", clip(v, 80)),
        )
    })?;
    if net.network() != net.addr() {
        return Err(bad(
            field,
            format!("{v:?} has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}
