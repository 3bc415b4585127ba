//! What the attention worker's integration tests share.

use std::path::Path;

/// A fixture checkpoint's directory, as a string.
pub fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
        .display()
        .to_string()
}
