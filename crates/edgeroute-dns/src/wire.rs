//! DNS messages in and out (hickory-proto's codec): one query's bytes to its answer's bytes.
//!
//! [`Answerer::respond`] is the whole server short of sockets: it decodes the query, refuses
//! what an authoritative server for one zone must refuse, places the client
//! ([`crate::geo`]), picks the targets ([`crate::decide`]) and encodes the answer within the
//! size the transport allows. No I/O, no clock: the caller passes the current [`View`].
//!
//! | query | answer |
//! |---|---|
//! | not a query (QR set), under 12 bytes | nothing (dropped) |
//! | undecodable, more than one question | FORMERR |
//! | EDNS version > 0 | BADVERS |
//! | opcode other than QUERY | NOTIMP |
//! | class other than IN, ANY, AXFR, IXFR, a name outside the zone | REFUSED |
//! | `[_edgeroute._tcp.][<region>.]{discovery,api}.<zone>` | A/AAAA (SRV on the `_edgeroute._tcp` names, with the targets' addresses in Additional), TXT saying where the client was placed |
//! | `<target id>.{discovery,api}.<zone>` | its address |
//! | the apex | SOA, NS |
//! | another name in the zone | NXDOMAIN; another type of a known name: no data (SOA in Authority) |
//!
//! Answers are authoritative (AA) and never recursive (RA clear). The question goes back as
//! asked (its case too). Over UDP an answer never exceeds what the query's EDNS allows (512
//! bytes without EDNS), nor `max_udp_payload`: Additional is dropped first, then the answer is
//! truncated (TC) and the client asks again over TCP. The client's EDNS Client Subnet is
//! echoed with the scope the answer holds for.

use std::net::IpAddr;
use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::config::{ConfigError, DnsConfig};
use crate::decide::{Kind, Selection, TargetView, Ttl, View, select};
use crate::geo::{Ecs, Located, Locator};
use crate::names::{Question, parse_name};

/// What the server answers with, built once from the config.
#[derive(Debug, Clone)]
pub struct Answerer {
    zone: String,
    zone_name: Name,
    locator: Locator,
    ttl: Ttl,
    count: usize,
    max_udp: u16,
    soa: SOA,
    soa_minimum: u32,
    nameservers: Vec<Name>,
}

fn name(s: &str, key: &str) -> Result<Name, ConfigError> {
    let s = if s.ends_with('.') { s.to_owned() } else { format!("{s}.") };
    Name::from_str(&s).map_err(|e| ConfigError::Invalid { key: key.into(), message: e.to_string() })
}

impl Answerer {
    pub fn new(cfg: &DnsConfig) -> Result<Answerer, ConfigError> {
        cfg.validate()?;
        let zone = cfg.zone.strip_suffix('.').unwrap_or(&cfg.zone).to_ascii_lowercase();
        let zone_name = name(&zone, "zone")?;
        let mname = match &cfg.soa.mname {
            Some(m) => name(m, "soa.mname")?,
            None => name(&format!("ns1.{zone}"), "zone")?,
        };
        let rname = match &cfg.soa.rname {
            Some(r) => name(r, "soa.rname")?,
            None => name(&format!("hostmaster.{zone}"), "zone")?,
        };
        let s = &cfg.soa;
        let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
        let soa = SOA::new(
            mname.clone(),
            rname,
            s.serial,
            clamp(s.refresh),
            clamp(s.retry),
            clamp(s.expire),
            s.minimum,
        );
        let nameservers = if cfg.nameservers.is_empty() {
            vec![mname]
        } else {
            cfg.nameservers.iter().map(|n| name(n, "nameservers")).collect::<Result<_, _>>()?
        };
        Ok(Answerer {
            zone,
            zone_name,
            locator: cfg.locator()?,
            ttl: cfg.ttl(),
            count: cfg.answers.count,
            max_udp: cfg.answers.max_udp_payload,
            soa,
            soa_minimum: cfg.soa.minimum,
            nameservers,
        })
    }

