//! The README's YAML blocks are what a new user copies: each must load, and
//! a Projection or PartitionPolicy must pass the same validation a
//! declaration does.

const README: &str = include_str!("../../README.md");

/// The bodies of the fenced `yaml` blocks, with the line each starts on.
fn yaml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        let fence = line.trim_start();
        match &mut current {
            None if fence.starts_with("```yaml") => current = Some((n + 2, String::new())),
            Some(_) if fence.starts_with("```") => blocks.extend(current.take()),
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    assert!(current.is_none(), "a yaml block is not closed");
    blocks
}

#[test]
fn every_yaml_block_of_the_readme_loads_and_validates() {
    let blocks = yaml_blocks(README);
    assert!(!blocks.is_empty(), "the README shows a projection spec");
    let mut projections = 0;
    for (line, body) in blocks {
        let kind = body
            .lines()
            .find_map(|l| l.strip_prefix("kind:"))
            .map(|k| k.split('#').next().unwrap_or_default().trim().to_string());
        match kind.as_deref() {
            Some("Projection") => {
                eventplane_api::load_manifests(&body)
                    .unwrap_or_else(|e| panic!("README line {line}: {e}"));
                projections += 1;
            }
            Some("PartitionPolicy") => {
                eventplane_api::load_partition_policies(&body)
                    .unwrap_or_else(|e| panic!("README line {line}: {e}"));
            }
            _ => {
                serde_saphyr::from_str::<serde_json::Value>(&body)
                    .unwrap_or_else(|e| panic!("README line {line}: {e}"));
            }
        }
    }
    assert!(projections >= 1);
}

#[test]
fn blocks_are_found_with_their_lines() {
    let text = "intro\n```yaml\na: 1\n```\n```sh\nx\n```\n```yaml\nb: 2\n```\n";
    assert_eq!(
        yaml_blocks(text),
        vec![(3, "a: 1\n".to_string()), (9, "b: 2\n".to_string())]
    );
}
