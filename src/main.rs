//! The `shoal` binary: argument parsing, logging and wiring only.

fn main() {}
