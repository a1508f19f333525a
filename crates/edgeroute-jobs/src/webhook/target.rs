//! Where a tenant may send webhooks. A webhook URL is the tenant's input and the router's
//! outbound request: unchecked, it is SSRF into the fleet (a node's admin plane, the cloud
//! metadata address, the NATS monitor). The rules:
//! - `https` only; `http` only to hosts the operator listed in `allowed_hosts`;
//! - no user-info in the URL (`https://fleet@10.0.0.1` tricks readers of logs);
//! - no address that is loopback, private (RFC 1918, fc00::/7), link-local (169.254/16 — the
//!   metadata service —, fe80::/10), shared (100.64/10), unspecified, broadcast, multicast or
//!   documentation-only, IPv4-mapped IPv6 forms included, unless the host is in
//!   `allowed_hosts`.
//!
//! A literal address is checked here. A name must be resolved by the caller, who then checks
//! **every** resolved address with [`check_ip`] and connects to one of the checked addresses
//! (never resolving again: DNS rebinding).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The operator's allow-list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    /// Hosts (names or literal addresses, lowercase) that may be reached over `http` and at
    /// internal addresses: an operator's own receivers.
    pub allowed_hosts: BTreeSet<String>,
}

/// A checked webhook target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `https` or `http`.
    pub scheme: String,
    /// The host, lowercase, without brackets.
    pub host: String,
    /// The port (the scheme's default when absent).
    pub port: u16,
    /// A literal address, already checked; `None` for a name (resolve, then [`check_ip`]).
    pub ip: Option<IpAddr>,
}

/// Why a target was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not an absolute URL with a host.
    #[error("webhook URL {0:?} is not an absolute URL with a host")]
    Malformed(String),
    /// A scheme other than https (or http to an allowed host).
    #[error("webhook URL scheme {0:?} is refused: use https")]
    Scheme(String),
    /// User-info in the authority.
    #[error("webhook URL must not carry user-info")]
    UserInfo,
    /// An internal address.
    #[error("webhook target {host} resolves to {ip}, an internal address ({class})")]
    Internal {
        /// The host.
        host: String,
        /// The address.
        ip: IpAddr,
        /// Which kind of internal.
        class: &'static str,
    },
}