    /// The answer to one query's bytes from `src` (the resolver), over UDP when `udp`, with
    /// the fleet as `view` says. `None`: nothing is sent (not a query, or too short to be one).
    pub fn respond(&self, bytes: &[u8], src: IpAddr, udp: bool, view: &View) -> Option<Vec<u8>> {
        let req = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(_) => {
                // A header we can answer FORMERR to, unless it says it is a response.
                if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
                    return None;
                }
                let id = u16::from_be_bytes([bytes[0], bytes[1]]);
                let res = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                return res.to_vec().ok();
            }
        };
        if req.metadata.message_type == MessageType::Response {
            return None;
        }
        let limit = match (&req.edns, udp) {
            (_, false) => usize::from(u16::MAX),
            (None, true) => 512,
            (Some(e), true) => usize::from(e.max_payload().clamp(512, self.max_udp.max(512))),
        };
        let mut res = Message::response(req.metadata.id, req.metadata.op_code);
        res.metadata.recursion_desired = req.metadata.recursion_desired;
        res.add_queries(req.queries.iter().cloned());
        let ecs = req.edns.as_ref().and_then(|e| match e.option(EdnsCode::Subnet) {
            Some(EdnsOption::Subnet(s)) => Some(*s),
            _ => None,
        });
        let mut edns = req.edns.as_ref().map(|_| {
            let mut e = Edns::new();
            e.set_max_payload(self.max_udp.max(512));
            e
        });
        let code = self.answer(&req, src, ecs.as_ref(), view, &mut res, edns.as_mut());
        res.metadata.response_code = code;
        if let Some(e) = edns {
            res.set_edns(e);
        }
        encode(res, limit)
    }

    /// Fills `res` for `req`; its response code.
    fn answer(
        &self,
        req: &Message,
        src: IpAddr,
        ecs: Option<&ClientSubnet>,
        view: &View,
        res: &mut Message,
        edns: Option<&mut Edns>,
    ) -> ResponseCode {
        if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return ResponseCode::BADVERS;
        }
        if req.metadata.op_code != OpCode::Query {
            return ResponseCode::NotImp;
        }
        let [q] = req.queries.as_slice() else { return ResponseCode::FormErr };
        let qtype = q.query_type();
        if q.query_class() != DNSClass::IN
            || matches!(qtype, RecordType::ANY | RecordType::AXFR | RecordType::IXFR)
        {
            return ResponseCode::Refused;
        }
        let question = parse_name(&q.name().to_ascii(), &self.zone);
        if question == Question::Outside {
            return ResponseCode::Refused;
        }
        res.metadata.authoritative = true;
        let at = self
            .locator
            .locate(src, ecs.map(|s| Ecs { addr: s.addr(), source: s.source_prefix() }));
        if let (Some(e), Some(s), Some(scope)) = (edns, ecs, at.scope) {
            let echo = ClientSubnet::new(s.addr(), s.source_prefix(), scope);
            e.options_mut().insert(EdnsOption::Subnet(echo));
        }
        match question {
            Question::Outside => ResponseCode::Refused,
            Question::Unknown => self.negative(res, ResponseCode::NXDomain),
            Question::Apex => {
                match qtype {
                    RecordType::SOA => {
                        let soa = RData::SOA(self.soa.clone());
                        res.add_answer(Record::from_rdata(q.name().clone(), self.soa_minimum, soa));
                    }
                    RecordType::NS => {
                        for ns in &self.nameservers {
                            let rd = RData::NS(NS(ns.clone()));
                            res.add_answer(Record::from_rdata(q.name().clone(), 3600, rd));
                        }
                    }
                    _ => return self.negative(res, ResponseCode::NoError),
                }
                ResponseCode::NoError
            }
            Question::Fleet { kind, label, srv } => {
                let pinned = match label.as_deref() {
                    None => None,
                    Some(l) => match view.region_index(l) {
                        Some(r) => Some(r),
                        None => match view.target(kind, l) {
                            // A target's own name: its address, no geography.
                            Some((_, t)) if !srv => {
                                return self.addresses(res, q, &[t], self.ttl.calm_s);
                            }
                            _ => return self.negative(res, ResponseCode::NXDomain),
                        },
                    },
                };
                let spread = spread(&at);
                let sel = select(view, kind, at.region, pinned, spread, self.count, self.ttl);
                if sel.targets.is_empty() {
                    return self.negative(res, ResponseCode::NoError);
                }
                match (qtype, srv) {
                    (RecordType::A | RecordType::AAAA, false) => {
                        self.addresses(res, q, &sel.targets, sel.ttl_s)
                    }
                    (RecordType::SRV, true) => self.services(res, q, kind, &sel),
                    (RecordType::TXT, false) => {
                        let region = sel.region.map_or("-", |r| view.regions[r].name.as_str());
                        let text = format!(
                            "region={region} client_region={} via={} net={} fail_open={} ttl={}",
                            view.regions.get(at.region).map_or("-", |r| r.name.as_str()),
                            at.why.as_str(),
                            at.subnet,
                            sel.fail_open,
                            sel.ttl_s
                        );
                        let rd = RData::TXT(TXT::new(vec![text]));
                        res.add_answer(Record::from_rdata(q.name().clone(), sel.ttl_s, rd));
                        ResponseCode::NoError
                    }
                    _ => self.negative(res, ResponseCode::NoError),
                }
            }
        }
    }

    /// No such name (NXDOMAIN) or no data of that type: the SOA in Authority.
    fn negative(&self, res: &mut Message, code: ResponseCode) -> ResponseCode {
        let soa = RData::SOA(self.soa.clone());
        res.add_authority(Record::from_rdata(self.zone_name.clone(), self.soa_minimum, soa));
        code
    }

    /// A or AAAA records for the targets of the query's family.
    fn addresses(
        &self,
        res: &mut Message,
        q: &Query,
        targets: &[&TargetView],
        ttl: u32,
    ) -> ResponseCode {
        let want_v4 = q.query_type() == RecordType::A;
        let mut any = false;
        for t in targets {
            if let Some(rd) = address(t.addr, want_v4) {
                res.add_answer(Record::from_rdata(q.name().clone(), ttl, rd));
                any = true;
            }
        }
        if !any {
            return self.negative(res, ResponseCode::NoError);
        }
        ResponseCode::NoError
    }

    /// SRV records in order of preference (priority = rank), each target's address in
    /// Additional.
    fn services(
        &self,
        res: &mut Message,
        q: &Query,
        kind: Kind,
        sel: &Selection<'_>,
    ) -> ResponseCode {
        for (rank, t) in sel.targets.iter().enumerate() {
            let host = format!("{}.{}.{}.", t.id, kind.label(), self.zone);
            let Ok(host) = Name::from_str(&host) else { continue };
            let priority = u16::try_from(rank).unwrap_or(u16::MAX);
            let srv = RData::SRV(SRV::new(priority, 1, t.port, host.clone()));
            res.add_answer(Record::from_rdata(q.name().clone(), sel.ttl_s, srv));
            for v4 in [true, false] {
                if let Some(rd) = address(t.addr, v4) {
                    res.add_additional(Record::from_rdata(host.clone(), sel.ttl_s, rd));
                }
            }
        }
        ResponseCode::NoError
    }
}

