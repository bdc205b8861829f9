//! Small edits of a PostgreSQL URL (`postgres://user:password@host:port/db?params`) for the
//! examples: another database, another host and port, and the host and port it names. Only
//! the URL form: a libpq `key=value` string is refused with a message that says so.

#![allow(dead_code)] // each example uses a different part

use std::net::{SocketAddr, ToSocketAddrs as _};

/// The parts of a URL around its authority: `(scheme://, user@, host:port, /db?params)`.
fn split(url: &str) -> Result<(&str, &str, &str, &str), String> {
    let scheme_end = url.find("://").map(|i| i + 3).ok_or_else(|| {
        "expected a URL (postgres://user@host:port/database), not a key=value string".to_owned()
    })?;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host_at = rest[..authority_end].rfind('@').map_or(0, |at| at + 1);
    Ok((
        &url[..scheme_end],
        &rest[..host_at],
        &rest[host_at..authority_end],
        &rest[authority_end..],
    ))
}

/// `url` pointing at database `database` instead.
pub fn with_database(url: &str, database: &str) -> Result<String, String> {
    let (scheme, user, host_port, tail) = split(url)?;
    let query = tail.find('?').map_or("", |at| &tail[at..]);
    Ok(format!("{scheme}{user}{host_port}/{database}{query}"))
}

/// `url` pointing at `host:port` instead.
pub fn with_host_port(url: &str, host: &str, port: u16) -> Result<String, String> {
    let (scheme, user, _, tail) = split(url)?;
    Ok(format!("{scheme}{user}{host}:{port}{tail}"))
}

/// The host and port `url` names (port 5432 when it names none). One host only.
pub fn host_port(url: &str) -> Result<(String, u16), String> {
    let (_, _, host_port, _) = split(url)?;
    if host_port.contains(',') {
        return Err(format!("expected one host, got {host_port:?}"));
    }
    // An IPv6 literal is bracketed: the port follows the closing bracket.
    let port_at = match host_port.rfind(']') {
        Some(bracket) => host_port[bracket..].find(':').map(|i| bracket + i),
        None => host_port.rfind(':'),
    };
    let (host, port) = match port_at {
        Some(colon) => {
            let port = &host_port[colon + 1..];
            let port = port
                .parse()
                .map_err(|_| format!("{port:?} is not a port number"))?;
            (&host_port[..colon], port)
        }
        None => (host_port, 5432),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("the URL names no host (a Unix socket?); give host:port".into());
    }
    Ok((host.to_owned(), port))
}

/// The IPv4 (else IPv6) address of the host and port `url` names.
pub fn socket_addr(url: &str) -> Result<SocketAddr, String> {
    let (host, port) = host_port(url)?;
    let addrs: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|err| format!("cannot resolve {host}:{port}: {err}"))?
        .collect();
    addrs
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{host}:{port} resolves to no address"))
}

/// The URL without its password, for printing.
pub fn redact(url: &str) -> String {
    match split(url) {
        Ok((scheme, user, host_port, tail)) if !user.is_empty() => {
            let name = user.trim_end_matches('@');
            match name.split_once(':') {
                Some((name, _password)) => format!("{scheme}{name}:***@{host_port}{tail}"),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
