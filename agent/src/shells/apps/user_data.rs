//! User data from a URL (AppSpec.user_data_url): fetched by the agent before anything launches
//! (https; http only where `user_data_http_allowed`), each `{{name}}` of the app's parameters
//! replaced by its value, and checked against EC2's 16 KB. Any failure names the app's field.

use std::collections::HashMap;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::shells::{Result, ShellsError};

/// EC2's limit on user data (before base64).
pub(super) const MAX: usize = 16 * 1024;
/// Longest wait for the whole fetch.
const TIMEOUT: Duration = Duration::from_secs(15);

/// Why `url` may not be fetched, if it may not: its scheme.
pub(super) fn scheme_problem(url: &str, http_allowed: bool) -> Option<String> {
    if url.starts_with("https://") || (http_allowed && url.starts_with("http://")) {
        return None;
    }
    Some(if url.starts_with("http://") {
        "plain http is refused (it can be read and changed on the way): use https, or let this \
         agent fetch http with user_data_http_allowed = true"
            .into()
    } else {
        "use an https:// URL".into()
    })
}

/// `script` with each `{{name}}` of `params` replaced by its value (other braces left alone:
/// scripts use them too).
pub(super) fn substitute(script: &str, params: &HashMap<String, String>) -> String {
    let mut out = script.to_owned();
    for (k, v) in params {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    out
}

/// The user data of an app: fetched, substituted, checked. `field` is the app's path.
pub(super) async fn fetch(
    url: &str,
    params: &HashMap<String, String>,
    http_allowed: bool,
    field: &str,
) -> Result<String> {
    let invalid = |reason: String| ShellsError::Invalid {
        field: format!("{field}.user_data_url"),
        reason,
    };
    if let Some(why) = scheme_problem(url, http_allowed) {
        return Err(invalid(why));
    }
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| invalid(format!("{url:?} is not a URL")))?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .map_err(|e| invalid(format!("no TLS roots on this host: {e}")))?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let get = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| invalid(format!("cannot fetch {url}: {}", es_proto::error_chain(&e))))?;
        if !resp.status().is_success() {
            return Err(invalid(format!(
                "fetching {url} answered {}",
                resp.status()
            )));
        }
        // Read a little past the limit: enough to know it is too big, never the whole of a
        // huge answer.
        let body = Limited::new(resp.into_body(), MAX * 4)
            .collect()
            .await
            .map_err(|_| {
                invalid(format!(
                    "{url} is larger than EC2's {} KB of user data",
                    MAX / 1024
                ))
            })?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| invalid(format!("{url} is not text (UTF-8)")))
    };
    let script = tokio::time::timeout(TIMEOUT, get).await.map_err(|_| {
        invalid(format!(
            "no answer from {url} within {} s",
            TIMEOUT.as_secs()
        ))
    })??;
    let script = substitute(&script, params);
    if script.len() > MAX {
        return Err(invalid(format!(
            "{url} gives {} bytes once filled in; EC2 takes at most {} KB of user data",
            script.len(),
            MAX / 1024
        )));
    }
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_only_unless_allowed() {
        assert_eq!(scheme_problem("https://x/boot.sh", false), None);
        assert!(scheme_problem("http://x/boot.sh", false)
            .unwrap()
            .contains("user_data_http_allowed"));
        assert_eq!(scheme_problem("http://x/boot.sh", true), None);
        assert!(scheme_problem("ftp://x/boot.sh", true).is_some());
    }

    #[test]
    fn parameters_fill_their_placeholders_only() {
        let p: HashMap<String, String> = [("env".to_owned(), "qa".to_owned())].into();
        assert_eq!(
            substitute("echo {{env}} {{other}} ${HOME} {{ env }}", &p),
            "echo qa {{other}} ${HOME} {{ env }}"
        );
    }
}
