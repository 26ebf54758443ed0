//! Content digests (`sha256:<hex>`) as used by OCI descriptors and blob keys.

use std::fmt;

/// A validated content digest of a registered algorithm.
///
/// Only `sha256` and `sha512` are accepted: a blob whose name uses any other algorithm is not
/// understood well enough to be deleted, so it is kept and reported instead.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(Box<str>);

impl Digest {
    /// Parses `alg:hex`, rejecting unknown algorithms and malformed or upper-case hex.
    pub fn parse(s: &str) -> Option<Digest> {
        let (alg, hex) = s.split_once(':')?;
        Self::from_parts(alg, hex)
    }

    /// Builds a digest from its algorithm and encoded parts (as found in blob paths).
    pub fn from_parts(alg: &str, hex: &str) -> Option<Digest> {
        let len = match alg {
            "sha256" => 64,
            "sha512" => 128,
            _ => return None,
        };
        let lower_hex = hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        (hex.len() == len && lower_hex).then(|| Digest(format!("{alg}:{hex}").into_boxed_str()))
    }

    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        use sha2::Digest as _;
        let hex: String = sha2::Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Digest(format!("sha256:{hex}").into_boxed_str())
    }

    /// The algorithm, e.g. `sha256`.
    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map_or("", |(a, _)| a)
    }

    /// The hex-encoded part after the colon.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, h)| h)
    }

    /// The digest as `alg:hex`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).ok_or_else(|| serde::de::Error::custom("not a valid digest"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_sha256() {
        let d = Digest::parse(&format!("sha256:{HEX}")).expect("valid");
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.hex(), HEX);
        assert_eq!(d.to_string(), format!("sha256:{HEX}"));
    }

    #[test]
    fn rejects_malformed() {
        assert!(Digest::parse(HEX).is_none(), "no algorithm");
        assert!(
            Digest::parse(&format!("md5:{HEX}")).is_none(),
            "unknown algorithm"
        );
        assert!(
            Digest::parse(&format!("sha256:{}", &HEX[1..])).is_none(),
            "short"
        );
        assert!(
            Digest::parse(&format!("sha256:{}", HEX.to_uppercase())).is_none(),
            "upper"
        );
        assert!(
            Digest::parse(&format!("sha512:{HEX}")).is_none(),
            "wrong length"
        );
        assert!(Digest::parse(&format!("sha512:{HEX}{HEX}")).is_some());
    }
}
