//! The results of one run printed two ways: a table for people, one JSON object for
//! machines (the same figures; the JSON's keys name their units).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::metrics::EtcdLoad;
use crate::suite::Results;

/// `12 345 678` (groups of three digits, as the docs write counts).
pub fn count(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn bytes(value: f64) -> String {
    const MIB: f64 = (1 << 20) as f64;
    if value.abs() >= MIB {
        format!("{:.1} MiB", value / MIB)
    } else {
        format!("{:.1} KiB", value / 1024.0)
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// What etcd spent between two scrapes, over `took`.
struct Delta<'a> {
    from: &'a EtcdLoad,
    to: &'a EtcdLoad,
    took: Duration,
}

impl Delta<'_> {
    fn get(&self, f: impl Fn(&EtcdLoad) -> f64) -> f64 {
        f(self.to) - f(self.from)
    }

    fn per_s(&self, f: impl Fn(&EtcdLoad) -> f64) -> f64 {
        self.get(f) / self.took.as_secs_f64().max(1e-9)
    }

    fn cpu_percent(&self) -> f64 {
        self.per_s(|l| l.cpu_seconds) * 100.0
    }

    fn json(&self, prefix: &str, out: &mut Map<String, Value>) {
        let mut put = |key: &str, value: f64| {
            out.insert(format!("{prefix}_{key}"), json!(value));
        };
        put("cpu_s", self.get(|l| l.cpu_seconds));
        put("cpu_percent", self.cpu_percent());
        put("requests", self.get(|l| l.requests));
        put("requests_per_s", self.per_s(|l| l.requests));
        put("txns", self.get(|l| l.txns));
        put("puts", self.get(|l| l.puts));
        put("ranges", self.get(|l| l.ranges));
        put("keep_alives", self.get(|l| l.keep_alives));
        put("proposals_committed", self.get(|l| l.proposals_committed));
        put("wal_fsyncs", self.get(|l| l.wal_fsyncs));
        put("watch_responses", self.get(|l| l.watch_messages));
        put("watch_events", self.get(|l| l.watch_events));
        put("grpc_received_bytes", self.get(|l| l.grpc_received_bytes));
        put("grpc_sent_bytes", self.get(|l| l.grpc_sent_bytes));
        put("leases_expired", self.get(|l| l.leases_expired));
        put("rss_bytes_before", self.from.rss_bytes);
        put("rss_bytes_after", self.to.rss_bytes);
        put("db_size_bytes_before", self.from.db_size_bytes);
        put("db_size_bytes_after", self.to.db_size_bytes);
        put("db_in_use_bytes_after", self.to.db_in_use_bytes);
        put("keys_before", self.from.keys);
        put("keys_after", self.to.keys);
        put("slow_watchers_after", self.to.slow_watchers);
    }
}

impl Results {
    fn raw_delta(&self) -> Delta<'_> {
        Delta {
            from: &self.etcd_start,
            to: &self.etcd_raw,
            took: self.raw_put,
        }
    }

    fn directory_delta(&self) -> Delta<'_> {
        Delta {
            from: &self.etcd_before,
            to: &self.etcd_converged,
            took: self.converged.max,
        }
    }

    fn sizes(&self) -> (usize, usize, usize) {
        let config = self.config.as_ref().expect("a run's results");
        (config.servers, config.gids, config.total())
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        let config = self.config.as_ref().expect("a run's results");
        let (n, m, total) = self.sizes();
        let mut out = Map::new();
        let mut put = |key: &str, value: Value| {
            out.insert(key.to_string(), value);
        };
        put("servers", json!(n));
        put("gids_per_server", json!(m));
        put("gids_total", json!(total));
        put("quick", json!(config.quick));
        put("etcd_version", json!(self.etcd_version));
        put("cpus", json!(self.cpus));
        put("load_average_at_start", json!(self.load_average));
        put("elapsed_s", json!(self.elapsed.as_secs_f64()));
        put("raw_put_s", json!(self.raw_put.as_secs_f64()));
        put(
            "raw_puts_per_s",
            json!(total as f64 / self.raw_put.as_secs_f64().max(1e-9)),
        );
        put("registered_s_p50", json!(self.registered.p50.as_secs_f64()));
        put("registered_s_max", json!(self.registered.max.as_secs_f64()));
        put("converged_s_p50", json!(self.converged.p50.as_secs_f64()));
        put("converged_s_max", json!(self.converged.max.as_secs_f64()));
        put(
            "ratio_registered_to_raw_put",
            json!(ratio(self.registered.max, self.raw_put)),
        );
        put(
            "ratio_converged_to_raw_put",
            json!(ratio(self.converged.max, self.raw_put)),
        );
        put("converged", json!(self.views_stable));
        put(
            "add_gid_ms_p50",
            json!(self.add_gid.p50.as_secs_f64() * 1e3),
        );
        put(
            "add_gid_ms_max",
            json!(self.add_gid.max.as_secs_f64() * 1e3),
        );
        put("add_gid_samples", json!(self.add_gid_samples));
        put(
            "leave_revoke_ms",
            json!(self.leave_revoke.as_secs_f64() * 1e3),
        );
        put("leave_gone_ms", json!(self.leave_gone.as_secs_f64() * 1e3));
        put("listing_keys", json!(self.listing_keys));
        put("listing_bytes", json!(self.listing_bytes));
        put("listing_ms", json!(self.listing_time.as_secs_f64() * 1e3));
        put("transport_copies", json!(self.transport_copies));
        put(
            "transport_copy_ms_p50",
            json!(self.transport_copy.p50.as_secs_f64() * 1e3),
        );
        put(
            "transport_copy_ms_max",
            json!(self.transport_copy.max.as_secs_f64() * 1e3),
        );
        put(
            "full_copy_ms_p50",
            json!(self.full_copy.p50.as_secs_f64() * 1e3),
        );
        put(
            "full_copy_ms_max",
            json!(self.full_copy.max.as_secs_f64() * 1e3),
        );
        put("etcd_peak_rss_bytes", json!(self.etcd_peak_rss));
        put("client_raw_cpu_s", json!(self.client_raw_cpu.as_secs_f64()));
        put("client_cpu_s", json!(self.client_cpu.as_secs_f64()));
        put(
            "client_lease_threads_cpu_s",
            json!(self.lease_threads_cpu.as_secs_f64()),
        );
        put(
            "client_watch_threads_cpu_s",
            json!(self.watch_threads_cpu.as_secs_f64()),
        );
        put("client_threads", json!(self.threads));
        put("client_rss_bytes", json!(self.client_rss));
        put("client_peak_rss_bytes", json!(self.client_peak_rss));
        put("directory_warnings", json!(self.warnings));
        put("directory_leases_lost", json!(self.leases_lost));
        self.raw_delta().json("etcd_raw", &mut out);
        self.directory_delta().json("etcd", &mut out);
        Value::Object(out).to_string()
    }

    /// The table.
    pub fn table(&self) -> String {
        let config = self.config.as_ref().expect("a run's results");
        let (n, m, total) = self.sizes();
        let raw = self.raw_delta();
        let dir = self.directory_delta();
        let mut t = String::new();
        let _ = writeln!(
            t,
            "vfio-user-pvrdma etcd directory benchmark: {n} servers × {} GIDs ({} GIDs) in one \
             process",
            count(m as f64),
            count(total as f64)
        );
        let _ = writeln!(
            t,
            "{} on loopback; {} CPUs, load average {:.2} at the start; {} run, {:.1} s",
            self.etcd_version,
            self.cpus,
            self.load_average,
            if config.quick { "quick" } else { "full" },
            self.elapsed.as_secs_f64()
        );
        let row = |t: &mut String, label: &str, a: &str, b: &str| {
            let line = format!("  {label:<58} {a:>14} {b:>14}");
            let _ = writeln!(t, "{}", line.trim_end());
        };
        let head = |t: &mut String, label: &str, a: &str, b: &str| {
            let line = format!("{label:<60} {a:>14} {b:>14}");
            let _ = writeln!(t, "\n{}", line.trim_end());
        };

        head(
            &mut t,
            "Convergence, from the first server's start",
            "p50 server",
            "last server",
        );
        row(
            &mut t,
            &format!(
                "all its {} GIDs registered (put-if-absent txns)",
                count(m as f64)
            ),
            &secs(self.registered.p50),
            &secs(self.registered.max),
        );
        row(
            &mut t,
            &format!(
                "its view holds {} GIDs and {} other servers",
                count(total as f64),
                n - 1
            ),
            &secs(self.converged.p50),
            &secs(self.converged.max),
        );
        row(
            &mut t,
            &format!(
                "baseline: {} plain puts from {n} threads, {} puts/s",
                count(total as f64),
                count(total as f64 / self.raw_put.as_secs_f64().max(1e-9))
            ),
            "",
            &secs(self.raw_put),
        );
        row(
            &mut t,
            "registration / baseline; convergence / baseline",
            &format!("{:.2}×", ratio(self.registered.max, self.raw_put)),
            &format!("{:.2}×", ratio(self.converged.max, self.raw_put)),
        );
        row(
            &mut t,
            "every view still whole afterwards (no lease lapsed)",
            "",
            if self.views_stable { "yes" } else { "NO" },
        );

        head(&mut t, "One change after convergence", "p50", "max");
        row(
            &mut t,
            &format!(
                "one server adds one GID: in every view ({} times)",
                self.add_gid_samples
            ),
            &ms(self.add_gid.p50),
            &ms(self.add_gid.max),
        );
        row(
            &mut t,
            &format!(
                "one server leaves: revoke / its {} GIDs gone everywhere",
                count(m as f64)
            ),
            &ms(self.leave_revoke),
            &ms(self.leave_gone),
        );

        head(&mut t, "Reading the directory", "", "");
        row(
            &mut t,
            &format!(
                "a listing of the prefix ({} keys): answer size / time",
                count(self.listing_keys as f64)
            ),
            &bytes(self.listing_bytes as f64),
            &ms(self.listing_time),
        );
        head(
            &mut t,
            "The transport's copy of the holder map",
            "p50",
            "max",
        );
        row(
            &mut t,
            &format!(
                "server 0, every 50 ms while converging ({} copies)",
                count(self.transport_copies as f64)
            ),
            &ms(self.transport_copy.p50),
            &ms(self.transport_copy.max),
        );
        row(
            &mut t,
            &format!(
                "the whole map ({} GIDs), once on every server",
                count(total as f64 + 1.0)
            ),
            &ms(self.full_copy.p50),
            &ms(self.full_copy.max),
        );

        head(&mut t, "etcd's load", "baseline puts", "directory");
        let both = |t: &mut String, label: &str, f: &dyn Fn(&Delta) -> String| {
            row(t, label, &f(&raw), &f(&dir));
        };
        both(&mut t, "over (s)", &|d| secs(d.took));
        both(&mut t, "CPU (s)", &|d| {
            secs(Duration::from_secs_f64(d.get(|l| l.cpu_seconds).max(0.0)))
        });
        both(&mut t, "CPU (% of one core over the phase)", &|d| {
            format!("{:.0} %", d.cpu_percent())
        });
        both(&mut t, "requests (gRPC messages received)", &|d| {
            count(d.get(|l| l.requests))
        });
        both(&mut t, "requests/s", &|d| count(d.per_s(|l| l.requests)));
        both(&mut t, "  txns / puts", &|d| {
            format!(
                "{} / {}",
                count(d.get(|l| l.txns)),
                count(d.get(|l| l.puts))
            )
        });
        both(&mut t, "  ranges / lease keep-alives", &|d| {
            format!(
                "{} / {}",
                count(d.get(|l| l.ranges)),
                count(d.get(|l| l.keep_alives))
            )
        });
        both(&mut t, "proposals committed", &|d| {
            count(d.get(|l| l.proposals_committed))
        });
        both(&mut t, "CPU per proposal committed", &|d| {
            ms(Duration::from_secs_f64(
                (d.get(|l| l.cpu_seconds) / d.get(|l| l.proposals_committed).max(1.0)).max(0.0),
            ))
        });
        both(&mut t, "WAL fsyncs", &|d| count(d.get(|l| l.wal_fsyncs)));
        both(&mut t, "watch responses sent", &|d| {
            count(d.get(|l| l.watch_messages))
        });
        both(&mut t, "watch events sent (every watcher's copy)", &|d| {
            count(d.get(|l| l.watch_events))
        });
        both(&mut t, "gRPC bytes received", &|d| {
            bytes(d.get(|l| l.grpc_received_bytes))
        });
        both(&mut t, "gRPC bytes sent", &|d| {
            bytes(d.get(|l| l.grpc_sent_bytes))
        });
        both(&mut t, "keys in the store, after", &|d| count(d.to.keys));
        both(&mut t, "db size, after", &|d| bytes(d.to.db_size_bytes));
        both(&mut t, "db size in use, after", &|d| {
            bytes(d.to.db_in_use_bytes)
        });
        both(&mut t, "db size growth", &|d| {
            bytes(d.get(|l| l.db_size_bytes))
        });
        both(&mut t, "RSS, after", &|d| bytes(d.to.rss_bytes));
        both(&mut t, "RSS growth", &|d| bytes(d.get(|l| l.rss_bytes)));
        both(&mut t, "leases expired", &|d| {
            count(d.get(|l| l.leases_expired))
        });
        row(
            &mut t,
            "RSS peak over the whole run (VmHWM)",
            "",
            &bytes(self.etcd_peak_rss as f64),
        );

        head(
            &mut t,
            "This process (all the servers)",
            "baseline puts",
            "directory",
        );
        row(
            &mut t,
            "CPU, every thread (getrusage)",
            &secs(self.client_raw_cpu),
            &secs(self.client_cpu),
        );
        row(
            &mut t,
            "  of which the \"etcd lease\" threads (claims, renewals)",
            "",
            &secs(self.lease_threads_cpu),
        );
        row(
            &mut t,
            "  of which the \"etcd watch\" threads (every view)",
            "",
            &secs(self.watch_threads_cpu),
        );
        row(
            &mut t,
            "threads at convergence",
            "",
            &count(self.threads as f64),
        );
        row(
            &mut t,
            "RSS at convergence; peak (after every view copied its map)",
            &bytes(self.client_rss as f64),
            &bytes(self.client_peak_rss as f64),
        );
        row(
            &mut t,
            "directory warnings (of which a lease found expired)",
            "",
            &format!("{} ({})", self.warnings, self.leases_lost),
        );
        t
    }
}
