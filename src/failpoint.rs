//! Named pause points for crash tests.
//!
//! With `OCIGC_FAILPOINT=name[:n]` in the environment, the n-th time (default first) the process
//! reaches `name` it prints `ocigc: failpoint <name> reached` on stderr and stops there for good,
//! so a test can SIGKILL it at exactly that instant. Without the variable a hit is one relaxed
//! atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Armed {
    name: String,
    nth: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("OCIGC_FAILPOINT").ok()?;
            let (name, nth) = match spec.split_once(':') {
                Some((n, k)) => (n.to_string(), k.parse().ok()?),
                None => (spec, 1),
            };
            Some(Armed {
                name,
                nth,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Marks a point at which a crash test may stop the process.
pub fn hit(name: &str) {
    let Some(a) = armed() else {
        return;
    };
    if a.name != name || a.hits.fetch_add(1, Ordering::SeqCst) + 1 != a.nth {
        return;
    }
    eprintln!("ocigc: failpoint {name} reached");
    // Park this thread for good; the test kills the process.
    loop {
        std::thread::park();
    }
}
