//! Bootstrapping from a name: `dns:discovery.example.net[:port]` in
//! [`ClientConfig::discovery`](crate::ClientConfig::discovery) resolves to the nearest discovery
//! replicas, in the order the fleet's GeoDNS (`edgeroute dns`) gives them.
//!
//! A small stub resolver over hickory-proto's codec (no resolver library: a client crate
//! needs one question answered, not a cache or DNSSEC): SRV `_edgeroute._tcp.<name>` first —
//! SRV priorities keep the server's order, which resolvers may reshuffle in an A set — each
//! target an `https://<target>:<port>` endpoint with the addresses from the Additional
//! section pinned for the connection; when there is no SRV record, A and AAAA of `<name>`
//! as one endpoint `https://<name>:<port>` whose addresses are tried in the server's order.
//! UDP first (two tries), TCP when the answer is truncated. Nameservers: the configured ones,
//! else `/etc/resolv.conf`'s.
//!
//! DNS only picks where to ask: the SDK's probes still choose the node. DNS is not
//! authenticated here (no DNSSEC), so a `dns:` endpoint is always `https://`: a forged answer
//! can only point at a host that must still prove the name with its certificate.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The port of a discovery replica named without one (`dns:discovery.example.net`).
pub const DEFAULT_PORT: u16 = 7070;

/// A `dns:` discovery entry: the name, the port for A/AAAA answers, and the scheme of the
/// endpoints it resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub name: String,
    pub port: u16,
    /// `https`, or `http` for a `dns+http:` entry (a private network, or an in-memory one in
    /// simulations; the token rules for plaintext still apply to what it resolves to).
    pub scheme: &'static str,
}

impl DnsTarget {
    /// `dns:NAME[:PORT]` (or `dns+http:NAME[:PORT]`); `None` when `entry` is neither. An
    /// invalid name is an error naming the entry.
    pub fn parse(entry: &str) -> Option<Result<DnsTarget, String>> {
        let (scheme, rest) = match entry.strip_prefix("dns+http:") {
            Some(rest) => ("http", rest),
            None => ("https", entry.strip_prefix("dns:")?),
        };
        let rest = rest.trim_start_matches("//");
        let (name, port) = match rest.rsplit_once(':') {
            Some((n, p)) => match p.parse::<u16>() {
                Ok(p) if p > 0 => (n, p),
                _ => return Some(Err(format!("`{entry}`: the port must be 1-65535"))),
            },
            None => (rest, DEFAULT_PORT),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Some(Err(format!(
                "`{entry}`: `dns:` takes a domain name, e.g. dns:discovery.example.net"
            )));
        }
        Some(Ok(DnsTarget { name, port, scheme }))
    }
}

/// One discovery endpoint a name resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `https://<host>:<port>`.
    pub url: String,
    /// The host the URL names (TLS verifies it).
    pub host: String,
    /// Its addresses as the DNS answer gave them, tried in this order; empty: the system
    /// resolver finds them.
    #[serde(default)]
    pub addrs: Vec<IpAddr>,
}

/// What a name resolved to, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub endpoints: Vec<Endpoint>,
    /// Unix ms (the client's clock).
    pub resolved_at_ms: u64,
    /// The answer's TTL.
    pub ttl_ms: u64,
}

/// How usable a held resolution is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Within its TTL.
    Fresh,
    /// Past it: use it now, resolve again in the background.
    Stale,
    /// Nothing held: resolve before asking discovery.
    Resolve,
}

/// What to do with `held` at `now_ms` (pure).
pub fn freshness(held: Option<&Resolution>, now_ms: u64) -> Use {
    match held {
        None => Use::Resolve,
        Some(r) if r.endpoints.is_empty() => Use::Resolve,
        Some(r) if now_ms.saturating_sub(r.resolved_at_ms) < r.ttl_ms => Use::Fresh,
        Some(_) => Use::Stale,
    }
}

/// The nameservers of `/etc/resolv.conf`'s text (at most three, as the C library reads).
pub fn nameservers_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .take(3)
        .collect()
}

