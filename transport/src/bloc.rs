//! The bloc proof: right after the TLS handshake, inside the encrypted channel, each side proves
//! it holds a secondary key of the bloc, bound to this very connection.
//!
//! With `k` a [`BlocKeys`] key (derived from one secondary key and the bloc) and `x` 32 bytes
//! exported from the TLS session (RFC 8446 §7.5, label [`EXPORTER_LABEL`]), each side sends
//! `key id (4 bytes, little endian) ‖ HMAC-SHA-256(k, role ‖ x)`: the client first with its
//! primary key, the server then with the key the client named. The exported value is unique to
//! the session (both ephemeral shares and both identities went into it), so a proof is worth
//! nothing on any other connection. A node without keys (security off) sends key id 0 and zeros,
//! and is accepted only by a node without keys.
//!
//! The key id is kept with the connection: when the keyring drops that key, the connection is
//! closed (see `Transport::set_bloc_keys`).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

/// The exporter label that binds a proof to its TLS session.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-crux-node-plane-bloc-proof";
/// Bytes of one proof on the wire.
pub const PROOF_BYTES: usize = 4 + 32;

/// The keys that prove bloc membership: the primary (used to connect) and every installed one
/// (accepted), each with its key id. Wiped on drop.
pub struct BlocKeys {
    primary: u32,
    keys: Vec<(u32, Zeroizing<[u8; 32]>)>,
}

impl BlocKeys {
    /// `keys` by key id, the primary one first. None when `keys` is empty.
    pub fn new(keys: Vec<(u32, [u8; 32])>) -> Option<BlocKeys> {
        let primary = keys.first()?.0;
        Some(BlocKeys {
            primary,
            keys: keys
                .into_iter()
                .map(|(id, k)| (id, Zeroizing::new(k)))
                .collect(),
        })
    }

    pub(crate) fn key(&self, id: u32) -> Option<&[u8; 32]> {
        self.keys.iter().find(|(i, _)| *i == id).map(|(_, k)| &**k)
    }

    pub(crate) fn holds(&self, id: u32) -> bool {
        self.key(id).is_some()
    }
}

impl std::fmt::Debug for BlocKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlocKeys")
            .field("primary", &format_args!("{:08x}", self.primary))
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// Why a bloc proof failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProofError {
    /// The connection failed or closed during the exchange.
    #[error("connection failed during the bloc proof: {0}")]
    Io(#[from] std::io::Error),
    /// The peer named a key we do not hold, or proved nothing while we hold keys (or the
    /// reverse).
    #[error("the peer does not hold a key of this bloc")]
    UnknownKey,
    /// The proof does not verify.
    #[error("bad bloc proof")]
    BadProof,
}

fn mac(key: &[u8; 32], role: &[u8], exported: &[u8; 32]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(role);
    mac.update(exported);
    mac.finalize().into_bytes().into()
}

fn encode(id: u32, proof: [u8; 32]) -> [u8; PROOF_BYTES] {
    let mut out = [0u8; PROOF_BYTES];
    out[..4].copy_from_slice(&id.to_le_bytes());
    out[4..].copy_from_slice(&proof);
    out
}

/// Checks a proof received under `role`: the key id it used, 0 for a keyless peer.
fn verify(
    keys: Option<&BlocKeys>,
    role: &[u8],
    exported: &[u8; 32],
    got: &[u8; PROOF_BYTES],
) -> Result<u32, ProofError> {
    let id = u32::from_le_bytes(got[..4].try_into().expect("4 bytes"));
    match keys {
        None if id == 0 && got[4..].iter().all(|b| *b == 0) => Ok(0),
        None => Err(ProofError::UnknownKey),
        Some(keys) => {
            let key = keys.key(id).ok_or(ProofError::UnknownKey)?;
            if bool::from(got[4..].ct_eq(&mac(key, role, exported))) {
                Ok(id)
            } else {
                Err(ProofError::BadProof)
            }
        }
    }
}

