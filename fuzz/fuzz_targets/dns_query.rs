//! A DNS query as `edgeroute dns` receives it, answered by [`Answerer::respond`] from a fixed
//! view of three regions (one of them down).
//!
//! Input: one byte (bit 0: over TCP, bit 1: from an IPv6 resolver), then the message.
//!
//! Properties: nothing panics; an answer decodes as a DNS message and carries the query's
//! id; over UDP an answer is at most 1232 bytes (and 512 without EDNS); a query outside the
//! zone, for ANY, or for a transfer is never answered with records.

#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use edgeroute_dns::{Answerer, DnsConfig, View};
use hickory_proto::op::{Message, ResponseCode};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"
zone = "edge.test"
default_region = "tor"
[distance.tor]
mtl = 6
van = 60
[[regions]]
name = "tor"
client_cidrs = ["192.0.2.0/24", "2001:db8:1::/48"]
discovery = [{ id = "disc-tor-1", addr = "127.0.1.1", port = 7070, health = "http://127.0.1.1:7070/health" },
             { id = "disc-tor-2", addr = "::1", port = 7070, health = "http://127.0.1.2:7070/health" }]
api = [{ id = "rtr-tor-1", addr = "127.0.1.3", port = 8080, health = "http://127.0.1.3:8080/health" }]
[[regions]]
name = "mtl"
client_cidrs = ["198.51.100.0/24"]
discovery = [{ id = "disc-mtl-1", addr = "127.0.2.1", port = 7070, health = "http://127.0.2.1:7070/health" }]
[[regions]]
name = "van"
client_cidrs = ["203.0.113.0/24"]
discovery = [{ id = "disc-van-1", addr = "127.0.3.1", port = 7070, health = "http://127.0.3.1:7070/health" }]
"#;

fn server() -> &'static (Answerer, View) {
    static S: OnceLock<(Answerer, View)> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = DnsConfig::from_toml(CONFIG).expect("the fuzz config is valid");
        let view = cfg.view(|id| if id == "disc-mtl-1" { (false, true) } else { (true, false) });
        (Answerer::new(&cfg).expect("the fuzz config is valid"), view)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, query)) = data.split_first() else { return };
    let (tcp, v6) = (mode & 1 == 1, mode & 2 == 2);
    let src: IpAddr = if v6 { "2001:db8:1::53".parse().unwrap() } else { "198.51.100.53".parse().unwrap() };
    let (answerer, view) = server();
    let Some(out) = answerer.respond(query, src, !tcp, view) else { return };
    let reply = Message::from_vec(&out).expect("every answer decodes");
    assert_eq!(&out[..2], &query[..2], "the query's id");
    if !tcp {
        assert!(out.len() <= 1232, "{} bytes over UDP", out.len());
    }
    if let Ok(q) = Message::from_vec(query) {
        if !tcp && q.edns.is_none() {
            assert!(out.len() <= 512, "{} bytes without EDNS", out.len());
        }
        if reply.metadata.response_code == ResponseCode::Refused {
            assert!(reply.answers.is_empty());
        }
    }
});