/// Addresses the connector uses for hosts a DNS answer named (SRV targets with their
/// Additional records), before the system resolver.
#[derive(Debug, Clone, Default)]
pub struct Pins(Arc<RwLock<HashMap<String, Vec<IpAddr>>>>);

impl Pins {
    pub fn set(&self, endpoints: &[Endpoint]) {
        let mut map = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        for e in endpoints.iter().filter(|e| !e.addrs.is_empty()) {
            map.insert(e.host.to_ascii_lowercase(), e.addrs.clone());
        }
    }

    pub fn get(&self, host: &str) -> Option<Vec<IpAddr>> {
        let map = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&host.trim_end_matches('.').to_ascii_lowercase()).cloned()
    }
}

/// The endpoints an SRV answer names, by priority then weight (heavier first), each
/// target's addresses from the Additional section. `None`: the answer has no SRV record.
pub fn endpoints_from_srv(msg: &Message, scheme: &str) -> Option<(Vec<Endpoint>, u32)> {
    let mut srv: Vec<(u16, u16, String, u16, u32)> = msg
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => {
                let host = s.target.to_ascii().trim_end_matches('.').to_ascii_lowercase();
                Some((s.priority, s.weight, host, s.port, r.ttl))
            }
            _ => None,
        })
        .collect();
    if srv.is_empty() {
        return None;
    }
    srv.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut extra: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for r in &msg.additionals {
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        let host = r.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        extra.entry(host).or_default().push(ip);
    }
    let ttl = srv.iter().map(|s| s.4).min().unwrap_or(0);
    let endpoints = srv
        .into_iter()
        .filter(|s| !s.2.is_empty()) // "." means "no such service" (RFC 2782)
        .map(|(_, _, host, port, _)| Endpoint {
            url: format!("{scheme}://{}:{port}", url_host(&host)),
            addrs: extra.get(&host).cloned().unwrap_or_default(),
            host,
        })
        .collect();
    Some((endpoints, ttl))
}

/// The addresses (in answer order) and the smallest TTL of an A or AAAA answer.
pub fn addresses(msg: &Message) -> (Vec<IpAddr>, u32) {
    let mut ttl = u32::MAX;
    let ips = msg
        .answers
        .iter()
        .filter_map(|r| {
            let ip = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return None,
            };
            ttl = ttl.min(r.ttl);
            Some(ip)
        })
        .collect();
    (ips, if ttl == u32::MAX { 0 } else { ttl })
}

fn url_host(host: &str) -> String {
    match host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{host}]"),
        Err(_) => host.to_owned(),
    }
}

/// Resolves `target` through `servers` (each tried in turn), within `timeout` per server.
/// `now_ms` stamps the result. A TTL of 0 is held for 1 s (no re-resolution per turn).
pub async fn resolve(
    servers: &[SocketAddr],
    target: &DnsTarget,
    timeout: Duration,
    now_ms: u64,
    via: Option<&dyn crate::transport::Transport>,
) -> Result<Resolution, String> {
    if servers.is_empty() {
        return Err("no nameserver (none configured, none in /etc/resolv.conf)".into());
    }
    let mut last = String::new();
    for server in servers {
        match resolve_at(*server, target, timeout, via).await {
            Ok((endpoints, ttl)) if !endpoints.is_empty() => {
                let ttl_ms = u64::from(ttl).max(1) * 1000;
                return Ok(Resolution { endpoints, resolved_at_ms: now_ms, ttl_ms });
            }
            Ok(_) => last = format!("{}: no SRV, A or AAAA record at {server}", target.name),
            Err(e) => last = format!("{}: {e} at {server}", target.name),
        }
    }
    Err(last)
}

