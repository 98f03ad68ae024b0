//! What picket runs: a muster entry resolved to an executable, as the runner supervises it and
//! its records keep it across restarts of the agent.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What to run: a muster entry resolved to an executable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitSpec {
    /// The unit's key (one supervised process per key).
    pub key: String,
    /// Horde (`CRUX_HORDE`).
    pub horde: String,
    /// API (`CRUX_API`).
    pub api: String,
    /// Instance (`CRUX_INST`).
    pub inst: String,
    /// Function (`CRUX_FUNCTION`).
    pub function: String,
    /// The pastiche digest the executable came from.
    pub digest: String,
    /// The executable.
    pub exe: PathBuf,
}
