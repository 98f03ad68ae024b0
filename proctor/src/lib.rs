//! Proctor and dean: intent, the placement language and reconciliation. Filled in by the placement issue.
