//! Writes the CRD YAML generated from the Rust types into `crds/` and the
//! Helm chart's `crds/` (or into the directories given as arguments). The
//! test command runs it and fails on a diff.

fn main() -> anyhow::Result<()> {
    let mut dirs: Vec<String> = std::env::args().skip(1).collect();
    if dirs.is_empty() {
        dirs = vec!["crds".into(), "charts/eventplane/crds".into()];
    }
    for (file, yaml) in eventplane_operator::crds::all()? {
        for dir in &dirs {
            let path = std::path::Path::new(dir).join(file);
            std::fs::write(&path, &yaml)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
