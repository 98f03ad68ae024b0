//! Hostile input against the receive path: nothing is accepted, nothing is answered, every drop
//! is counted by reason, and the tables stay bounded. (The 1,000,000-datagram figure comes from
//! `cargo bench -p crux-flock --bench crypto`; this is the quick version CI runs.)

use crux_flock::crypto::hostile;
use crux_flock::DropReason;

#[test]
fn fifty_thousand_hostile_datagrams_are_all_dropped_and_counted() {
    let n = 50_000;
    let report = hostile::run(0xc0ffee, n);
    assert_eq!(report.datagrams, n);
    assert_eq!(report.accepted, 0, "{report:?}");
    assert_eq!(report.replies, 0, "{report:?}");
    assert_eq!(report.drops.values().sum::<u64>(), n);
    for reason in [
        DropReason::Oversized,
        DropReason::Truncated,
        DropReason::BadMagic,
        DropReason::WrongBloc,
        DropReason::UnknownKey,
        DropReason::StaleKey,
        DropReason::AuthFailed,
        DropReason::Replay,
        DropReason::RateLimited,
    ] {
        assert!(
            report.drops.get(&reason).copied().unwrap_or(0) > 0,
            "no {reason:?}: {report:?}"
        );
    }
    assert!(
        report.replay_windows <= 1,
        "only the one real peer has a window: {report:?}"
    );
    assert!(report.limiter_sources <= hostile::SOURCES as usize);
    for attack in hostile::Attack::ALL {
        assert!(report.attacks[&attack] >= n / 10, "{attack:?}");
    }
}
