//! Secrets shared by the roles: join tokens and API keys. A token is 256 bits from the
//! operating system's CSPRNG; secrets are compared in constant time (the time taken does not
//! depend on where the first difference is, so a client cannot find a key byte by byte).

/// A new token: 256 random bits from the OS, as 64 lower-case hex digits.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // The OS's CSPRNG failing is not something a process can go on from.
    getrandom::fill(&mut bytes).expect("the OS's random number generator failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `given` equals `expected`, in time independent of their contents (only of their
/// lengths).
pub fn matches(expected: &str, given: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

/// Whether `given` equals any of `keys`; every key is compared, whichever matches.
pub fn matches_any<'a>(keys: impl IntoIterator<Item = &'a str>, given: &str) -> bool {
    keys.into_iter()
        .fold(false, |found, key| matches(key, given) | found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_compare_exactly() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(matches(&a, &a.clone()));
        assert!(!matches(&a, &b));
        assert!(!matches(&a, &a[..63]));
        assert!(!matches(&a, ""));
        assert!(matches_any(["x", a.as_str()], &a));
        assert!(!matches_any(["x", "y"], &a));
        assert!(!matches_any([], &a));
    }
}