/// Checks a webhook URL against the policy.
pub fn check_url(policy: &TargetPolicy, url: &str) -> Result<Target, TargetError> {
    let malformed = || TargetError::Malformed(url.to_owned());
    let uri: http::Uri = url.parse().map_err(|_| malformed())?;
    let scheme = uri.scheme_str().ok_or_else(malformed)?.to_ascii_lowercase();
    let authority = uri.authority().ok_or_else(malformed)?;
    if authority.as_str().contains('@') {
        return Err(TargetError::UserInfo);
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if host.is_empty() {
        return Err(malformed());
    }
    let allowed = policy.allowed_hosts.contains(&host);
    let port = match scheme.as_str() {
        "https" => authority.port_u16().unwrap_or(443),
        "http" if allowed => authority.port_u16().unwrap_or(80),
        _ => return Err(TargetError::Scheme(scheme)),
    };
    let ip = host.parse::<IpAddr>().ok();
    if let Some(ip) = ip {
        check_ip(policy, &host, ip)?;
    }
    Ok(Target { scheme, host, port, ip })
}

/// Checks one address `host` resolved to (or its literal address).
pub fn check_ip(policy: &TargetPolicy, host: &str, ip: IpAddr) -> Result<(), TargetError> {
    if policy.allowed_hosts.contains(&host.to_ascii_lowercase()) {
        return Ok(());
    }
    match internal_class(ip) {
        None => Ok(()),
        Some(class) => Err(TargetError::Internal { host: host.to_owned(), ip, class }),
    }
}

/// Which kind of internal address `ip` is, if it is one.
pub fn internal_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => {
            // ::ffff:a.b.c.d and the deprecated ::a.b.c.d reach the IPv4 address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_class(v4);
            }
            v6_class(v6)
        }
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        _ if ip.is_link_local() => "link-local",
        _ if ip.is_unspecified() || a == 0 => "unspecified",
        _ if ip.is_broadcast() => "broadcast",
        _ if ip.is_multicast() || a >= 240 => "multicast or reserved",
        _ if a == 100 && (64..128).contains(&b) => "shared address space",
        _ if ip.is_documentation() => "documentation",
        _ if a == 198 && (18..20).contains(&b) => "benchmarking",
        _ => return None,
    })
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_multicast() => "multicast",
        _ if first & 0xfe00 == 0xfc00 => "private",
        _ if first & 0xffc0 == 0xfe80 => "link-local",
        _ if first == 0x2001 && ip.segments()[1] == 0x0db8 => "documentation",
        _ => {
            // ::a.b.c.d (IPv4-compatible, deprecated) still reaches the IPv4 address.
            let s = ip.segments();
            if s[..6].iter().all(|&x| x == 0) {
                return v4_class(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ));
            }
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: &[&str]) -> TargetPolicy {
        TargetPolicy { allowed_hosts: hosts.iter().map(|h| h.to_string()).collect() }
    }

    #[test]
    fn a_public_https_url_passes() {
        let t = check_url(&policy(&[]), "https://hooks.example.com/edgeroute?x=1").unwrap();
        assert_eq!(
            (t.scheme.as_str(), t.host.as_str(), t.port, t.ip),
            ("https", "hooks.example.com", 443, None)
        );
        let t = check_url(&policy(&[]), "https://93.184.216.34:8443/h").unwrap();
        assert_eq!(t.port, 8443);
        assert!(t.ip.is_some());
    }

    #[test]
    fn http_and_internal_addresses_need_the_operators_word() {
        let none = policy(&[]);
        assert_eq!(
            check_url(&none, "http://hooks.example.com/"),
            Err(TargetError::Scheme("http".into()))
        );
        assert!(matches!(check_url(&none, "ftp://x.example/"), Err(TargetError::Scheme(_))));
        for url in [
            "https://127.0.0.1/",
            "https://10.1.2.3/",
            "https://172.16.0.1/",
            "https://192.168.1.1/",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://[::1]/",
            "https://[fe80::1]/",
            "https://[fd00::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:169.254.169.254]/",
        ] {
            assert!(
                matches!(check_url(&none, url), Err(TargetError::Internal { .. })),
                "{url} passed"
            );
        }
        let ops = policy(&["receiver.internal", "10.1.2.3"]);
        assert_eq!(check_url(&ops, "http://receiver.internal/h").unwrap().port, 80);
        assert!(check_url(&ops, "https://10.1.2.3/").is_ok());
        assert!(check_url(&ops, "https://10.1.2.4/").is_err());
    }

    #[test]
    fn user_info_and_garbage_are_refused() {
        assert_eq!(
            check_url(&policy(&[]), "https://fleet@hooks.example.com/"),
            Err(TargetError::UserInfo)
        );
        assert!(matches!(check_url(&policy(&[]), "/relative"), Err(TargetError::Malformed(_))));
        assert!(matches!(check_url(&policy(&[]), "not a url"), Err(TargetError::Malformed(_))));
    }

    #[test]
    fn resolved_addresses_are_checked_one_by_one() {
        let p = policy(&[]);
        let public: IpAddr = "93.184.216.34".parse().unwrap();
        let metadata: IpAddr = "169.254.169.254".parse().unwrap();
        assert_eq!(check_ip(&p, "hooks.example.com", public), Ok(()));
        assert_eq!(
            check_ip(&p, "hooks.example.com", metadata),
            Err(TargetError::Internal {
                host: "hooks.example.com".into(),
                ip: metadata,
                class: "link-local"
            })
        );
        assert_eq!(internal_class("::10.0.0.1".parse().unwrap()), Some("private"));
        assert_eq!(internal_class("2606:4700::1".parse().unwrap()), None);
    }
}
