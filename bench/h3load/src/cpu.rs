//! The generator's own CPU time, from getrusage(2): printed beside its
//! figures so that a run can say when h3load, not the server, filled its
//! core (CPU seconds close to the run's seconds).

use std::time::Duration;

/// User and kernel CPU time of this process so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cpu {
    pub user: Duration,
    pub kernel: Duration,
}

impl Cpu {
    /// This process's CPU time so far (zero if getrusage fails, which it
    /// does only for an invalid `who`).
    pub fn now() -> Self {
        rusage_self().unwrap_or_default()
    }

    /// CPU time spent since `earlier`.
    pub fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(earlier.user),
            kernel: self.kernel.saturating_sub(earlier.kernel),
        }
    }

    pub fn total(self) -> Duration {
        self.user + self.kernel
    }
}

/// getrusage(RUSAGE_SELF): neither std nor a crate already in Cargo.lock
/// wraps it safely, hence the one `unsafe` of h3load.
#[allow(unsafe_code)]
fn rusage_self() -> Option<Cpu> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable rusage for the whole call, which
    // writes only into it; a zeroed rusage (plain integers) is a valid value
    // whether or not the call wrote it, so `assume_init` is sound either way.
    let (rc, usage) = unsafe {
        (
            libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()),
            usage.assume_init(),
        )
    };
    (rc == 0).then(|| Cpu {
        user: timeval(usage.ru_utime),
        kernel: timeval(usage.ru_stime),
    })
}

fn timeval(t: libc::timeval) -> Duration {
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let micros = u32::try_from(t.tv_usec).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(u64::from(micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work_and_counts_it_as_user_time() {
        let before = Cpu::now();
        let mut spent = Cpu::default();
        let mut x = 1u64;
        // Arithmetic in chunks until getrusage has seen 10 ms of it (a
        // machine busy with other work only makes this take longer).
        let give_up = std::time::Instant::now() + Duration::from_secs(30);
        while spent.total() < Duration::from_millis(10) && std::time::Instant::now() < give_up {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            spent = Cpu::now().since(before);
        }
        assert!(spent.total() >= Duration::from_millis(10), "{spent:?}");
        assert!(spent.user > Duration::ZERO, "{spent:?}");
    }
}
