//! The deployment status machine (seed 004):
//! `pending -> building -> starting -> running`, and `failed` (with a
//! reason) from any non-terminal status. `running` and `failed` are
//! terminal.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Building,
    Starting,
    Running,
    Failed,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Pending,
        Status::Building,
        Status::Starting,
        Status::Running,
        Status::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Building => "building",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Running | Status::Failed)
    }

    /// The statuses this one may move to.
    pub fn legal_next(self) -> &'static [Status] {
        match self {
            Status::Pending => &[Status::Building, Status::Failed],
            Status::Building => &[Status::Starting, Status::Failed],
            Status::Starting => &[Status::Running, Status::Failed],
            Status::Running | Status::Failed => &[],
        }
    }

    pub fn can_become(self, to: Status) -> bool {
        self.legal_next().contains(&to)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_path_and_failures() {
        assert!(Status::Pending.can_become(Status::Building));
        assert!(Status::Building.can_become(Status::Starting));
        assert!(Status::Starting.can_become(Status::Running));
        for s in [Status::Pending, Status::Building, Status::Starting] {
            assert!(s.can_become(Status::Failed), "{s} -> failed");
        }
        assert!(!Status::Pending.can_become(Status::Running));
        assert!(!Status::Running.can_become(Status::Failed));
        assert!(Status::Failed.legal_next().is_empty());
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert!(!s.can_become(s), "{s} -> itself");
        }
    }
}
