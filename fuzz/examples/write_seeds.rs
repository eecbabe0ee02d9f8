//! Writes the seed inputs (`src/seeds.rs`) into `corpus/<target>/seed-<name>`.
//!
//! Usage: cargo run --manifest-path fuzz/Cargo.toml --example write_seeds

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, name, input) in vfio_user_pvrdma_fuzz::seeds::all() {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("seed-{name}"));
        std::fs::write(&path, input)?;
        println!(
            "{} ({} bytes)",
            path.display(),
            std::fs::metadata(&path)?.len()
        );
    }
    Ok(())
}
