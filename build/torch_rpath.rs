//! Shared build script for every package whose binaries or tests link libtorch:
//! records libtorch's `lib/` as an rpath so that a plain `cargo run` / `cargo test`
//! (and the binaries in `target/`) find `libtorch_cpu.so` without `LD_LIBRARY_PATH`.
//! `LIBTORCH` comes from `.cargo/config.toml`, pointing at what `scripts/setup` installed.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Some(root) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&root).join("lib");
        // Resolve the .tools/libtorch symlink so the rpath survives a moved venv link.
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
