//! Writes LoRA adapters with moeru, moeru's logits and merged exports for the peft interop
//! check:  cargo run -p moeru-tests --example write_lora -- OUT_DIR
//! then    python3 tests/interop/check_peft.py OUT_DIR

#[path = "../tests/common/lora_writer.rs"]
mod lora_writer;

fn main() {
    let out = std::env::args()
        .nth(1)
        .expect("usage: write_lora OUT_DIR (a folder to write into)");
    for case in lora_writer::moeru_cases() {
        let dir = lora_writer::write_case(&case, std::path::Path::new(&out), true);
        println!("{}: {}", case.name, dir.display());
    }
}
