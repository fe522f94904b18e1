//! A projection as the runtime sees it: one version of its spec, the
//! physical table of that version and the checkpoint that tracks it.

use eventplane_api::{ProjectionManifest, ProjectionSpec};

use crate::checkpoints::version_checkpoint;

/// A projection as the runtime sees it: its name, the spec of one version,
/// the physical table of that version and the checkpoint row that tracks
/// it. Readers use the stable name `spec.table`, a view of the active
/// version's table.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    pub name: String,
    pub spec: ProjectionSpec,
    /// `<spec.table>_v<spec.version>`.
    pub table: String,
    /// The projection's name for the live version; `<name>@v<version>` for
    /// a version being built.
    pub checkpoint: String,
}

/// The physical table of one version of a projection.
pub fn version_table(base: &str, version: u32) -> String {
    format!("{base}_v{version}")
}

impl Projection {
    pub fn from_manifest(manifest: ProjectionManifest) -> Self {
        Self::live(manifest.metadata.name, manifest.spec)
    }

    /// The version that serves reads and follows the log.
    pub fn live(name: String, spec: ProjectionSpec) -> Self {
        let table = version_table(&spec.table, spec.version);
        Projection {
            checkpoint: name.clone(),
            name,
            spec,
            table,
        }
    }

    /// A version being built beside the live one, with its own checkpoint.
    pub fn build(name: String, spec: ProjectionSpec) -> Self {
        let table = version_table(&spec.table, spec.version);
        let checkpoint = version_checkpoint(&name, spec.version);
        Projection {
            name,
            spec,
            table,
            checkpoint,
        }
    }

    pub fn is_live(&self) -> bool {
        self.checkpoint == self.name
    }
}
