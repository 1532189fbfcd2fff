//! Every example mesh in `examples/` loads without a single error.

use wary_control_plane::{resources, source::ConfigDir};

#[test]
fn every_example_is_valid() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let loaded = ConfigDir::new(&dir).load().unwrap();
        assert!(loaded.errors.is_empty(), "{}: {:?}", dir.display(), loaded.errors);
        assert!(!loaded.documents.is_empty(), "{} has no documents", dir.display());
        resources::compute(&loaded.documents).unwrap_or_else(|e| panic!("{}: {e:?}", dir.display()));
        seen += 1;
    }
    assert!(seen >= 1, "no example meshes found");
}
