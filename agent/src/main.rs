//! The `crux` binary.

fn main() {
    println!("crux {}", env!("CARGO_PKG_VERSION"));
}
