//! Stream + pack throughput and peak RSS of the data loader.
//!
//! ```text
//! cargo run --release -p moeru-data --example bench_stream -- all --dir /tmp/moeru-bench
//! ```
//! `all` generates a synthetic prepared dataset of >= 1 GB of int32 token ids (plus a 100 MB
//! subset sharing its shards), then streams + packs each in a fresh process (so the peak RSS,
//! VmHWM, is that run's own) and prints a Markdown table. `generate` and `stream` run the
//! steps separately.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use moeru_data::manifest::{Manifest, TokenizerInfo, FORMAT};
use moeru_data::rng::SplitMix64;
use moeru_data::shard_writer::{ShardLayout, ShardWriter};
use moeru_data::{DataLoader, LoaderConfig};

const VOCAB: u64 = 151_669;

fn usage() -> ! {
    eprintln!(
        "usage: bench_stream all --dir DIR [--gb 1.0] [--small-gb 0.1] [--seq-len 4096] [--micro-batch 8]\n\
         \x20      bench_stream generate --dir DIR [--gb 1.0] [--small-gb 0.1]\n\
         \x20      bench_stream stream --data DIR [--seq-len 4096] [--micro-batch 8]"
    );
    std::process::exit(2)
}

struct Opts {
    dir: PathBuf,
    data: PathBuf,
    gb: f64,
    small_gb: f64,
    seq_len: usize,
    micro_batch: usize,
}

