//! The one JSON line h3load prints: counts, rates, latency percentiles
//! from every counted request's own timing, and the generator's CPU.

use std::fmt::Write;

use crate::load::Outcome;

/// The percentile `q` (0..=1) of sorted values, the value at rank
/// `q × (n − 1)` rounded, as bench/driver.py takes it from h2load's log;
/// `None` when there are none.
pub fn percentile(sorted: &[u32], q: f64) -> Option<u32> {
    let last = sorted.len().checked_sub(1)?;
    let k = ((q * last as f64).round() as usize).min(last);
    sorted.get(k).copied()
}

/// `outcome` as one line of JSON (numbers only; no value needs escaping).
pub fn json(outcome: &Outcome) -> String {
    let ms = |q| percentile(&outcome.latencies_us, q).map(|us| f64::from(us) / 1000.0);
    let rps = outcome.requests as f64 / outcome.seconds;
    let cpu = outcome.cpu.total().as_secs_f64();
    // Only over a run that had connections: without, the span is a few µs of nothing.
    let share = if outcome.connections > 0 && outcome.busy_seconds > 0.0 {
        Some(cpu / outcome.busy_seconds)
    } else {
        None
    };
    let e = &outcome.errors;
    let mut out = String::from("{");
    let fields: [(&str, Value); 16] = [
        ("requests", Value::Int(outcome.requests)),
        ("seconds", Value::Num(Some(outcome.seconds))),
        ("rps", Value::Num(Some(rps))),
        ("errors", Value::Int(e.total())),
        ("errors_status", Value::Int(e.status)),
        ("errors_stream", Value::Int(e.stream)),
        ("errors_timeout", Value::Int(e.timeout)),
        ("errors_connect", Value::Int(e.connect)),
        ("connections", Value::Int(outcome.connections as u64)),
        ("streams_per_connection", Value::Int(outcome.streams as u64)),
        ("p50_ms", Value::Num(ms(0.50))),
        ("p99_ms", Value::Num(ms(0.99))),
        ("body_bytes", Value::Int(outcome.body_bytes)),
        ("cpu_user_s", Value::Num(Some(outcome.cpu.user.as_secs_f64()))),
        ("cpu_kernel_s", Value::Num(Some(outcome.cpu.kernel.as_secs_f64()))),
        // CPU seconds per second of the measured span: 1.0 is a full core.
        ("cpu_share", Value::Num(share)),
    ];
    for (i, (name, value)) in fields.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = match value {
            Value::Int(n) => write!(out, "{sep}\"{name}\":{n}"),
            Value::Num(Some(x)) if x.is_finite() => write!(out, "{sep}\"{name}\":{x:.3}"),
            Value::Num(_) => write!(out, "{sep}\"{name}\":null"),
        };
    }
    out.push('}');
    out
}

enum Value {
    Int(u64),
    Num(Option<f64>),
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cpu::Cpu;
    use crate::load::Errors;

    #[test]
    fn percentiles_are_taken_as_the_driver_takes_them() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.50), Some(51));
        assert_eq!(percentile(&values, 0.99), Some(99));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn the_line_has_every_figure_and_null_where_nothing_was_measured() {
        let outcome = Outcome {
            connections: 64,
            streams: 10,
            seconds: 2.0,
            requests: 3,
            latencies_us: vec![1000, 2000, 4500],
            body_bytes: 129,
            errors: Errors {
                status: 1,
                stream: 2,
                timeout: 0,
                connect: 1,
            },
            cpu: Cpu {
                user: Duration::from_millis(1500),
                kernel: Duration::from_millis(250),
            },
            busy_seconds: 2.5,
        };
        assert_eq!(
            json(&outcome),
            "{\"requests\":3,\"seconds\":2.000,\"rps\":1.500,\"errors\":4,\"errors_status\":1,\
             \"errors_stream\":2,\"errors_timeout\":0,\"errors_connect\":1,\"connections\":64,\
             \"streams_per_connection\":10,\"p50_ms\":2.000,\"p99_ms\":4.500,\"body_bytes\":129,\
             \"cpu_user_s\":1.500,\"cpu_kernel_s\":0.250,\"cpu_share\":0.700}"
        );
        let empty = json(&Outcome {
            seconds: 1.0,
            ..Outcome::default()
        });
        assert!(empty.contains("\"p50_ms\":null,\"p99_ms\":null"), "{empty}");
        assert!(empty.contains("\"cpu_share\":null"), "{empty}");
    }
}