async fn resolve_at(
    server: SocketAddr,
    target: &DnsTarget,
    timeout: Duration,
    via: Option<&dyn crate::transport::Transport>,
) -> Result<(Vec<Endpoint>, u32), String> {
    let srv_name = format!("_edgeroute._tcp.{}.", target.name);
    let msg = exchange(server, &srv_name, RecordType::SRV, timeout, via).await?;
    if msg.metadata.response_code == ResponseCode::NoError
        && let Some(found) = endpoints_from_srv(&msg, target.scheme)
    {
        return Ok(found);
    }
    if !matches!(msg.metadata.response_code, ResponseCode::NoError | ResponseCode::NXDomain) {
        return Err(format!("SRV query answered {}", msg.metadata.response_code));
    }
    // No SRV: the name's own addresses, one endpoint.
    let name = format!("{}.", target.name);
    let (mut addrs, mut ttl) = (Vec::new(), u32::MAX);
    for qtype in [RecordType::A, RecordType::AAAA] {
        let msg = exchange(server, &name, qtype, timeout, via).await?;
        let (ips, t) = addresses(&msg);
        if !ips.is_empty() {
            ttl = ttl.min(t);
            addrs.extend(ips);
        }
    }
    if addrs.is_empty() {
        return Ok((vec![], 0));
    }
    let host = target.name.clone();
    let url = format!("{}://{}:{}", target.scheme, url_host(&host), target.port);
    Ok((vec![Endpoint { url, host, addrs }], ttl))
}

/// One question to `server`: through `via` when it carries DNS, else UDP (two tries within
/// `timeout`), then TCP if truncated.
async fn exchange(
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    timeout: Duration,
    via: Option<&dyn crate::transport::Transport>,
) -> Result<Message, String> {
    let qname = Name::from_str(name).map_err(|e| format!("`{name}`: {e}"))?;
    let mut q = Message::query();
    // An unpredictable id (off-path spoofing must guess it), without rand's thread_rng feature.
    q.metadata.id =
        rand::Rng::random(&mut <rand::rngs::SmallRng as rand::SeedableRng>::from_os_rng());
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(qname.clone(), qtype));
    let bytes = q.to_vec().map_err(|e| e.to_string())?;
    let check = |m: Message| -> Result<Message, String> {
        let ok = m.metadata.id == q.metadata.id
            && m.metadata.message_type == MessageType::Response
            && m.queries.len() == 1
            && m.queries[0].name() == &qname
            && m.queries[0].query_type() == qtype;
        if ok { Ok(m) } else { Err("an answer to another question".into()) }
    };
    if let Some(f) = via.and_then(|t| t.dns(server, bytes.clone())) {
        let answer = tokio::time::timeout(timeout, f)
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
            .map_err(|e| e.to_string())?;
        return Message::from_vec(&answer).map_err(|e| e.to_string()).and_then(check);
    }
    let bind: SocketAddr =
        if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let sock = tokio::net::UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    let per_try = timeout / 2;
    let mut buf = vec![0u8; 4096];
    let mut last_error = None;
    for _ in 0..2 {
        if let Err(e) = sock.send(&bytes).await {
            last_error = Some(e.to_string());
            continue;
        }
        let deadline = tokio::time::Instant::now() + per_try;
        // Datagrams that are not the answer (late answers to an earlier try) are skipped.
        loop {
            let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Err(_) => break,
                // An ICMP error (nothing listening there) surfaces on the connected socket.
                Ok(Err(e)) => {
                    last_error = Some(e.to_string());
                    break;
                }
                Ok(Ok(n)) => n,
            };
            let Ok(m) = Message::from_vec(&buf[..n]) else { continue };
            let Ok(m) = check(m) else { continue };
            if !m.metadata.truncation {
                return Ok(m);
            }
            return tokio::time::timeout(timeout, exchange_tcp(server, &bytes))
                .await
                .map_err(|_| "timed out over TCP".to_owned())?
                .and_then(check);
        }
    }
    Err(match last_error {
        Some(e) => format!("no answer ({e})"),
        None => format!("no answer within {} ms", timeout.as_millis()),
    })
}

