//! A connection string (libpq's "conninfo": a URL or `key=value` pairs) split into the
//! TLS parameters the `postgres` crate does not take and the rest, which it does.
//!
//! A URL copied from a cloud console says `sslmode=verify-full&sslrootcert=...`; the
//! `postgres` crate's parser refuses `verify-ca`, `verify-full` and `allow`, and knows no
//! `sslrootcert`, `sslcert` or `sslkey`. This module takes those four out of a URL
//! (`postgres://...?k=v&...`) or a `key=value` string, with libpq's meaning and defaults, and
//! hands the rest to `postgres::Config` unchanged. It never echoes the connection string:
//! it may hold a password.

use std::path::PathBuf;

use super::error::ConnectError;

/// libpq's `sslmode`, with its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// Plaintext only.
    Disable,
    /// Plaintext first; TLS if the server refuses plaintext.
    Allow,
    /// TLS when the server offers it; plaintext if it does not, or the TLS handshake fails.
    /// libpq's default.
    Prefer,
    /// TLS, without checking the certificate (unless a root certificate is given, when it is
    /// `VerifyCa`).
    Require,
    /// TLS with a certificate signed by a trusted root; any host name.
    VerifyCa,
    /// TLS with a certificate signed by a trusted root and naming the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, ConnectError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConnectError::config(format!(
                    "unknown sslmode {other:?}: libpq's values are disable, allow, prefer, \
                     require, verify-ca and verify-full"
                )))
            }
        })
    }

    /// libpq's name for the mode.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the server's certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootCerts {
    /// A PEM file of trusted roots.
    File(PathBuf),
    /// The platform's trusted roots (`sslrootcert=system`).
    System,
}

/// The TLS parameters of one connection string, libpq defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsParams {
    pub(crate) mode: SslMode,
    pub(crate) root_certs: Option<RootCerts>,
    /// Client certificate chain and key, for `cert` authentication.
    pub(crate) client_cert: Option<(PathBuf, PathBuf)>,
}

impl TlsParams {
    /// The mode after libpq's rule that `require` with a root certificate is `verify-ca`.
    pub(crate) fn effective_mode(&self) -> SslMode {
        match (self.mode, &self.root_certs) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (mode, _) => mode,
        }
    }
}

/// A connection string split into what `postgres::Config` parses and the TLS parameters.
pub(crate) struct Split {
    pub(crate) rest: String,
    pub(crate) tls: TlsParams,
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits `conninfo` (a URL or `key=value` pairs) into the rest and its TLS parameters.
pub(crate) fn split(conninfo: &str) -> Result<Split, ConnectError> {
    let (rest, found) =
        if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
            split_url(conninfo)?
        } else {
            split_key_values(conninfo)?
        };
    let get = |key: &str| {
        found
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let mode = get("sslmode").map_or(Ok(SslMode::Prefer), SslMode::parse)?;
    let home = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".postgresql"));
    let default_file = |name: &str| {
        home.as_ref()
            .map(|dir| dir.join(name))
            .filter(|path| path.exists())
    };
    let root_certs = match get("sslrootcert") {
        Some("system") => Some(RootCerts::System),
        Some(path) => Some(RootCerts::File(PathBuf::from(path))),
        None => default_file("root.crt").map(RootCerts::File),
    };
    let cert = get("sslcert")
        .map(PathBuf::from)
        .or_else(|| default_file("postgresql.crt"));
    let key = get("sslkey")
        .map(PathBuf::from)
        .or_else(|| default_file("postgresql.key"));
    let client_cert = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(cert), None) => {
            return Err(ConnectError::config(format!(
                "sslcert {} is given without sslkey; a client certificate needs its key",
                cert.display()
            )))
        }
        (None, Some(key)) => {
            return Err(ConnectError::config(format!(
                "sslkey {} is given without sslcert",
                key.display()
            )))
        }
    };
    Ok(Split {
        rest,
        tls: TlsParams {
            mode,
            root_certs,
            client_cert,
        },
    })
}

