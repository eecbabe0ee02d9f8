//! What the run costs: etcd's own Prometheus metrics (names as etcd 3.4 exports them), and
//! this process's CPU, threads and memory from getrusage and /proc.

use std::collections::HashMap;
use std::io::Read as _;
use std::time::Duration;

/// One scrape of `/metrics`: every sample, summed over the label sets each name has.
#[derive(Debug, Default)]
struct Scrape {
    samples: Vec<(String, String, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let value: f64 = value.parse().ok()?;
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (name, labels.trim_end_matches('}')),
                    None => (series, ""),
                };
                Some((name.to_string(), labels.to_string(), value))
            })
            .collect();
        Scrape { samples }
    }

    /// The sum of `name` over the label sets that contain every one of `labels`.
    fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|want| l.contains(want)))
            .map(|(_, _, v)| v)
            .sum()
    }
}

/// etcd's counters and gauges at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdLoad {
    pub cpu_seconds: f64,
    pub rss_bytes: f64,
    pub db_size_bytes: f64,
    pub db_in_use_bytes: f64,
    pub keys: f64,
    pub proposals_committed: f64,
    /// Messages etcd's gRPC services received: one per request (the JSON gateway turns
    /// each HTTP request into one gRPC call) and one per watch or keep-alive stream opened.
    pub requests: f64,
    pub txns: f64,
    pub puts: f64,
    pub ranges: f64,
    pub keep_alives: f64,
    /// Watch responses sent, and the events in them (every watcher's copy counted).
    pub watch_messages: f64,
    pub watch_events: f64,
    pub grpc_received_bytes: f64,
    pub grpc_sent_bytes: f64,
    pub wal_fsyncs: f64,
    pub leases_expired: f64,
    pub slow_watchers: f64,
}

const SERVICE: &str = "grpc_service=\"etcdserverpb.";

impl EtcdLoad {
    pub fn scrape(endpoint: &str) -> Result<EtcdLoad, String> {
        let url = format!("{endpoint}/metrics");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut text = String::new();
        agent
            .get(&url)
            .call()
            .map_err(|e| format!("{url}: {e}"))?
            .body_mut()
            .as_reader()
            .take(16 << 20)
            .read_to_string(&mut text)
            .map_err(|e| format!("{url}: {e}"))?;
        let s = Scrape::parse(&text);
        let received = |method: &str| {
            let label = format!("grpc_method=\"{method}\"");
            s.sum("grpc_server_msg_received_total", &[&label, SERVICE])
        };
        let load = EtcdLoad {
            cpu_seconds: s.sum("process_cpu_seconds_total", &[]),
            rss_bytes: s.sum("process_resident_memory_bytes", &[]),
            db_size_bytes: s.sum("etcd_mvcc_db_total_size_in_bytes", &[]),
            db_in_use_bytes: s.sum("etcd_mvcc_db_total_size_in_use_in_bytes", &[]),
            keys: s.sum("etcd_debugging_mvcc_keys_total", &[]),
            proposals_committed: s.sum("etcd_server_proposals_committed_total", &[]),
            requests: s.sum("grpc_server_msg_received_total", &[SERVICE]),
            txns: received("Txn"),
            puts: received("Put"),
            ranges: received("Range"),
            keep_alives: received("LeaseKeepAlive"),
            watch_messages: s.sum(
                "grpc_server_msg_sent_total",
                &["grpc_method=\"Watch\"", SERVICE],
            ),
            watch_events: s.sum("etcd_debugging_mvcc_events_total", &[]),
            grpc_received_bytes: s.sum("etcd_network_client_grpc_received_bytes_total", &[]),
            grpc_sent_bytes: s.sum("etcd_network_client_grpc_sent_bytes_total", &[]),
            wal_fsyncs: s.sum("etcd_disk_wal_fsync_duration_seconds_count", &[]),
            leases_expired: s.sum("etcd_debugging_server_lease_expired_total", &[]),
            slow_watchers: s.sum("etcd_debugging_mvcc_slow_watcher_total", &[]),
        };
        if load.cpu_seconds == 0.0 && load.proposals_committed == 0.0 {
            return Err(format!(
                "{url} has none of the metrics etcd 3.4 exports (process_cpu_seconds_total, \
                 etcd_server_proposals_committed_total)"
            ));
        }
        Ok(load)
    }
}

/// This process's CPU time so far (user + system, every thread), from getrusage.
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage writes one rusage into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// A `Name:   123 kB` line of a /proc status file, in KiB (or a plain count).
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// This process's thread count, and its resident memory now and at its peak (bytes).
pub fn process_threads_and_rss() -> (u64, u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    (
        status_kib(&status, "Threads:").unwrap_or(0),
        status_kib(&status, "VmRSS:").unwrap_or(0) * 1024,
        status_kib(&status, "VmHWM:").unwrap_or(0) * 1024,
    )
}

/// CPU time used so far by this process's threads, by thread name ("etcd lease",
/// "etcd watch", …), from /proc/self/task/*/stat.
pub fn cpu_by_thread_name() -> HashMap<String, Duration> {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut by_name: HashMap<String, Duration> = HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // "tid (name) state ppid …": the name may hold spaces, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        let used: f64 = fields.get(11..13).map_or(0.0, |f| {
            f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
        });
        *by_name.entry(name).or_default() += Duration::from_secs_f64(used / ticks);
    }
    by_name
}

/// The machine's 1-minute load average (other work on it skews every figure).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
