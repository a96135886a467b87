//! Resource identifiers in EC2's form: a prefix and 17 lower-case hex digits.

use rand::Rng;

pub const INSTANCE: &str = "i";
pub const RESERVATION: &str = "r";
pub const IMAGE: &str = "ami";
pub const HOST: &str = "h";
pub const VPC: &str = "vpc";
pub const SUBNET: &str = "subnet";
pub const SECURITY_GROUP: &str = "sg";
pub const SECURITY_GROUP_RULE: &str = "sgr";
pub const NETWORK_INTERFACE: &str = "eni";
pub const ATTACHMENT: &str = "eni-attach";
pub const ALLOCATION: &str = "eipalloc";
pub const ASSOCIATION: &str = "eipassoc";

/// A locally administered unicast MAC address: `02:` and five random bytes.
pub fn new_mac() -> String {
    let bytes: [u8; 5] = rand::thread_rng().gen();
    let mut s = String::from("02");
    for b in bytes {
        s.push_str(&format!(":{b:02x}"));
    }
    s
}

pub fn new_id(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let digits: String = (0..17).map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0')).collect();
    format!("{prefix}-{digits}")
}

/// Whether `id` is `prefix-` followed by 17 (or EC2's older 8) lower-case hex digits.
pub fn is_valid(prefix: &str, id: &str) -> bool {
    match id.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('-')) {
        Some(hex) => (hex.len() == 17 || hex.len() == 8) && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        None => false,
    }
}

/// A random secret of 32 bytes, hex encoded.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::thread_rng().gen();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = new_id(INSTANCE);
        let b = new_id(INSTANCE);
        assert_ne!(a, b);
        assert!(is_valid(INSTANCE, &a), "{a}");
        assert_eq!(a.len(), 19);
        assert!(is_valid(IMAGE, &new_id(IMAGE)));
        assert!(is_valid(ATTACHMENT, &new_id(ATTACHMENT)));
        let mac = new_mac();
        assert!(mac.len() == 17 && mac.starts_with("02:"), "{mac}");
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in ["", "i-", "i-xyz", "i-0123456789ABCDEF0", "ami-0123456789abcdef0", "i-0123456789abcdef", "i_0123456789abcdef0"] {
            assert!(!is_valid(INSTANCE, bad), "{bad}");
        }
        assert!(is_valid(INSTANCE, "i-12345678"));
    }
}
