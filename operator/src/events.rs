//! Kubernetes Events the controllers emit: decided as plain data by the
//! pure `decide` functions, published by the reconcilers.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};

/// An Event to emit about the reconciled object.
#[derive(Clone, Debug, PartialEq)]
pub struct EventSpec {
    pub warning: bool,
    pub reason: &'static str,
    /// What was done, and to which subject (a partition, a version, a
    /// Job): the recorder folds repeats of one (reason, action) into a
    /// series, so distinct subjects keep Events of their own.
    pub action: String,
    pub note: String,
}

/// Longest note Kubernetes accepts on an Event is 1 kB.
const MAX_NOTE_CHARS: usize = 1000;

pub async fn publish<K>(
    recorder: &Recorder,
    object: &K,
    events: &[EventSpec],
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()>,
{
    let reference = object.object_ref(&());
    for event in events {
        let event = Event {
            type_: if event.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: event.reason.to_string(),
            note: Some(event.note.chars().take(MAX_NOTE_CHARS).collect()),
            action: event.action.clone(),
            secondary: None,
        };
        recorder.publish(&event, &reference).await?;
    }
    Ok(())
}
