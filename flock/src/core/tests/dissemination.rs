//! Dissemination: push-pull moves to a stream when it outgrows a datagram.

use std::time::Duration;

use super::*;

#[test]
fn push_pull_moves_to_a_stream_when_state_outgrows_a_datagram() {
    let mut h = Harness::new(80);
    h.run_for(Duration::from_secs(10));
    assert!(h.agreed_leader().is_some());
    let streams: u64 = h.live().map(|f| f.stats().streams_out).sum();
    assert!(streams > 0);
    for f in h.live() {
        assert_eq!(f.live_count(), 80);
    }
}