fn address(ip: IpAddr, v4: bool) -> Option<RData> {
    match (ip, v4) {
        (IpAddr::V4(a), true) => Some(RData::A(A(a))),
        (IpAddr::V6(a), false) => Some(RData::AAAA(AAAA(a))),
        _ => None,
    }
}

/// A stable hash of the client's subnet (FNV-1a): clients of one subnet see one order.
fn spread(at: &Located) -> u64 {
    let bytes = match at.subnet.addr() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// Encodes `res` within `limit` bytes: Additional goes first, then the answer is truncated.
fn encode(mut res: Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = res.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    // Keep the OPT record (it is not in `additionals`: hickory holds it as `edns`).
    res.additionals.clear();
    if let Ok(b) = res.to_vec()
        && b.len() <= limit
    {
        return Some(b);
    }
    let mut cut = res.truncate();
    cut.metadata.id = res.metadata.id;
    cut.to_vec().ok().filter(|b| b.len() <= limit)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;
    use crate::config::tests::SAMPLE;
    use proptest::prelude::*;

    const RESOLVER: &str = "10.9.8.7";

    fn setup(text: &str) -> (Answerer, View) {
        let cfg = DnsConfig::from_toml(text).unwrap();
        (Answerer::new(&cfg).unwrap(), cfg.view(|_| (true, false)))
    }

    fn query(name: &str, qtype: RecordType, ecs: Option<&str>, bufsize: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        // `from_ascii` keeps the case (`from_str` lowers it).
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if bufsize.is_some() || ecs.is_some() {
            let mut e = Edns::new();
            e.set_max_payload(bufsize.unwrap_or(1232));
            if let Some(net) = ecs {
                e.options_mut().insert(EdnsOption::Subnet(net.parse().unwrap()));
            }
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn ask(a: &Answerer, v: &View, q: &[u8], udp: bool) -> Message {
        Message::from_vec(&a.respond(q, RESOLVER.parse().unwrap(), udp, v).unwrap()).unwrap()
    }

    fn addrs(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => format!("{other}"),
            })
            .collect()
    }

    #[test]
    fn a_subnet_from_each_region_gets_that_regions_replicas_first() {
        let (a, v) = setup(SAMPLE);
        for (net, first) in [
            ("192.0.2.0/24", "127.0.1.1"),
            ("198.51.100.0/24", "127.0.2.1"),
            ("203.0.113.0/24", "127.0.3.1"),
        ] {
            let q = query("discovery.edge.example.net.", RecordType::A, Some(net), None);
            let m = ask(&a, &v, &q, true);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert!(m.metadata.authoritative && !m.metadata.recursion_available);
            assert_eq!(m.metadata.id, 4242);
            assert_eq!(addrs(&m)[0], first, "{net}");
            assert_eq!(m.answers.len(), 3);
            assert_eq!(m.answers[0].ttl, 30);
            let Some(EdnsOption::Subnet(echo)) =
                m.edns.as_ref().and_then(|e| e.option(EdnsCode::Subnet))
            else {
                panic!("no ECS echoed for {net}")
            };
            assert_eq!((echo.source_prefix(), echo.scope_prefix()), (24, 24));
        }
        // No ECS: the resolver's address (unplaced: the default region, tor).
        let m = ask(&a, &v, &query("api.edge.example.net.", RecordType::A, None, None), true);
        assert_eq!(addrs(&m), ["127.0.1.3"]);
        assert!(m.edns.is_none(), "no EDNS asked, none answered");
    }

    #[test]
    fn a_region_down_is_left_out_and_the_ttl_is_short() {
        let cfg = DnsConfig::from_toml(SAMPLE).unwrap();
        let a = Answerer::new(&cfg).unwrap();
        let v = cfg.view(|id| if id == "disc-mtl-1" { (false, true) } else { (true, false) });
        let q = query("discovery.edge.example.net.", RecordType::A, Some("198.51.100.0/24"), None);
        let m = ask(&a, &v, &q, true);
        assert_eq!(addrs(&m), ["127.0.1.1", "127.0.3.1"]);
        assert_eq!(m.answers[0].ttl, 10);
        // Pinned to the dead region: its own target anyway (fail open), never another's.
        let q = query("mtl.discovery.edge.example.net.", RecordType::A, None, None);
        assert_eq!(addrs(&ask(&a, &v, &q, true)), ["127.0.2.1"]);
    }

    #[test]
    fn srv_answers_in_order_with_the_addresses_in_additional() {
        let (a, v) = setup(SAMPLE);
        let q = query(
            "_edgeroute._tcp.discovery.edge.example.net.",
            RecordType::SRV,
            Some("203.0.113.0/24"),
            None,
        );
        let m = ask(&a, &v, &q, true);
        let srv: Vec<(u16, String)> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => (s.priority, s.target.to_ascii()),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(
            srv,
            [
                (0, "disc-van-1.discovery.edge.example.net.".to_owned()),
                (1, "disc-tor-1.discovery.edge.example.net.".to_owned()),
                (2, "disc-mtl-1.discovery.edge.example.net.".to_owned())
            ]
        );
        assert_eq!(m.additionals.len(), 3);
        // A target's own name answers its address.
        let q = query("disc-van-1.discovery.edge.example.net.", RecordType::A, None, None);
        assert_eq!(addrs(&ask(&a, &v, &q, true)), ["127.0.3.1"]);
    }

    #[test]
    fn txt_says_where_the_client_was_placed_and_the_question_comes_back_as_asked() {
        let (a, v) = setup(SAMPLE);
        let q =
            query("DisCovery.EDGE.example.net.", RecordType::TXT, Some("198.51.100.77/32"), None);
        let m = ask(&a, &v, &q, true);
        assert_eq!(m.queries[0].name().to_ascii(), "DisCovery.EDGE.example.net.");
        let text = format!("{}", m.answers[0].data);
        assert!(text.contains("region=mtl") && text.contains("via=ecs"), "{text}");
        assert!(text.contains("net=198.51.100.0/24"), "{text}");
    }

    #[test]
    fn unknown_names_are_nxdomain_and_other_types_no_data_with_the_soa() {
        let (a, v) = setup(SAMPLE);
        let m = ask(&a, &v, &query("www.edge.example.net.", RecordType::A, None, None), true);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(matches!(m.authorities[0].data, RData::SOA(_)));
        assert_eq!(m.authorities[0].ttl, 30);
        let m = ask(&a, &v, &query("api.edge.example.net.", RecordType::MX, None, None), true);
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
        assert!(matches!(m.authorities[0].data, RData::SOA(_)));
        let m = ask(&a, &v, &query("sea.api.edge.example.net.", RecordType::A, None, None), true);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = ask(&a, &v, &query("edge.example.net.", RecordType::NS, None, None), true);
        assert_eq!(format!("{}", m.answers[0].data), "ns1.edge.example.net.");
        let m = ask(&a, &v, &query("edge.example.net.", RecordType::SOA, None, None), true);
        assert!(matches!(m.answers[0].data, RData::SOA(_)));
    }

    #[test]
    fn other_zones_any_and_transfers_are_refused_other_opcodes_not_implemented() {
        let (a, v) = setup(SAMPLE);
        for (name, t) in [
            ("example.org.", RecordType::A),
            ("api.edge.example.net.", RecordType::ANY),
            ("edge.example.net.", RecordType::AXFR),
        ] {
            let m = ask(&a, &v, &query(name, t, None, None), true);
            assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name} {t}");
            assert!(m.answers.is_empty());
        }
        let mut n =
            Message::from_vec(&query("api.edge.example.net.", RecordType::A, None, None)).unwrap();
        n.metadata.op_code = OpCode::Notify;
        let m = ask(&a, &v, &n.to_vec().unwrap(), true);
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    }

    #[test]
    fn garbage_is_formerr_and_responses_or_scraps_are_dropped() {
        let (a, v) = setup(SAMPLE);
        let src: IpAddr = RESOLVER.parse().unwrap();
        assert!(a.respond(b"short", src, true, &v).is_none());
        let mut bad = query("api.edge.example.net.", RecordType::A, None, None);
        bad.truncate(20);
        let m = Message::from_vec(&a.respond(&bad, src, true, &v).unwrap()).unwrap();
        assert_eq!((m.metadata.response_code, m.metadata.id), (ResponseCode::FormErr, 4242));
        let reply = a
            .respond(&query("api.edge.example.net.", RecordType::A, None, None), src, true, &v)
            .unwrap();
        assert!(a.respond(&reply, src, true, &v).is_none(), "a response is never answered");
        let mut two =
            Message::from_vec(&query("api.edge.example.net.", RecordType::A, None, None)).unwrap();
        two.add_query(Query::query(
            Name::from_str("discovery.edge.example.net.").unwrap(),
            RecordType::A,
        ));
        let m = ask(&a, &v, &two.to_vec().unwrap(), true);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        let mut v1 =
            Message::from_vec(&query("api.edge.example.net.", RecordType::A, None, Some(1232)))
                .unwrap();
        v1.edns.as_mut().unwrap().set_version(1);
        let m = ask(&a, &v, &v1.to_vec().unwrap(), true);
        // 16 is BADVERS in an answer with EDNS (hickory decodes it under its other name).
        assert_eq!(u16::from(m.metadata.response_code), 16);
    }

    /// A zone with 8 discovery replicas per region and long ids: SRV answers outgrow 512 bytes.
    fn big() -> String {
        let mut text = String::from(
            "zone = \"edge.example.net\"\ndefault_region = \"tor\"\n[answers]\ncount = 8\n",
        );
        for (r, net) in [("tor", 1), ("mtl", 2)] {
            text.push_str(&format!("[[regions]]\nname = \"{r}\"\nclient_cidrs = [\"127.0.{net}.0/24\"]\ndiscovery = [\n"));
            for i in 0..8 {
                let id = format!("a-rather-long-discovery-replica-name-{r}-{i}");
                text.push_str(&format!(
                    "{{ id = \"{id}\", addr = \"127.0.{net}.{}\", port = 7070, health = \"http://127.0.{net}.{}:7070/health\" }},\n",
                    i + 1, i + 1
                ));
            }
            text.push_str("]\n");
        }
        text
    }

    #[test]
    fn udp_answers_fit_what_the_query_allows_and_tcp_gets_them_whole() {
        let (a, v) = setup(&big());
        let name = "_edgeroute._tcp.discovery.edge.example.net.";
        let src: IpAddr = RESOLVER.parse().unwrap();
        let whole = Message::from_vec(
            &a.respond(&query(name, RecordType::SRV, None, None), src, false, &v).unwrap(),
        )
        .unwrap();
        assert_eq!((whole.answers.len(), whole.metadata.truncation), (8, false));
        for bufsize in [None, Some(512), Some(700), Some(4096)] {
            let bytes =
                a.respond(&query(name, RecordType::SRV, None, bufsize), src, true, &v).unwrap();
            let limit = bufsize.map_or(512, |b| usize::from(b.clamp(512, 1232)));
            assert!(bytes.len() <= limit, "{} bytes for bufsize {bufsize:?}", bytes.len());
            let m = Message::from_vec(&bytes).unwrap();
            assert_eq!(m.metadata.id, 4242);
            assert!(m.metadata.truncation || m.answers.len() == 8, "{bufsize:?}");
        }
    }

    proptest! {
        /// Whatever bytes arrive: no panic, and an answer over UDP never exceeds 1232 bytes.
        #[test]
        fn any_bytes_are_answered_within_bounds_or_dropped(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (a, v) = setup(SAMPLE);
            if let Some(out) = a.respond(&bytes, RESOLVER.parse().unwrap(), true, &v) {
                prop_assert!(out.len() <= 1232);
                prop_assert!(Message::from_vec(&out).is_ok());
            }
        }

        /// Real queries for the fleet's names, any case and any ECS: answered, within bounds,
        /// the id and question echoed.
        #[test]
        fn fleet_queries_are_answered(
            upper in any::<bool>(),
            kind in prop_oneof![Just("discovery"), Just("api")],
            octet in any::<u8>(),
            source in 0u8..=32,
        ) {
            let (a, v) = setup(SAMPLE);
            let name = format!("{kind}.edge.example.net.");
            let name = if upper { name.to_uppercase() } else { name };
            let net = format!("198.51.{octet}.0/{source}");
            let q = query(&name, RecordType::A, Some(&net), Some(512));
            let out = a.respond(&q, RESOLVER.parse().unwrap(), true, &v).unwrap();
            prop_assert!(out.len() <= 512);
            let m = Message::from_vec(&out).unwrap();
            prop_assert_eq!(m.metadata.id, 4242);
            prop_assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            prop_assert_eq!(m.queries[0].name().to_ascii(), name);
            prop_assert!(!m.answers.is_empty());
        }
    }
}
