//! Making instruments, so that each one is there from the start:
//! counters at zero (an alert or a dashboard sees `0`, not "no data",
//! before the first event), histograms declared so `/metrics` shows them
//! empty until their first observation (OpenTelemetry exports a
//! histogram only once it has a data point). And the process's own
//! metrics: CPU time, resident memory, open file descriptors, Tokio's
//! tasks and workers, as OpenTelemetry's process conventions name them.

use std::sync::Mutex;

use opentelemetry::metrics::{Counter, Histogram, Meter};

/// A histogram `/metrics` renders empty while it has no data point.
#[derive(Debug, Clone)]
pub struct Declared {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
    pub bounds: Vec<f64>,
}

static DECLARED: Mutex<Vec<Declared>> = Mutex::new(Vec::new());

/// Redis calls that failed or timed out (every role that uses Redis).
pub static REDIS_ERRORS: std::sync::LazyLock<Counter<u64>> = std::sync::LazyLock::new(|| {
    counter(
        "correu.redis.errors",
        "{error}",
        "Redis calls that failed or timed out (limits fell back to this process)",
    )
});

/// The histograms made so far.
pub fn declared() -> Vec<Declared> {
    crate::sync::lock(&DECLARED).clone()
}

fn meter() -> Meter {
    opentelemetry::global::meter("correu")
}

/// A counter, present at zero from the start.
pub fn counter(name: &'static str, unit: &'static str, description: &'static str) -> Counter<u64> {
    let c = meter()
        .u64_counter(name)
        .with_unit(unit)
        .with_description(description)
        .build();
    c.add(0, &[]);
    c
}

fn declare(name: &'static str, unit: &'static str, description: &'static str, bounds: &[f64]) {
    let mut d = crate::sync::lock(&DECLARED);
    if !d.iter().any(|h| h.name == name) {
        d.push(Declared {
            name,
            unit,
            description,
            bounds: bounds.to_vec(),
        });
    }
}

/// A histogram of `f64` with these bucket bounds, shown empty until used.
pub fn histogram(
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    bounds: &[f64],
) -> Histogram<f64> {
    declare(name, unit, description, bounds);
    meter()
        .f64_histogram(name)
        .with_unit(unit)
        .with_description(description)
        .with_boundaries(bounds.to_vec())
        .build()
}

/// A histogram of `u64` (sizes) with these bucket bounds.
pub fn histogram_u64(
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    bounds: &[f64],
) -> Histogram<u64> {
    declare(name, unit, description, bounds);
    meter()
        .u64_histogram(name)
        .with_unit(unit)
        .with_description(description)
        .with_boundaries(bounds.to_vec())
        .build()
}

/// Registers the process's metrics, read when metrics are collected:
/// `process.cpu.time` (user and system seconds, by `cpu.mode`),
/// `process.memory.usage` (resident bytes),
/// `process.open_file_descriptor.count`, and `correu.runtime.tasks` and
/// `correu.runtime.workers` from the Tokio runtime of `handle`.
pub fn register_process(handle: tokio::runtime::Handle) {
    std::sync::LazyLock::force(&REDIS_ERRORS);
    let m = meter();
    let cpu = m
        .f64_observable_counter("process.cpu.time")
        .with_unit("s")
        .with_description("CPU time of the process, by mode (user, system)")
        .with_callback(|o| {
            if let Some((user, system)) = proc_cpu() {
                o.observe(user, &[opentelemetry::KeyValue::new("cpu.mode", "user")]);
                o.observe(
                    system,
                    &[opentelemetry::KeyValue::new("cpu.mode", "system")],
                );
            }
        })
        .build();
    let memory = m
        .u64_observable_gauge("process.memory.usage")
        .with_unit("By")
        .with_description("Resident memory of the process")
        .with_callback(|o| {
            if let Some(rss) = proc_rss() {
                o.observe(rss, &[]);
            }
        })
        .build();
    let fds = m
        .u64_observable_gauge("process.open_file_descriptor.count")
        .with_unit("{file_descriptor}")
        .with_description("File descriptors the process has open")
        .with_callback(|o| {
            // Less the one reading the directory opens.
            if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
                o.observe(d.count().saturating_sub(1) as u64, &[]);
            }
        })
        .build();
    let rt = handle.metrics();
    let tasks = m
        .u64_observable_gauge("correu.runtime.tasks")
        .with_unit("{task}")
        .with_description("Tokio tasks alive in the process")
        .with_callback(move |o| o.observe(rt.num_alive_tasks() as u64, &[]))
        .build();
    let rt = handle.metrics();
    let workers = m
        .u64_observable_gauge("correu.runtime.workers")
        .with_unit("{thread}")
        .with_description("Tokio worker threads")
        .with_callback(move |o| o.observe(rt.num_workers() as u64, &[]))
        .build();
    // The callbacks stay registered with the meter provider; the handles
    // are kept for the life of the process all the same.
    static KEPT: std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>> =
        std::sync::OnceLock::new();
    let _ = KEPT.set(Box::new((cpu, memory, fds, tasks, workers)));
}

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK` is 100 on
/// Linux on every architecture Correu builds for).
const TICKS: f64 = 100.0;

/// User and system CPU seconds, from `/proc/self/stat`.
fn proc_cpu() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name is in parentheses and may hold spaces: count the
    // fields after its closing one (utime and stime are fields 14 and 15).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime / TICKS, stime / TICKS))
}

/// Resident bytes, from `VmRSS` in `/proc/self/status` (in kB, whatever
/// the page size).
fn proc_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reads_its_own_cpu_and_memory() {
        let (user, system) = proc_cpu().unwrap_or((-1.0, -1.0));
        assert!(user >= 0.0 && system >= 0.0, "{user} {system}");
        // A test binary is more than a megabyte resident.
        assert!(proc_rss().unwrap_or(0) > 1 << 20);
    }
}
