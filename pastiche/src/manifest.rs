//! Blob manifests: size, piece size and one SHA-256 per piece.

use crate::digest::{sha256, Digest};

/// The smallest piece size a manifest may use (64 KiB).
pub const MIN_PIECE_SIZE: u64 = 64 << 10;
/// The largest piece size a manifest may use (64 MiB).
pub const MAX_PIECE_SIZE: u64 = 64 << 20;

const MAGIC: &[u8; 8] = b"PSTMANI1";

/// What is known about a blob before holding its bytes: its digest, size and piece hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The digest of the whole blob.
    pub digest: Digest,
    /// The blob's size in bytes.
    pub size: u64,
    /// The size of every piece but the last (which may be shorter).
    pub piece_size: u64,
    /// SHA-256 of each piece, in order. An empty blob has no pieces.
    pub pieces: Vec<[u8; 32]>,
}

impl Manifest {
    /// The number of pieces.
    pub fn piece_count(&self) -> u32 {
        self.pieces.len() as u32
    }

    /// The byte offset of piece `i` in the blob.
    pub fn piece_offset(&self, i: u32) -> u64 {
        u64::from(i) * self.piece_size
    }

    /// The length of piece `i` (0 if `i` is past the end).
    pub fn piece_len(&self, i: u32) -> u64 {
        let start = self.piece_offset(i);
        if start >= self.size {
            0
        } else {
            (self.size - start).min(self.piece_size)
        }
    }

    /// Checks that the manifest is self-consistent: the piece size is in 64 KiB..=64 MiB, the
    /// number of pieces matches size / piece size (rounded up), and a one-piece blob's piece hash
    /// is its digest.
    pub fn check(&self) -> Result<(), String> {
        if !(MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&self.piece_size) {
            return Err(format!(
                "piece size {} is outside {MIN_PIECE_SIZE}..={MAX_PIECE_SIZE}",
                self.piece_size
            ));
        }
        let want = self.size.div_ceil(self.piece_size);
        if want > u64::from(u32::MAX) {
            return Err(format!("{want} pieces are too many"));
        }
        if self.pieces.len() as u64 != want {
            return Err(format!(
                "{} piece hashes for {} bytes in pieces of {} (want {want})",
                self.pieces.len(),
                self.size,
                self.piece_size
            ));
        }
        if self.pieces.len() == 1 && self.pieces[0] != self.digest.0 {
            return Err("the only piece's hash differs from the digest".into());
        }
        if self.pieces.is_empty() && self.digest != Digest::of(b"") {
            return Err("an empty blob with the digest of non-empty content".into());
        }
        Ok(())
    }

    /// The durable encoding (binary, with a trailing SHA-256 checksum).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 32 + 8 + 8 + 4 + 32 * self.pieces.len() + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.digest.0);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.piece_size.to_le_bytes());
        out.extend_from_slice(&(self.pieces.len() as u32).to_le_bytes());
        for p in &self.pieces {
            out.extend_from_slice(p);
        }
        let sum = sha256(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes [`Manifest::to_bytes`], checking the checksum and [`Manifest::check`].
    pub fn from_bytes(b: &[u8]) -> Result<Manifest, String> {
        const HEAD: usize = 8 + 32 + 8 + 8 + 4;
        if b.len() < HEAD + 32 || &b[..8] != MAGIC {
            return Err("not a manifest".into());
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if sha256(body) != sum {
            return Err("manifest checksum mismatch".into());
        }
        let u64_at = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().unwrap());
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&body[8..40]);
        let size = u64_at(40);
        let piece_size = u64_at(48);
        let count = u32::from_le_bytes(body[56..60].try_into().unwrap()) as usize;
        if body.len() != HEAD + 32 * count {
            return Err("manifest length mismatch".into());
        }
        let pieces = body[HEAD..]
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        let m = Manifest {
            digest: Digest(digest),
            size,
            piece_size,
            pieces,
        };
        m.check()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::PIECE_SIZE;

    fn manifest_of(data: &[u8], piece_size: u64) -> Manifest {
        Manifest {
            digest: Digest::of(data),
            size: data.len() as u64,
            piece_size,
            pieces: data.chunks(piece_size as usize).map(sha256).collect(),
        }
    }

    #[test]
    fn pieces_and_check() {
        let data = vec![7u8; (MIN_PIECE_SIZE * 2 + 5) as usize];
        let m = manifest_of(&data, MIN_PIECE_SIZE);
        assert_eq!(m.piece_count(), 3);
        assert_eq!(m.piece_len(0), MIN_PIECE_SIZE);
        assert_eq!(m.piece_len(2), 5);
        assert_eq!(m.piece_len(3), 0);
        m.check().unwrap();
        assert_eq!(Manifest::from_bytes(&m.to_bytes()).unwrap(), m);

        let mut bad = m.clone();
        bad.pieces.pop();
        assert!(bad.check().is_err());
        let mut bad = m.clone();
        bad.piece_size = 1024;
        assert!(bad.check().is_err());
        let mut bad = m.clone();
        bad.piece_size = MAX_PIECE_SIZE * 2;
        assert!(bad.check().is_err());

        let mut bytes = m.to_bytes();
        bytes[45] ^= 1;
        assert!(Manifest::from_bytes(&bytes).is_err());

        let empty = manifest_of(b"", PIECE_SIZE);
        assert_eq!(empty.piece_count(), 0);
        empty.check().unwrap();
        let one = manifest_of(b"abc", PIECE_SIZE);
        one.check().unwrap();
        let mut lying = one.clone();
        lying.digest = Digest::of(b"abd");
        assert!(lying.check().is_err());
    }
}
