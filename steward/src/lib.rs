//! Steward: the group-wide service registry that runs on the flock leader. Filled in by the registry issue.