/// The client's side: sends its proof under its primary key, checks the server's. Returns the
/// key id (0 without keys).
pub(crate) async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    keys: Option<&BlocKeys>,
    exported: &[u8; 32],
) -> Result<u32, ProofError> {
    let ours = match keys {
        Some(k) => {
            let key = k.key(k.primary).expect("the primary is among the keys");
            encode(k.primary, mac(key, b"crux node client", exported))
        }
        None => [0u8; PROOF_BYTES],
    };
    stream.write_all(&ours).await?;
    stream.flush().await?;
    let mut theirs = [0u8; PROOF_BYTES];
    stream.read_exact(&mut theirs).await?;
    let id = verify(keys, b"crux node server", exported, &theirs)?;
    if keys.is_some() && ours[..4] != theirs[..4] {
        return Err(ProofError::BadProof);
    }
    Ok(id)
}

/// The server's side: checks the client's proof, answers under the same key. Returns the key
/// id (0 without keys).
pub(crate) async fn server<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    keys: Option<&BlocKeys>,
    exported: &[u8; 32],
) -> Result<u32, ProofError> {
    let mut theirs = [0u8; PROOF_BYTES];
    stream.read_exact(&mut theirs).await?;
    let id = verify(keys, b"crux node client", exported, &theirs)?;
    let ours = match keys.and_then(|k| k.key(id)) {
        Some(key) => encode(id, mac(key, b"crux node server", exported)),
        None => [0u8; PROOF_BYTES],
    };
    stream.write_all(&ours).await?;
    stream.flush().await?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[(u32, u8)]) -> BlocKeys {
        BlocKeys::new(list.iter().map(|(id, b)| (*id, [*b; 32])).collect()).unwrap()
    }

    async fn exchange(
        c: Option<&BlocKeys>,
        s: Option<&BlocKeys>,
        xc: [u8; 32],
        xs: [u8; 32],
    ) -> (Result<u32, ProofError>, Result<u32, ProofError>) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let (rc, rs) = tokio::join!(client(&mut a, c, &xc), async {
            let r = server(&mut b, s, &xs).await;
            drop(b);
            r
        });
        (rc, rs)
    }

    #[tokio::test]
    async fn holders_of_a_shared_key_prove_it_to_each_other() {
        let (c, s) = (keys(&[(5, 1)]), keys(&[(9, 2), (5, 1)]));
        let (rc, rs) = exchange(Some(&c), Some(&s), [3; 32], [3; 32]).await;
        assert_eq!(rc.unwrap(), 5);
        assert_eq!(rs.unwrap(), 5);
    }

    #[tokio::test]
    async fn a_proof_from_another_session_is_refused() {
        let k = keys(&[(5, 1)]);
        let (_, rs) = exchange(Some(&k), Some(&k), [3; 32], [4; 32]).await;
        assert!(matches!(rs, Err(ProofError::BadProof)), "{rs:?}");
    }

    #[tokio::test]
    async fn a_key_the_server_does_not_hold_is_refused() {
        let (_, rs) = exchange(
            Some(&keys(&[(5, 1)])),
            Some(&keys(&[(6, 1)])),
            [3; 32],
            [3; 32],
        )
        .await;
        assert!(matches!(rs, Err(ProofError::UnknownKey)), "{rs:?}");
        let (_, rs) = exchange(
            Some(&keys(&[(5, 1)])),
            Some(&keys(&[(5, 2)])),
            [3; 32],
            [3; 32],
        )
        .await;
        assert!(matches!(rs, Err(ProofError::BadProof)), "{rs:?}");
    }

    #[tokio::test]
    async fn keyless_and_keyed_nodes_refuse_each_other() {
        let k = keys(&[(5, 1)]);
        let (_, rs) = exchange(None, Some(&k), [3; 32], [3; 32]).await;
        assert!(matches!(rs, Err(ProofError::UnknownKey)), "{rs:?}");
        let (_, rs) = exchange(Some(&k), None, [3; 32], [3; 32]).await;
        assert!(matches!(rs, Err(ProofError::UnknownKey)), "{rs:?}");
        let (rc, rs) = exchange(None, None, [3; 32], [3; 32]).await;
        assert_eq!((rc.unwrap(), rs.unwrap()), (0, 0));
    }
}
