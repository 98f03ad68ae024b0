//! Store: durable operator data (muster, intent) replicated by Raft among voters the flock picks. Filled in by the store issue.
