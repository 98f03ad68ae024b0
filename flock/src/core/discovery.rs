//! Discovery: finding nodes that are not members yet, by probing random addresses of the
//! configured address space (fast while alone), the seeds, and members held dead (which may live
//! on in another flock). With security on, a discovery probe is a join handshake.

/// The discovery state.
#[derive(Default)]
pub(super) struct Discovery {
    /// Discovery rounds run so far (while alone, every other round goes to a seed).
    pub(super) round: u64,
}
