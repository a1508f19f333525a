//! Child processes for benchmarks: start them in their own process group, kill the whole
//! group when the guard is dropped (normal exit, error or panic), and read their memory
//! from `/proc`.
//!
//! Why process groups: nginx's master forks workers, and killing only the master would
//! leave the workers serving, and holding the port, after the benchmark ends.
//! What this does not cover: a benchmark process that is itself SIGKILLed cannot run its
//! destructors, so its children outlive it.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;

/// How long a group gets to exit on SIGTERM before it is SIGKILLed.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// One supervised child.
#[derive(Debug)]
struct Supervised {
    name: String,
    child: Child,
    log: PathBuf,
}

/// Owns every child process a benchmark started and ends them all when dropped.
#[derive(Debug, Default)]
pub struct ProcessGuard {
    children: Vec<Supervised>,
}

impl ProcessGuard {
    pub fn new() -> Self {
        ProcessGuard::default()
    }

    /// Starts `cmd` in a new process group, with stdout and stderr appended to `log`.
    /// Returns the child's pid (also its process-group id).
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> io::Result<u32> {
        let out = File::options().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let child = cmd.spawn()?;
        let pid = child.id();
        self.children.push(Supervised { name: name.to_owned(), child, log: log.to_owned() });
        Ok(pid)
    }

    /// `Some(status)` once the named child has exited (it is reaped then).
    pub fn exited(&mut self, name: &str) -> Option<ExitStatus> {
        let c = self.children.iter_mut().find(|c| c.name == name)?;
        c.child.try_wait().ok().flatten()
    }

    /// The first child that has exited, with its name, status and the end of its log.
    pub fn first_exited(&mut self) -> Option<(String, ExitStatus, String)> {
        self.children.iter_mut().find_map(|c| {
            let status = c.child.try_wait().ok().flatten()?;
            Some((c.name.clone(), status, log_tail(&c.log, 2000)))
        })
    }

    /// The end of the named child's log, for error messages.
    pub fn log_tail(&self, name: &str) -> String {
        self.children
            .iter()
            .find(|c| c.name == name)
            .map(|c| log_tail(&c.log, 2000))
            .unwrap_or_default()
    }

    /// Terminates and reaps the named child (used to retry a start on another port).
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|c| c.name == name) {
            let mut c = self.children.remove(i);
            terminate(&mut c.child);
        }
    }

    /// Terminates every child, last started first.
    pub fn stop_all(&mut self) {
        while let Some(mut c) = self.children.pop() {
            terminate(&mut c.child);
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// SIGTERM to the child's process group, SIGKILL after a grace period, then reap.
fn terminate(child: &mut Child) {
    let Ok(pgid) = i32::try_from(child.id()) else {
        let _ = child.kill();
        let _ = child.wait();
        return;
    };
    let group = Pid::from_raw(pgid);
    // Signal the group even if the leader has exited: forked workers may still be alive.
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

fn log_tail(path: &Path, max: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else { return String::new() };
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Resident set size in bytes from the text of `/proc/PID/status` (`VmRSS:  1234 kB`).
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// The parent pid from the text of `/proc/PID/stat`. The command name is in parentheses
/// and may itself contain spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// RSS of one process in bytes; `None` if it is gone (or is a zombie, which has no VmRSS).
pub fn rss(pid: u32) -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `pid` and all its descendants (nginx: master plus workers), `pid` first.
pub fn tree(pid: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| {
                let child: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
                Some((child, parse_stat_ppid(&stat)?))
            })
            .collect()
        })
        .unwrap_or_default();
    let mut out = vec![pid];
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(child, ppid) in &all {
            if ppid == parent && child != pid {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// Summed RSS of `pid` and all its descendants (nginx: master plus workers).
/// Shared pages are counted once per process, as `ps` does.
pub fn tree_rss(pid: u32) -> Option<u64> {
    let first = rss(pid)?;
    Some(first + tree(pid).iter().skip(1).map(|&p| rss(p).unwrap_or(0)).sum::<u64>())
}

/// CPU time `pid` and all its descendants have used, in nanoseconds: the sum over their
/// threads of `/proc/PID/task/TID/schedstat`'s first field (time on a CPU, user and kernel,
/// nanosecond resolution — `/proc/PID/stat`'s ticks are too coarse for a 10 s phase).
pub fn tree_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = None;
    for p in tree(pid) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            if let Some(ns) = parse_schedstat_runtime(&stat) {
                *total.get_or_insert(0) += ns;
            }
        }
    }
    total
}

/// The machine's CPU time so far, in ticks, from `/proc/stat`: (stolen by the hypervisor, all).
pub fn cpu_ticks() -> Option<(u64, u64)> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// (steal, total) of `/proc/stat`'s `cpu` line: user, nice, system, idle, iowait, irq,
/// softirq, steal (guest time is already inside user and nice).
pub fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> =
        line.split_whitespace().skip(1).take(8).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    (f.len() == 8).then(|| (f[7], f.iter().sum()))
}

