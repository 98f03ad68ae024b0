//! The TLS 1.3 configurations of one node: its raw public key (RFC 7250) on both sides, and a
//! verifier that accepts a peer's key only while the flock lists it ([`Peers`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crux_proto::flock::{NodeId, NodeKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{AlwaysResolvesClientRawPublicKeys, Resumption};
use rustls::crypto::{
    verify_tls13_signature_with_raw_key, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{AlwaysResolvesServerRawPublicKeys, NoServerSessionStorage};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
};

use crate::identity::{key_of_spki, NodeIdentity};

/// The peers a node accepts: the node keys the flock lists, each with its node id.
#[derive(Default, Debug)]
pub(crate) struct Peers {
    pub(crate) by_key: HashMap<NodeKey, NodeId>,
}

/// The suites on offer, fastest first where AES has hardware support (AES-GCM), with
/// ChaCha20-Poly1305 for machines without it; X25519 key exchange (forward secrecy per
/// connection).
///
/// `ring` offers no post-quantum key exchange (rustls marks its provider deprecated for that);
/// X25519 protects against today's attackers. Moving to the `aws-lc-rs` provider would add
/// X25519MLKEM768 at the cost of building a C library: see the README's security section.
#[allow(deprecated)]
pub(crate) fn provider() -> CryptoProvider {
    use rustls::crypto::ring as r;
    CryptoProvider {
        cipher_suites: vec![
            r::cipher_suite::TLS13_AES_128_GCM_SHA256,
            r::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            r::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        kx_groups: vec![r::kx_group::X25519],
        ..r::default_provider()
    }
}

/// The name a client puts in its handshake: peers are told apart by key, not by name.
pub(crate) fn server_name() -> ServerName<'static> {
    ServerName::try_from("node.crux").expect("a valid DNS name")
}

/// Which raw public keys a [`RawKeyVerifier`] accepts.
pub(crate) trait Accept: std::fmt::Debug + Send + Sync {
    /// Ok for an accepted key; the error rustls reports (and the peer's alert) otherwise.
    fn accept(&self, key: NodeKey) -> Result<(), Error>;
}

/// The node plane accepts the keys the flock lists.
impl Accept for Arc<RwLock<Peers>> {
    fn accept(&self, key: NodeKey) -> Result<(), Error> {
        let listed = self
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .contains_key(&key);
        if listed {
            Ok(())
        } else {
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

/// Verifies either end of a TLS 1.3 connection made with raw public keys (RFC 7250): the peer
/// presents exactly one Ed25519 key, which `accept` must take, and signs the handshake with it.
/// The node plane's and the service endpoints' verifiers differ only in `accept`.
#[derive(Debug)]
pub(crate) struct RawKeyVerifier<A> {
    pub(crate) accept: A,
    pub(crate) algorithms: WebPkiSupportedAlgorithms,
}

impl<A: Accept> RawKeyVerifier<A> {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), Error> {
        let key = key_of_spki(end_entity.as_ref())
            .filter(|_| intermediates.is_empty())
            .ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
        self.accept.accept(key)
    }

    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(cert.as_ref()),
            dss,
            &self.algorithms,
        )
    }
}

fn no_tls12() -> Error {
    Error::General("TLS 1.2 is not spoken here: TLS 1.3 only".into())
}

impl<A: Accept> ServerCertVerifier for RawKeyVerifier<A> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity, intermediates)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl<A: Accept> ClientCertVerifier for RawKeyVerifier<A> {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity, intermediates)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The client and server configurations of `identity`, accepting the keys of `peers`: TLS 1.3
/// only, no session tickets or resumption (every connection runs a full handshake with fresh
/// ephemeral keys, so nothing recorded can be replayed into a session), no 0-RTT data.
pub(crate) fn configs(
    identity: &NodeIdentity,
    peers: Arc<RwLock<Peers>>,
) -> Result<(Arc<ClientConfig>, Arc<ServerConfig>), Error> {
    let provider = Arc::new(provider());
    let key = identity.certified_key(&provider)?;
    let pinned = Arc::new(RawKeyVerifier {
        accept: peers,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(pinned.clone())
        .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(
            key.clone(),
        )));
    client.resumption = Resumption::disabled();
    client.enable_sni = false;
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(pinned)
        .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(key)));
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.max_early_data_size = 0;
    Ok((Arc::new(client), Arc::new(server)))
}
