//! Empty library target: lets host tooling (rust-analyzer, `cargo metadata`) see the
//! crate. The programs live in the `lb-ebpf` binary (`src/main.rs`).
#![no_std]