fn parse(args: &[String]) -> Opts {
    let mut o = Opts {
        dir: PathBuf::from("/tmp/moeru-bench"),
        data: PathBuf::new(),
        gb: 1.0,
        small_gb: 0.1,
        seq_len: 4096,
        micro_batch: 8,
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--dir" => o.dir = v.into(),
            "--data" => o.data = v.into(),
            "--gb" => o.gb = v.parse().unwrap_or_else(|_| usage()),
            "--small-gb" => o.small_gb = v.parse().unwrap_or_else(|_| usage()),
            "--seq-len" => o.seq_len = v.parse().unwrap_or_else(|_| usage()),
            "--micro-batch" => o.micro_batch = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    o
}

fn status_kb(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn generate(o: &Opts) {
    let full = o.dir.join("full");
    let small = o.dir.join("small");
    let _ = std::fs::remove_dir_all(&o.dir);
    std::fs::create_dir_all(&full).expect("create bench dir");
    let total_tokens = (o.gb * 1e9 / 4.0).ceil() as u64;
    let shard_tokens = (o.small_gb * 1e9 / 4.0).ceil() as u64;
    let layout = ShardLayout {
        shard_tokens,
        row_group_tokens: 1 << 20,
        zstd_level: 1,
    };
    let mut w = ShardWriter::new(&full, layout).expect("writer");
    let mut r = SplitMix64::new(42);
    let (mut tokens, mut docs) = (0u64, 0u64);
    let t0 = Instant::now();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    while tokens < total_tokens {
        // document lengths 16..8192, mean ~2k tokens
        let len = 16 + r.below(4096) as usize + r.below(4096) as usize / 2;
        ids.clear();
        ids.extend((0..len).map(|_| r.below(VOCAB) as i32));
        mask.clear();
        mask.resize(len, 1u8);
        w.push(&ids, &mask).expect("push");
        tokens += len as u64;
        docs += 1;
    }
    let shards = w.finish().expect("finish");
    let tok = TokenizerInfo {
        path: "synthetic".into(),
        sha256: "synthetic".into(),
        vocab_size: VOCAB,
        eos_id: Some(151_643),
    };
    let manifest = |shards: Vec<moeru_data::manifest::ShardInfo>| Manifest {
        format: FORMAT.into(),
        created_by: "bench_stream".into(),
        mode: "pretrain".into(),
        documents: shards.iter().map(|s| s.documents).sum(),
        tokens: shards.iter().map(|s| s.tokens).sum(),
        loss_tokens: shards.iter().map(|s| s.tokens).sum(),
        tokenizer: tok.clone(),
        inputs: vec![],
        shards,
    };
    manifest(shards.clone()).write(&full).expect("manifest");
    // the small dataset: the first shard (shard_tokens = small size), linked, not copied
    std::fs::create_dir_all(&small).expect("small dir");
    let first = shards[..1].to_vec();
    for s in &first {
        std::os::unix::fs::symlink(full.join(&s.file), small.join(&s.file)).expect("symlink");
    }
    manifest(first).write(&small).expect("manifest");
    let bytes: u64 = shards.iter().map(|s| s.bytes).sum();
    println!(
        "generated {docs} documents, {tokens} tokens ({:.2} GB of int32 ids) in {} shards ({:.2} GB on disk) in {:.1}s",
        tokens as f64 * 4.0 / 1e9,
        shards.len(),
        bytes as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
}

fn stream(o: &Opts) {
    let rss0 = status_kb("VmRSS:");
    let m = Manifest::read(&o.data).expect("manifest");
    let cfg = LoaderConfig::new(&o.data, o.seq_len, o.micro_batch, 0);
    let mut cfg = cfg;
    cfg.epochs = Some(1);
    let mut loader = DataLoader::new(cfg).expect("loader");
    let (c0, t0) = (cpu_seconds(), Instant::now());
    let (mut samples, mut checksum) = (0u64, 0u64);
    while let Some(batch) = loader.next_batch().expect("next_batch") {
        for s in &batch {
            samples += 1;
            checksum = checksum.wrapping_add(s.input_ids[s.input_ids.len() / 2] as u64);
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_seconds() - c0).max(1e-9);
    let tokens = m.tokens as f64;
    let hwm = status_kb("VmHWM:");
    println!(
        "RESULT data_gb={:.3} tokens={} samples={} wall_s={:.2} cpu_s={:.2} tokens_per_s={:.0} \
         ids_bytes_per_s={:.0} per_core_tokens_per_s={:.0} per_core_ids_bytes_per_s={:.0} \
         rss_start_mb={:.1} peak_rss_mb={:.1} checksum={checksum}",
        tokens * 4.0 / 1e9,
        m.tokens,
        samples,
        wall,
        cpu,
        tokens / wall,
        tokens * 4.0 / wall,
        tokens / cpu,
        tokens * 4.0 / cpu,
        rss0 as f64 / 1024.0,
        hwm as f64 / 1024.0,
    );
}

/// Read and decode every row group without packing (to split the cost).
fn read_only(o: &Opts) {
    let m = Manifest::read(&o.data).expect("manifest");
    let mut r = moeru_data::reader::ShardReader::new(&o.data, &m);
    let (c0, t0) = (cpu_seconds(), Instant::now());
    let mut n = 0u64;
    let mut docs = moeru_data::reader::RowGroupDocs::default();
    for (s, shard) in m.shards.iter().enumerate() {
        for g in 0..shard.row_groups.len() {
            r.read_into(s, g, &mut docs).expect("read");
            n += docs.ids.len() as u64;
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "READ tokens={n} wall_s={wall:.2} cpu_s={:.2} ids_bytes_per_s={:.0} peak_rss_mb={:.1}",
        cpu_seconds() - c0,
        n as f64 * 4.0 / wall,
        status_kb("VmHWM:") as f64 / 1024.0
    );
}

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn run_child(o: &Opts, data: &Path) -> String {
    let exe = std::env::current_exe().expect("current exe");
    let out = std::process::Command::new(exe)
        .args(["stream", "--data"])
        .arg(data)
        .args([
            "--seq-len",
            &o.seq_len.to_string(),
            "--micro-batch",
            &o.micro_batch.to_string(),
        ])
        .output()
        .expect("run child");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    print!("{text}");
    std::io::stdout().flush().ok();
    text.lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or("")
        .to_string()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(cmd) = args.get(1) else { usage() };
    let o = parse(&args[2..]);
    match cmd.as_str() {
        "generate" => generate(&o),
        "stream" => stream(&o),
        "read" => read_only(&o),
        "all" => {
            generate(&o);
            let small = run_child(&o, &o.dir.join("small"));
            let full = run_child(&o, &o.dir.join("full"));
            println!("\n| data (int32 ids) | tokens | wall s | tokens/s | GB/s (wall) | GB/s per core (CPU time) | peak RSS MB |");
            println!("|---|---|---|---|---|---|---|");
            for l in [&small, &full] {
                println!(
                    "| {:.2} GB | {:.0} | {:.2} | {:.3e} | {:.2} | {:.2} | {:.1} |",
                    field(l, "data_gb"),
                    field(l, "tokens"),
                    field(l, "wall_s"),
                    field(l, "tokens_per_s"),
                    field(l, "ids_bytes_per_s") / 1e9,
                    field(l, "per_core_ids_bytes_per_s") / 1e9,
                    field(l, "peak_rss_mb"),
                );
            }
            let (a, b) = (field(&small, "peak_rss_mb"), field(&full, "peak_rss_mb"));
            println!("\npeak RSS 1 GB vs 100 MB: {:+.1} %", (b / a - 1.0) * 100.0);
        }
        _ => usage(),
    }
}