/// The share of the machine's CPU time the hypervisor took between two [`cpu_ticks`] readings.
pub fn steal_share(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let total = after.1.checked_sub(before.1).filter(|&t| t > 0)?;
    Some(after.0.saturating_sub(before.0) as f64 / total as f64)
}

pub fn parse_schedstat_runtime(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_eighth_cpu_field_over_all_eight() {
        let a = "cpu  100 10 20 800 5 0 5 60 7 0\ncpu0 50 5 10 400 2 0 2 30 0 0\n";
        let b = "cpu  200 10 40 900 5 0 5 140 9 0\n";
        assert_eq!(parse_proc_stat(a), Some((60, 1000)));
        assert_eq!(parse_proc_stat(b), Some((140, 1300)));
        assert_eq!(steal_share((60, 1000), (140, 1300)), Some(80.0 / 300.0));
        assert_eq!(steal_share((60, 1000), (60, 1000)), None, "no time passed");
        assert_eq!(parse_proc_stat("cpu  1 2 3\n"), None, "a short line is not read");
        assert_eq!(parse_proc_stat("intr 5\n"), None);
    }

    #[test]
    fn vm_rss_is_parsed_in_bytes() {
        let status = "Name:\tnginx\nVmPeak:\t   10 kB\nVmRSS:\t    4321 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(status), Some(4321 * 1024));
        assert_eq!(parse_vm_rss("Name:\tzombie\nState:\tZ (zombie)\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn schedstat_runtime_is_the_first_field() {
        assert_eq!(parse_schedstat_runtime("104325 346505 2\n"), Some(104_325));
        assert_eq!(parse_schedstat_runtime(""), None);
    }

    #[test]
    fn this_process_uses_cpu() {
        let me = std::process::id();
        let before = tree_cpu_ns(me).unwrap_or(0);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(tree_cpu_ns(me).unwrap_or(0) > before, "{x}");
        assert_eq!(tree(me)[0], me);
    }

    #[test]
    fn ppid_survives_odd_command_names() {
        assert_eq!(parse_stat_ppid("42 (nginx) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_stat_ppid("43 (a) b (c)) R 9 43 43 0"), Some(9));
        assert_eq!(parse_stat_ppid("garbage"), None);
    }

    #[test]
    fn own_rss_is_visible() {
        let me = std::process::id();
        // RSS moves between reads (other test threads allocate): bracket the tree reading
        // between two readings of our own and allow a little slack.
        let before = rss(me).unwrap();
        let tree = tree_rss(me).unwrap();
        let after = rss(me).unwrap();
        assert!(before > 0);
        assert!(tree >= before.min(after) * 9 / 10, "tree {tree} < own {before}/{after}");
    }

    fn alive(pid: u32) -> bool {
        // A reaped child has no /proc entry; a zombie would still show state Z.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }

    fn pids_in(path: &Path) -> Vec<u32> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    #[test]
    fn dropping_the_guard_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let mut guard = ProcessGuard::new();
        // A parent that forks a grandchild and ignores SIGTERM, like a stubborn server.
        let script = format!(
            "trap '' TERM; sleep 60 & echo $! >> {p}; echo $$ >> {p}; wait",
            p = pids.display()
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        let pid = guard.spawn("stubborn", cmd, &dir.path().join("log")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids_in(&pids).len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let all = pids_in(&pids);
        assert_eq!(all.len(), 2);
        assert!(all.contains(&pid));
        assert!(all.iter().all(|&p| alive(p)));
        assert!(tree_rss(pid).unwrap() > rss(pid).unwrap());
        drop(guard);
        // The grandchild is reparented to init (or a subreaper), which reaps it shortly.
        let deadline = Instant::now() + Duration::from_secs(5);
        while all.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in all {
            assert!(!alive(p), "pid {p} survived the guard");
        }
    }

    #[test]
    fn exited_children_are_reported_with_their_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut guard = ProcessGuard::new();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo 'bind: address in use' >&2; exit 3");
        guard.spawn("server", cmd, &dir.path().join("server.log")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let exited = loop {
            if let Some(e) = guard.first_exited() {
                break e;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(exited.0, "server");
        assert_eq!(exited.1.code(), Some(3));
        assert!(exited.2.contains("address in use"));
        assert!(guard.log_tail("server").contains("address in use"));
    }
}
