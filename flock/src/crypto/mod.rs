//! Packet envelope, replay window, join handshake, transient keys and the secondary keyring.
