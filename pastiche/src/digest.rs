//! Content digests: `sha256:<hex>`, the OCI form.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// The size of a piece: the unit of transfer and of verification (4 MiB).
pub const PIECE_SIZE: u64 = 4 << 20;

/// The digest of a blob. SHA-256 only for now.
///
/// Parsed from and displayed as `sha256:<64 hex digits>` (displayed in lowercase).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(sha256(bytes))
    }

    /// The 64 lowercase hex digits, without the algorithm prefix (used for file names).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Not of the form `<alg>:<hex>`, or the hex part is not 64 hex digits.
    #[error("malformed digest {0:?}: expected sha256:<64 hex digits>")]
    Malformed(String),
    /// Well formed, but an algorithm other than sha256.
    #[error("unsupported digest algorithm {0:?}: only sha256 is supported")]
    Unsupported(String),
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Digest, DigestError> {
        let malformed = || DigestError::Malformed(s.to_string());
        let (alg, hex_part) = s.split_once(':').ok_or_else(malformed)?;
        let alg_ok = !alg.is_empty()
            && alg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'.' | b'_' | b'-'));
        if !alg_ok {
            return Err(malformed());
        }
        if alg != "sha256" {
            return Err(DigestError::Unsupported(alg.to_string()));
        }
        if hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| malformed())?;
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// SHA-256 of `bytes` (hardware accelerated where the CPU has SHA extensions).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        assert_eq!(
            s.to_uppercase()
                .replace("SHA256", "sha256")
                .parse::<Digest>()
                .unwrap(),
            d
        );
    }

    #[test]
    fn parse_errors() {
        let hex64 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        for bad in [
            "",
            "sha256",
            "sha256:",
            hex64,
            "sha256:abc",
            &format!("sha256:{hex64}00"),
            &format!("sha256:{}", &hex64[1..]),
            &format!("sha256:{}g", &hex64[1..]),
            &format!(":{hex64}"),
            &format!("sha 256:{hex64}"),
        ] {
            let e = bad.parse::<Digest>().unwrap_err();
            assert!(matches!(e, DigestError::Malformed(_)), "{bad:?}: {e:?}");
            assert!(e.to_string().contains("sha256:<64 hex digits>"), "{e}");
        }
        let e = format!("md5:{hex64}").parse::<Digest>().unwrap_err();
        assert_eq!(e, DigestError::Unsupported("md5".into()));
        assert!(e.to_string().contains("\"md5\""), "{e}");
        let e = "sha512:00".parse::<Digest>().unwrap_err();
        assert_eq!(e, DigestError::Unsupported("sha512".into()));
    }
}