async fn exchange_tcp(server: SocketAddr, query: &[u8]) -> Result<Message, String> {
    let mut s = tokio::net::TcpStream::connect(server).await.map_err(|e| e.to_string())?;
    let len = u16::try_from(query.len()).map_err(|_| "query too long".to_owned())?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(query);
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let n = s.read_u16().await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Message::from_vec(&buf).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, AAAA, SRV};

    #[test]
    fn dns_entries_parse_with_and_without_a_port() {
        let t = DnsTarget::parse("dns:Discovery.Edge.Test.").unwrap().unwrap();
        let want =
            DnsTarget { name: "discovery.edge.test".into(), port: DEFAULT_PORT, scheme: "https" };
        assert_eq!(t, want);
        let t = DnsTarget::parse("dns://discovery.edge.test:8443").unwrap().unwrap();
        assert_eq!(t.port, 8443);
        let t = DnsTarget::parse("dns+http:discovery.edge.test").unwrap().unwrap();
        assert_eq!(t.scheme, "http");
        assert!(DnsTarget::parse("https://discovery.edge.test").is_none());
        for bad in ["dns:", "dns:a..b", "dns:x:0", "dns:x:99999", "dns:sp ace.test"] {
            let e = DnsTarget::parse(bad).unwrap().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn srv_answers_keep_their_priority_order_and_their_additional_addresses() {
        let mut m = Message::query();
        m.metadata.message_type = MessageType::Response;
        let owner = Name::from_str("_edgeroute._tcp.discovery.edge.test.").unwrap();
        for (prio, id) in [(1, "b"), (0, "a"), (2, "c")] {
            let t = Name::from_str(&format!("{id}.discovery.edge.test.")).unwrap();
            m.add_answer(Record::from_rdata(
                owner.clone(),
                10,
                RData::SRV(SRV::new(prio, 1, 7070, t)),
            ));
        }
        let a = Name::from_str("a.discovery.edge.test.").unwrap();
        m.add_additional(Record::from_rdata(a.clone(), 10, RData::A(A::new(127, 0, 1, 1))));
        m.add_additional(Record::from_rdata(a, 10, RData::AAAA(AAAA::new(0, 0, 0, 0, 0, 0, 0, 1))));
        let (eps, ttl) = endpoints_from_srv(&m, "https").unwrap();
        let urls: Vec<&str> = eps.iter().map(|e| e.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "https://a.discovery.edge.test:7070",
                "https://b.discovery.edge.test:7070",
                "https://c.discovery.edge.test:7070"
            ]
        );
        assert_eq!(eps[0].addrs, ["127.0.1.1".parse::<IpAddr>().unwrap(), "::1".parse().unwrap()]);
        assert!(eps[1].addrs.is_empty());
        assert_eq!(ttl, 10);
        let mut none = Message::query();
        none.metadata.message_type = MessageType::Response;
        assert!(endpoints_from_srv(&none, "https").is_none());
    }

    #[test]
    fn a_resolution_is_fresh_within_its_ttl_then_stale() {
        let ep = Endpoint { url: "https://a:1".into(), host: "a".into(), addrs: vec![] };
        let r = Resolution { endpoints: vec![ep], resolved_at_ms: 1_000, ttl_ms: 30_000 };
        assert_eq!(freshness(Some(&r), 30_999), Use::Fresh);
        assert_eq!(freshness(Some(&r), 31_000), Use::Stale);
        assert_eq!(freshness(None, 0), Use::Resolve);
        let empty = Resolution { endpoints: vec![], ..r };
        assert_eq!(freshness(Some(&empty), 1_000), Use::Resolve);
    }

    #[test]
    fn resolv_conf_nameservers_are_read_as_the_c_library_does() {
        let text = "# comment\nsearch example.net\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n\
                    nameserver bogus\nnameserver 10.0.0.3\nnameserver 10.0.0.4\n";
        let ns = nameservers_from_resolv_conf(text);
        let want: Vec<SocketAddr> = vec![
            "10.0.0.2:53".parse().unwrap(),
            "[fe80::1]:53".parse().unwrap(),
            "10.0.0.3:53".parse().unwrap(),
        ];
        assert_eq!(ns, want);
    }

    #[test]
    fn pins_are_found_by_host_whatever_the_case() {
        let p = Pins::default();
        let ep = Endpoint {
            url: "https://a.test:1".into(),
            host: "a.test".into(),
            addrs: vec!["127.0.0.9".parse().unwrap()],
        };
        p.set(&[ep]);
        assert_eq!(p.get("A.Test."), Some(vec!["127.0.0.9".parse().unwrap()]));
        assert_eq!(p.get("b.test"), None);
    }
}
