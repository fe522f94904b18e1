//! The event store: appends (validated, idempotent, optimistic concurrency,
//! group commit), stream reads, and the signal that wakes the projectors
//! after a commit.

pub mod append;
pub mod group_commit;
pub mod model;
pub mod notify;
pub mod read;

pub use append::{AppendError, append};
pub use group_commit::{Appender, GroupCommitConfig};
pub use model::{AppendRequest, AppendResult, ExpectedVersion, NewEvent};
