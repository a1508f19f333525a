//! Regions from a MaxMind-format database (`.mmdb`): a GeoIP2/GeoLite2 file, or one the
//! operator writes with their own ranges.
//!
//! A record places its range in a region by, in order: an `edgeroute_region` string naming a
//! region (a database written for the fleet), else `country.iso_code` through the config's
//! `country_to_region` (a GeoIP2/GeoLite2 Country or City database). Anything else — no
//! record, a region the config does not know, a country with no mapping — places nobody, and
//! the default region answers. The file is read once into memory at start: a lookup is a
//! walk of its search tree, no I/O.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

use maxminddb::{PathElement, Reader};

use crate::geo::RegionDb;

/// A loaded database and how its records map to regions.
#[derive(Debug)]
pub struct MmdbRegions {
    reader: Reader<Vec<u8>>,
    /// Region names (lowercase) to indices.
    by_name: HashMap<String, usize>,
    /// ISO 3166-1 alpha-2 codes (uppercase) to region indices.
    by_country: HashMap<String, usize>,
}

impl MmdbRegions {
    /// Opens `path`. `regions`: the config's region names, in order; `country_to_region`:
    /// ISO country codes to region names (every name must be one of `regions`).
    pub fn open(
        path: &Path,
        regions: &[&str],
        country_to_region: &BTreeMap<String, String>,
    ) -> Result<MmdbRegions, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        MmdbRegions::from_bytes(bytes, regions, country_to_region)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// As [`MmdbRegions::open`], from the file's bytes.
    pub fn from_bytes(
        bytes: Vec<u8>,
        regions: &[&str],
        country_to_region: &BTreeMap<String, String>,
    ) -> Result<MmdbRegions, String> {
        let reader =
            Reader::from_source(bytes).map_err(|e| format!("not a MaxMind database: {e}"))?;
        let by_name: HashMap<String, usize> =
            regions.iter().enumerate().map(|(i, r)| (r.to_ascii_lowercase(), i)).collect();
        let mut by_country = HashMap::new();
        for (cc, region) in country_to_region {
            let Some(i) = by_name.get(&region.to_ascii_lowercase()) else {
                return Err(format!("country {cc}: `{region}` is no region"));
            };
            by_country.insert(cc.to_ascii_uppercase(), *i);
        }
        Ok(MmdbRegions { reader, by_name, by_country })
    }

    /// The database's type, as its metadata names it (e.g. `GeoLite2-Country`).
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }
}

impl RegionDb for MmdbRegions {
    fn region_of(&self, ip: IpAddr) -> Option<usize> {
        let found = self.reader.lookup(ip).ok()?;
        if !found.has_data() {
            return None;
        }
        let named: Option<String> =
            found.decode_path(&[PathElement::Key("edgeroute_region")]).ok().flatten();
        if let Some(i) = named.and_then(|n| self.by_name.get(&n.to_ascii_lowercase()).copied()) {
            return Some(i);
        }
        let cc: Option<String> = found
            .decode_path(&[PathElement::Key("country"), PathElement::Key("iso_code")])
            .ok()
            .flatten();
        cc.and_then(|c| self.by_country.get(&c.to_ascii_uppercase()).copied())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    /// A database as an operator would write one: documentation ranges named by region, one
    /// range by country only, one range with a region the config does not know.
    pub(crate) fn test_mmdb() -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Named<'a> {
            edgeroute_region: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Country<'a> {
            iso_code: &'a str,
        }
        #[derive(serde::Serialize)]
        struct ByCountry<'a> {
            country: Country<'a>,
        }
        let mut w = mmdb_writer::Writer::new("edgeroute-test");
        let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        w.insert(net("192.0.2.0/24"), &Named { edgeroute_region: "tor" }).unwrap();
        w.insert(net("198.51.100.0/24"), &Named { edgeroute_region: "MTL" }).unwrap();
        w.insert(net("2001:db8:3::/48"), &Named { edgeroute_region: "van" }).unwrap();
        w.insert(net("203.0.113.0/24"), &ByCountry { country: Country { iso_code: "ca" } })
            .unwrap();
        w.insert(net("100.64.0.0/10"), &Named { edgeroute_region: "sea" }).unwrap();
        w.to_bytes().unwrap()
    }

    fn db() -> MmdbRegions {
        let countries = BTreeMap::from([("CA".to_owned(), "van".to_owned())]);
        MmdbRegions::from_bytes(test_mmdb(), &["tor", "mtl", "van"], &countries).unwrap()
    }

    #[test]
    fn a_written_database_maps_ranges_to_regions() {
        let db = db();
        assert_eq!(db.database_type(), "edgeroute-test");
        let at = |s: &str| db.region_of(s.parse().unwrap());
        assert_eq!(at("192.0.2.77"), Some(0));
        assert_eq!(at("198.51.100.1"), Some(1), "region names match without case");
        assert_eq!(at("2001:db8:3:1::9"), Some(2));
        assert_eq!(at("203.0.113.5"), Some(2), "by country");
        assert_eq!(at("100.64.1.1"), None, "a region the config does not know places nobody");
        assert_eq!(at("8.8.8.8"), None, "no record");
    }

    #[test]
    fn a_bad_file_or_mapping_is_refused_with_its_reason() {
        let e = MmdbRegions::from_bytes(b"not a database".to_vec(), &["tor"], &BTreeMap::new())
            .unwrap_err();
        assert!(e.contains("not a MaxMind database"), "{e}");
        let countries = BTreeMap::from([("US".to_owned(), "sea".to_owned())]);
        let e = MmdbRegions::from_bytes(test_mmdb(), &["tor"], &countries).unwrap_err();
        assert!(e.contains("`sea` is no region"), "{e}");
        let e = MmdbRegions::open(Path::new("/nonexistent.mmdb"), &["tor"], &BTreeMap::new())
            .unwrap_err();
        assert!(e.contains("/nonexistent.mmdb"), "{e}");
    }
}
