//! The error every check answers: the field, with its path, and what would be accepted. Its own
//! module so that the kind-specific checks (shells.rs, commands.rs) and the entry points
//! (mod.rs) share it without importing each other.

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
