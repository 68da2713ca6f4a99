//! No code: this crate only depends on crates with the features the whole
//! workspace builds them with (see `Cargo.toml`), so that building one
//! package (`cargo run -p chorus-server`) reuses the workspace's build
//! instead of rebuilding dependencies with a smaller feature set.
