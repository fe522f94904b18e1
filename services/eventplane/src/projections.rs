//! The set of projections a process serves, loaded from manifest files.

use std::path::Path;
use std::sync::Arc;

use eventplane_api::load_manifests;
use eventplane_store::Projection;

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
