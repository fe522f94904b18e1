//! Writes the CRD YAML generated from the Rust types into `crds/` (or the
//! directory given as the first argument). CI runs it and fails on a diff.

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "crds".into());
    for (file, yaml) in eventplane_operator::crds::all()? {
        let path = std::path::Path::new(&dir).join(file);
        std::fs::write(&path, yaml)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
