//! Which targets an answer names, and for how long it may be cached.

use std::net::IpAddr;

/// What a name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Discovery replicas (`discovery.<zone>`).
    Discovery,
    /// Regional routers (`api.<zone>`).
    Api,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Discovery => "discovery",
            Kind::Api => "api",
        }
    }
}

/// One target as answers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetView {
    pub id: String,
    pub addr: IpAddr,
    pub port: u16,
    pub up: bool,
    /// Its state changed recently, or it is on its way back: answers naming its region carry
    /// the short TTL.
    pub changing: bool,
}

/// One region's targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionView {
    pub name: String,
    pub discovery: Vec<TargetView>,
    pub api: Vec<TargetView>,
}

impl RegionView {
    pub fn targets(&self, kind: Kind) -> &[TargetView] {
        match kind {
            Kind::Discovery => &self.discovery,
            Kind::Api => &self.api,
        }
    }
}

/// The fleet as the server answers from it: immutable, rebuilt whenever a target changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub regions: Vec<RegionView>,
    /// For each region, every region nearest first (itself first; then by distance, unknown
    /// distances last, ties by name).
    by_distance: Vec<Vec<usize>>,
    /// `by_distance` with demoted regions moved last (see [`View::demote`]).
    nearest: Vec<Vec<usize>>,
}

impl View {
    /// `distance(a, b)`: the configured distance between two regions, if any (either order).
    pub fn new(regions: Vec<RegionView>, distance: impl Fn(&str, &str) -> Option<u32>) -> View {
        let nearest = (0..regions.len())
            .map(|from| {
                let mut order: Vec<usize> = (0..regions.len()).collect();
                let d = |to: usize| {
                    if to == from {
                        return (0, 0);
                    }
                    let (a, b) = (&regions[from].name, &regions[to].name);
                    (1, distance(a, b).or_else(|| distance(b, a)).map_or(u64::MAX, u64::from))
                };
                order.sort_by(|x, y| {
                    d(*x).cmp(&d(*y)).then_with(|| regions[*x].name.cmp(&regions[*y].name))
                });
                order
            })
            .collect::<Vec<_>>();
        View { regions, by_distance: nearest.clone(), nearest }
    }

    /// Ranks each `demoted[r]` region after every region that is not, keeping distance order
    /// within each group (the topology bus shows the region's nodes, none of them serving).
    /// Demotion only reorders: a demoted region is still answered when it is all there is.
    pub fn demote(&mut self, demoted: &[bool]) {
        let is = |r: &usize| demoted.get(*r).copied().unwrap_or(false);
        self.nearest = self.by_distance.clone();
        for order in &mut self.nearest {
            order.sort_by_key(|r| is(r)); // stable: distance order stays within each group
        }
    }

    pub fn region_index(&self, name: &str) -> Option<usize> {
        self.regions.iter().position(|r| r.name.eq_ignore_ascii_case(name))
    }

    /// Every region, nearest to `from` first.
    pub fn nearest(&self, from: usize) -> &[usize] {
        self.nearest.get(from).map_or(&[], Vec::as_slice)
    }

    /// A target by its id.
    pub fn target(&self, kind: Kind, id: &str) -> Option<(usize, &TargetView)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            r.targets(kind).iter().find(|t| t.id.eq_ignore_ascii_case(id)).map(|t| (i, t))
        })
    }
}

/// An answer's TTLs: calm, and while a target it covers is changing (gdnsd's DYNA TTLs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl {
    pub calm_s: u32,
    pub changing_s: u32,
}

impl Default for Ttl {
    fn default() -> Self {
        Ttl { calm_s: 30, changing_s: 10 }
    }
}

/// What an answer names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection<'a> {
    /// In order of preference (SRV priority follows it).
    pub targets: Vec<&'a TargetView>,
    pub ttl_s: u32,
    /// No target it could name was healthy: it names them all rather than nothing.
    pub fail_open: bool,
    /// The region the first target is in.
    pub region: Option<usize>,
}

/// `v` rotated left by `by` (load spread within a region, stable per client subnet).
fn rotated(v: Vec<&TargetView>, by: u64) -> Vec<&TargetView> {
    let mut v = v;
    if !v.is_empty() {
        let n = (by % v.len() as u64) as usize;
        v.rotate_left(n);
    }
    v
}

