//! The set of projections a process serves, loaded from manifest files.

use std::path::Path;
use std::sync::Arc;

use eventplane_spec::{ProjectionManifest, ProjectionSpec, load_manifests};

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
        let checkpoint = format!("{name}@v{}", spec.version);
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

/// Loads every manifest from a file, or from each `.yaml`/`.yml` file of a
/// directory. Names must be unique.
pub fn load(path: &Path) -> anyhow::Result<Vec<Arc<Projection>>> {
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let p = entry?.path();
            if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut projections: Vec<Arc<Projection>> = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let manifests =
            load_manifests(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        for manifest in manifests {
            let projection = Projection::from_manifest(manifest);
            if projections.iter().any(|p| p.name == projection.name) {
                anyhow::bail!(
                    "{}: projection {:?} is declared twice",
                    file.display(),
                    projection.name
                );
            }
            projections.push(Arc::new(projection));
        }
    }
    Ok(projections)
}
