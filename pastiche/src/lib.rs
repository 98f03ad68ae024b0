//! Pastiche: the per-node content-addressed cache with verified peer pulls. Filled in by the pastiche issue.