/// The targets of `kind` an answer names for a client placed in region `from`: `pinned`, a
/// region's own names (`<region>.<kind>.<zone>`), or the nearest healthy ones. `spread`:
/// a stable hash of the client's subnet (rotates the order within a region). `count`: at most
/// this many targets (at least 1).
///
/// Unpinned: the nearest region with a healthy target gives all but one place when another
/// region has a healthy target too (a standby elsewhere, as discovery's `top_k` keeps), then
/// the next regions in order. Pinned: that region's healthy targets only. Neither ever names
/// an unhealthy target while a healthy one could be named; when none could, all are named
/// (`fail_open`), nearest first, with the short TTL.
pub fn select<'a>(
    view: &'a View,
    kind: Kind,
    from: usize,
    pinned: Option<usize>,
    spread: u64,
    count: usize,
    ttl: Ttl,
) -> Selection<'a> {
    let count = count.max(1);
    let regions: Vec<usize> = match pinned {
        Some(p) if p < view.regions.len() => vec![p],
        Some(_) => vec![],
        None => view.nearest(from).to_vec(),
    };
    let changing =
        regions.iter().any(|r| view.regions[*r].targets(kind).iter().any(|t| t.changing));
    let pick = |only_up: bool| -> Vec<Vec<&'a TargetView>> {
        regions
            .iter()
            .map(|r| {
                let v = view.regions[*r].targets(kind).iter().filter(|t| t.up || !only_up);
                rotated(v.collect(), spread)
            })
            .collect()
    };
    let healthy = pick(true);
    let (chosen, fail_open) = match healthy.iter().position(|v| !v.is_empty()) {
        Some(first) => {
            let others: Vec<&TargetView> = healthy[first + 1..].iter().flatten().copied().collect();
            let from_first = if others.is_empty() { count } else { (count - 1).max(1) };
            let mut chosen: Vec<&TargetView> =
                healthy[first].iter().copied().take(from_first).collect();
            let room = count.saturating_sub(chosen.len());
            chosen.extend(others.into_iter().take(room));
            (chosen, false)
        }
        None => (pick(false).into_iter().flatten().take(count).collect(), true),
    };
    let region = chosen.first().and_then(|t| {
        regions
            .iter()
            .copied()
            .find(|r| view.regions[*r].targets(kind).iter().any(|x| x.id == t.id))
    });
    let ttl_s = if changing || fail_open { ttl.changing_s } else { ttl.calm_s };
    Selection { targets: chosen, ttl_s, fail_open, region }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;
    use proptest::prelude::*;

    fn target(id: &str, up: bool) -> TargetView {
        TargetView {
            id: id.into(),
            addr: "127.0.0.1".parse().unwrap(),
            port: 7070,
            up,
            changing: false,
        }
    }

    /// tor, mtl, van; tor–mtl 6 ms, tor–van 60, mtl–van 65; two discovery replicas and one
    /// router each.
    fn fleet() -> View {
        let region = |name: &str| RegionView {
            name: name.into(),
            discovery: vec![
                target(&format!("disc-{name}-1"), true),
                target(&format!("disc-{name}-2"), true),
            ],
            api: vec![target(&format!("rtr-{name}-1"), true)],
        };
        let d = |a: &str, b: &str| match (a, b) {
            ("tor", "mtl") => Some(6),
            ("tor", "van") => Some(60),
            ("mtl", "van") => Some(65),
            _ => None,
        };
        View::new(vec![region("van"), region("tor"), region("mtl")], d)
    }

    fn ids(s: &Selection<'_>) -> Vec<String> {
        s.targets.iter().map(|t| t.id.clone()).collect()
    }

    fn down(view: &mut View, id: &str) {
        for r in &mut view.regions {
            for t in r.discovery.iter_mut().chain(r.api.iter_mut()) {
                if t.id == id {
                    t.up = false;
                    t.changing = true;
                }
            }
        }
    }

    #[test]
    fn regions_are_ordered_by_distance_from_each_region() {
        let v = fleet();
        let names = |from: usize| -> Vec<&str> {
            v.nearest(from).iter().map(|i| v.regions[*i].name.as_str()).collect()
        };
        assert_eq!(names(1), ["tor", "mtl", "van"]);
        assert_eq!(names(2), ["mtl", "tor", "van"]);
        assert_eq!(names(0), ["van", "tor", "mtl"]);
    }

    #[test]
    fn three_targets_nearest_first_with_a_standby_in_another_region() {
        let v = fleet();
        let s = select(&v, Kind::Discovery, 1, None, 0, 3, Ttl::default());
        assert_eq!(ids(&s), ["disc-tor-1", "disc-tor-2", "disc-mtl-1"]);
        assert_eq!((s.ttl_s, s.fail_open, s.region), (30, false, Some(1)));
        // Two places: one home, one standby elsewhere.
        let s = select(&v, Kind::Discovery, 1, None, 0, 2, Ttl::default());
        assert_eq!(ids(&s), ["disc-tor-1", "disc-mtl-1"]);
        // The spread rotates within each region, stably.
        let s = select(&v, Kind::Discovery, 1, None, 1, 3, Ttl::default());
        assert_eq!(ids(&s), ["disc-tor-2", "disc-tor-1", "disc-mtl-2"]);
    }

    #[test]
    fn a_region_with_nothing_healthy_is_skipped_and_the_ttl_is_short() {
        let mut v = fleet();
        down(&mut v, "disc-tor-1");
        down(&mut v, "disc-tor-2");
        let s = select(&v, Kind::Discovery, 1, None, 0, 3, Ttl::default());
        assert_eq!(ids(&s), ["disc-mtl-1", "disc-mtl-2", "disc-van-1"]);
        assert_eq!((s.ttl_s, s.region), (10, Some(2)));
        // Routers are another kind: their answers stay calm.
        let s = select(&v, Kind::Api, 1, None, 0, 3, Ttl::default());
        assert_eq!((ids(&s)[0].as_str(), s.ttl_s), ("rtr-tor-1", 30));
    }

    #[test]
    fn a_demoted_region_ranks_after_serving_ones_but_is_never_withdrawn() {
        let mut v = fleet();
        // The bus shows tor's nodes, none serving: tor's clients are sent to mtl first.
        v.demote(&[false, true, false]);
        let s = select(&v, Kind::Discovery, 1, None, 0, 3, Ttl::default());
        assert_eq!(ids(&s), ["disc-mtl-1", "disc-mtl-2", "disc-van-1"]);
        // Pinned names ignore demotion (residency: the caller asked for that region).
        let s = select(&v, Kind::Discovery, 2, Some(1), 0, 3, Ttl::default());
        assert_eq!(ids(&s), ["disc-tor-1", "disc-tor-2"]);
        // Every region demoted, or none: plain distance order again.
        for all in [true, false] {
            v.demote(&[all, all, all]);
            let names: Vec<&str> =
                v.nearest(1).iter().map(|i| v.regions[*i].name.as_str()).collect();
            assert_eq!(names, ["tor", "mtl", "van"]);
        }
        // With the only healthy targets in a demoted region, they are still answered.
        let mut x = fleet();
        for id in ["disc-tor-1", "disc-tor-2", "disc-van-1", "disc-van-2"] {
            down(&mut x, id);
        }
        x.demote(&[false, false, true]);
        let s = select(&x, Kind::Discovery, 1, None, 0, 3, Ttl::default());
        assert_eq!(
            (ids(&s), s.fail_open),
            (vec!["disc-mtl-1".to_owned(), "disc-mtl-2".to_owned()], false)
        );
    }

    #[test]
    fn a_pinned_name_answers_its_region_only_and_fails_open_inside_it() {
        let mut v = fleet();
        let s = select(&v, Kind::Discovery, 1, Some(0), 0, 3, Ttl::default());
        assert_eq!(ids(&s), ["disc-van-1", "disc-van-2"]);
        down(&mut v, "disc-van-1");
        down(&mut v, "disc-van-2");
        let s = select(&v, Kind::Discovery, 1, Some(0), 0, 3, Ttl::default());
        assert_eq!(ids(&s), ["disc-van-1", "disc-van-2"], "never another region's");
        assert!(s.fail_open);
    }

    #[test]
    fn when_nothing_is_healthy_every_target_is_answered_nearest_first() {
        let mut v = fleet();
        for r in ["tor", "mtl", "van"] {
            down(&mut v, &format!("rtr-{r}-1"));
        }
        let s = select(&v, Kind::Api, 2, None, 0, 3, Ttl::default());
        assert_eq!(ids(&s), ["rtr-mtl-1", "rtr-tor-1", "rtr-van-1"]);
        assert_eq!((s.fail_open, s.ttl_s), (true, 10));
    }

    proptest! {
        /// Whatever is up: never an empty answer while targets exist; never a down target
        /// while an up one could be named; at most `count`; pinned answers stay home; the
        /// first target is in the nearest region that has a healthy one.
        #[test]
        fn invariants(
            ups in proptest::collection::vec(any::<bool>(), 6),
            from in 0usize..3,
            pin in proptest::option::of(0usize..3),
            spread in any::<u64>(),
            count in 1usize..5,
        ) {
            let mut v = fleet();
            let mut k = 0;
            for r in &mut v.regions {
                for t in &mut r.discovery {
                    t.up = ups[k];
                    k += 1;
                }
            }
            let s = select(&v, Kind::Discovery, from, pin, spread, count, Ttl::default());
            prop_assert!(!s.targets.is_empty() && s.targets.len() <= count);
            let allowed: Vec<usize> = match pin { Some(p) => vec![p], None => vec![0, 1, 2] };
            let any_up = allowed.iter().any(|r| v.regions[*r].discovery.iter().any(|t| t.up));
            prop_assert_eq!(s.fail_open, !any_up);
            if any_up {
                prop_assert!(s.targets.iter().all(|t| t.up));
            }
            for t in &s.targets {
                let (r, _) = v.target(Kind::Discovery, &t.id).unwrap();
                prop_assert!(allowed.contains(&r), "{} is outside the pinned region", t.id);
            }
            if any_up && pin.is_none() {
                let first = v.nearest(from).iter().copied()
                    .find(|r| v.regions[*r].discovery.iter().any(|t| t.up)).unwrap();
                prop_assert_eq!(s.region, Some(first));
            }
        }
    }
}
