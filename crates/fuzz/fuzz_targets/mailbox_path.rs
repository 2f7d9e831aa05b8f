//! Any address as a mailbox directory: two plain path components under
//! the root (no `..`, no separator, no leading dot), and two addresses
//! share one only when they are the same address but for case.
#![no_main]
use std::path::Component;

use correu_storage::maildir::relative_dir;
use libfuzzer_sys::fuzz_target;

fn normal(a: &str) -> Option<(String, String)> {
    let (l, d) = a.rsplit_once('@')?;
    Some((l.to_lowercase(), d.to_lowercase()))
}

fuzz_target!(|input: (String, String)| {
    let (a, b) = input;
    let Ok(pa) = relative_dir(&a) else { return };
    let parts: Vec<Component> = pa.components().collect();
    assert_eq!(parts.len(), 2, "{a:?} → {pa:?}");
    for p in &parts {
        match p {
            Component::Normal(s) => {
                let s = s.to_string_lossy();
                assert!(!s.starts_with('.') && !s.contains(['/', '\0']), "{a:?} → {pa:?}");
            }
            other => panic!("{a:?} → {pa:?} has {other:?}"),
        }
    }
    if let Ok(pb) = relative_dir(&b)
        && pa == pb
    {
        assert_eq!(normal(&a), normal(&b), "{a:?} and {b:?} share {pa:?}");
    }
});
