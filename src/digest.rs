//! Content digests (`sha256:<hex>`) as used by OCI descriptors and blob keys.

use std::fmt;

/// A validated content digest of a registered algorithm.
///
/// Only `sha256` and `sha512` are accepted: a blob whose name uses any other algorithm is not
/// understood well enough to be deleted, so it is kept and reported instead.
///
/// Held as its bytes (40 bytes for sha256, no allocation): a run holds one per reachable blob
/// and per descriptor it has read. Orders as its text does.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(Raw);

/// Variant order and byte order give the order of `alg:hex` (`sha256` < `sha512`, and
/// lower-case hex sorts as the bytes it encodes).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Raw {
    Sha256([u8; 32]),
    Sha512(Box<[u8; 64]>),
}

/// A digest's text (`alg:hex`, or the hex alone), formatted on the stack.
#[derive(Clone, Copy)]
pub struct DigestText {
    buf: [u8; 7 + 128],
    len: usize,
}

impl std::ops::Deref for DigestText {
    type Target = str;
    fn deref(&self) -> &str {
        // Only ASCII is ever written into it.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl fmt::Debug for DigestText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl AsRef<str> for DigestText {
    fn as_ref(&self) -> &str {
        self
    }
}

impl fmt::Display for DigestText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl PartialEq<&str> for DigestText {
    fn eq(&self, other: &&str) -> bool {
        **self == **other
    }
}

impl DigestText {
    fn new(prefix: &str, bytes: &[u8]) -> DigestText {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = DigestText {
            buf: [0; 7 + 128],
            len: prefix.len() + 2 * bytes.len(),
        };
        out.buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
        for (i, b) in bytes.iter().enumerate() {
            out.buf[prefix.len() + 2 * i] = HEX[usize::from(b >> 4)];
            out.buf[prefix.len() + 2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        out
    }
}

/// Decodes exactly `N` bytes of lower-case hex.
pub(crate) fn unhex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let hex = hex.as_bytes();
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

impl Digest {
    /// Parses `alg:hex`, rejecting unknown algorithms and malformed or upper-case hex.
    pub fn parse(s: &str) -> Option<Digest> {
        let (alg, hex) = s.split_once(':')?;
        Self::from_parts(alg, hex)
    }

    /// Builds a digest from its algorithm and encoded parts (as found in blob paths).
    pub fn from_parts(alg: &str, hex: &str) -> Option<Digest> {
        match alg {
            "sha256" => unhex::<32>(hex).map(|b| Digest(Raw::Sha256(b))),
            "sha512" => unhex::<64>(hex).map(|b| Digest(Raw::Sha512(Box::new(b)))),
            _ => None,
        }
    }

    /// Builds a digest from its algorithm and its bytes (as [`Digest::bytes`] gives them).
    pub fn from_bytes(alg: &str, raw: &[u8]) -> Option<Digest> {
        match alg {
            "sha256" => raw.try_into().ok().map(|b| Digest(Raw::Sha256(b))),
            "sha512" => <[u8; 64]>::try_from(raw)
                .ok()
                .map(|b| Digest(Raw::Sha512(Box::new(b)))),
            _ => None,
        }
    }

    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(Raw::Sha256(sha2::Sha256::digest(data).into()))
    }

    /// The algorithm, e.g. `sha256`.
    pub fn algorithm(&self) -> &'static str {
        match self.0 {
            Raw::Sha256(_) => "sha256",
            Raw::Sha512(_) => "sha512",
        }
    }

    /// The digest's bytes (what the hex encodes).
    pub fn bytes(&self) -> &[u8] {
        match &self.0 {
            Raw::Sha256(b) => b,
            Raw::Sha512(b) => &b[..],
        }
    }

    /// The hex-encoded part after the colon.
    pub fn hex(&self) -> DigestText {
        DigestText::new("", self.bytes())
    }

    /// The digest as `alg:hex`.
    pub fn as_str(&self) -> DigestText {
        let prefix = match self.0 {
            Raw::Sha256(_) => "sha256:",
            Raw::Sha512(_) => "sha512:",
        };
        DigestText::new(prefix, self.bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.as_str())
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str())
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
    fn orders_and_hashes_as_its_text() {
        let mut texts = vec![
            format!("sha512:{HEX}{HEX}"),
            format!("sha256:{HEX}"),
            format!("sha256:0{}", &HEX[1..]),
            format!("sha256:f{}", &HEX[1..]),
            format!("sha512:0{}{HEX}", &HEX[1..]),
        ];
        let mut digests: Vec<Digest> = texts.iter().filter_map(|t| Digest::parse(t)).collect();
        assert_eq!(digests.len(), texts.len());
        texts.sort();
        digests.sort();
        let round: Vec<String> = digests.iter().map(Digest::to_string).collect();
        assert_eq!(round, texts);
        assert_eq!(&*digests[0].hex(), &texts[0]["sha256:".len()..]);
        assert_eq!(std::mem::size_of::<Digest>(), 40);
    }

    #[test]
    fn builds_from_its_bytes() {
        let d = Digest::parse(&format!("sha256:{HEX}")).expect("valid");
        assert_eq!(Digest::from_bytes("sha256", d.bytes()), Some(d.clone()));
        assert_eq!(
            Digest::from_bytes("sha512", d.bytes()),
            None,
            "32 bytes are no sha512"
        );
        assert_eq!(Digest::from_bytes("sha256", &d.bytes()[1..]), None);
        assert_eq!(Digest::from_bytes("md5", d.bytes()), None);
        let long = Digest::parse(&format!("sha512:{HEX}{HEX}")).expect("valid");
        assert_eq!(Digest::from_bytes("sha512", long.bytes()), Some(long));
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