type Found = Vec<(String, String)>;

fn split_url(url: &str) -> Result<(String, Found), ConnectError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let mut found = Vec::new();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)?;
        if TLS_KEYS.contains(&key.as_str()) {
            found.push((key, percent_decode(value)?));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, found))
}

fn percent_decode(text: &str) -> Result<String, ConnectError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ConnectError::config(
                            "invalid percent-encoding in the connection URL's parameters"
                                .to_owned(),
                        )
                    })?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| {
        ConnectError::config("a connection URL parameter is not UTF-8 once decoded".to_owned())
    })
}

/// Splits libpq's `key = value` form: values may be single-quoted, with `\'` and `\\`
/// escapes, as libpq allows. The other pairs are kept as they were written.
fn split_key_values(conninfo: &str) -> Result<(String, Found), ConnectError> {
    let mut found = Vec::new();
    let mut kept: Vec<&str> = Vec::new();
    let mut rest = conninfo.trim_start();
    while !rest.is_empty() {
        let start = rest;
        let eq = rest.find('=').ok_or_else(|| {
            ConnectError::config(
                "invalid connection string: expected key=value pairs or a postgres:// URL"
                    .to_owned(),
            )
        })?;
        let key = rest[..eq].trim();
        rest = rest[eq + 1..].trim_start();
        let mut value = String::new();
        if let Some(quoted) = rest.strip_prefix('\'') {
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '\'' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            let end = end.ok_or_else(|| {
                ConnectError::config(
                    "invalid connection string: unterminated quoted value".to_owned(),
                )
            })?;
            rest = &quoted[end..];
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            value.push_str(&rest[..end]);
            rest = &rest[end..];
        }
        let pair = start[..start.len() - rest.len()].trim();
        if TLS_KEYS.contains(&key) {
            found.push((key.to_owned(), value));
        } else {
            kept.push(pair);
        }
        rest = rest.trim_start();
    }
    Ok((kept.join(" "), found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_taken_out_and_the_rest_kept() {
        let split = split(
            "postgres://u:p%40ss@db:5432/app?sslmode=verify-full&application_name=x\
             &sslrootcert=%2Ftmp%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(
            split.rest,
            "postgres://u:p%40ss@db:5432/app?application_name=x"
        );
        assert_eq!(split.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            split.tls.root_certs,
            Some(RootCerts::File("/tmp/ca.pem".into()))
        );
        assert_eq!(
            split.tls.client_cert,
            Some(("/c.pem".into(), "/k.pem".into()))
        );
    }

    #[test]
    fn key_value_parameters_with_quotes() {
        let split = split_key_values(
            "host=db password='a\\'b' sslmode = 'verify-ca' sslrootcert='/a b/c.pem' dbname=x",
        )
        .unwrap();
        assert_eq!(split.0, "host=db password='a\\'b' dbname=x");
        assert_eq!(
            split.1,
            vec![
                ("sslmode".to_owned(), "verify-ca".to_owned()),
                ("sslrootcert".to_owned(), "/a b/c.pem".to_owned())
            ]
        );
    }

    #[test]
    fn libpq_defaults_and_rules() {
        let split = split("postgres://db/app").unwrap();
        assert_eq!(split.tls.mode, SslMode::Prefer);
        let require = TlsParams {
            mode: SslMode::Require,
            root_certs: Some(RootCerts::System),
            client_cert: None,
        };
        assert_eq!(require.effective_mode(), SslMode::VerifyCa);
        let err = super::split("host=db sslmode=verify-everything")
            .err()
            .unwrap();
        assert!(err.to_string().contains("verify-everything"), "{err}");
        let err = super::split("host=db sslcert=/c.pem").err().unwrap();
        assert!(err.to_string().contains("without sslkey"), "{err}");
    }
}
