//! The shard reader decodes every Parquet layout of the shard schema to the same documents:
//! its fast path (PLAIN / BYTE_STREAM_SPLIT pages, zstd or uncompressed, v1 or v2) and the
//! general column reader it falls back to (dictionary, delta, snappy, empty lists, mixed masks).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, ListArray, RecordBatch, UInt8Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field};
use moeru_data::manifest::{Manifest, RowGroupInfo, ShardInfo, TokenizerInfo, FORMAT};
use moeru_data::reader::{RowGroupDocs, ShardReader};
use moeru_data::rng::SplitMix64;
use moeru_data::shard_writer::{shard_schema, INPUT_IDS};
use moeru_data::DataError;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{WriterProperties, WriterPropertiesBuilder, WriterVersion};
use parquet::schema::types::ColumnPath;

const VOCAB: u64 = 1000;

type Doc = (Vec<i32>, Vec<u8>);

fn docs(seed: u64, empty_every: u64, chat: bool) -> Vec<Doc> {
    let mut r = SplitMix64::new(seed);
    (0..300u64)
        .map(|i| {
            let len = if empty_every > 0 && i % empty_every == 3 {
                0
            } else {
                1 + r.below(700) as usize
            };
            let ids = (0..len).map(|_| r.below(VOCAB) as i32).collect();
            let mask = (0..len)
                .map(|_| if chat { r.below(2) as u8 } else { 1 })
                .collect();
            (ids, mask)
        })
        .collect()
}

/// Write `docs` as one shard with `props` in row groups of 100 documents; return its manifest.
fn write(dir: &Path, docs: &[Doc], props: WriterPropertiesBuilder) -> Manifest {
    let file = std::fs::File::create(dir.join("shard-00000.parquet")).unwrap();
    let props = props.set_data_page_size_limit(4096).build();
    let mut w = ArrowWriter::try_new(file, shard_schema(), Some(props)).unwrap();
    let mut row_groups = Vec::new();
    for chunk in docs.chunks(100) {
        let lens = chunk.iter().map(|d| d.0.len());
        let offsets = OffsetBuffer::from_lengths(lens);
        let ids: Vec<i32> = chunk.iter().flat_map(|d| d.0.clone()).collect();
        let mask: Vec<u8> = chunk.iter().flat_map(|d| d.1.clone()).collect();
        let tokens = ids.len() as u64;
        let i32f = Arc::new(Field::new_list_field(DataType::Int32, false));
        let u8f = Arc::new(Field::new_list_field(DataType::UInt8, false));
        let cols: Vec<ArrayRef> = vec![
            Arc::new(ListArray::new(
                i32f,
                offsets.clone(),
                Arc::new(Int32Array::from(ids)),
                None,
            )),
            Arc::new(ListArray::new(
                u8f,
                offsets,
                Arc::new(UInt8Array::from(mask)),
                None,
            )),
        ];
        w.write(&RecordBatch::try_new(shard_schema(), cols).unwrap())
            .unwrap();
        w.flush().unwrap();
        row_groups.push(RowGroupInfo {
            rows: chunk.len() as u64,
            tokens,
        });
    }
    w.close().unwrap();
    let tokens: u64 = docs.iter().map(|d| d.0.len() as u64).sum();
    let loss: u64 = docs
        .iter()
        .map(|d| d.1.iter().map(|&m| m as u64).sum::<u64>())
        .sum();
    Manifest {
        format: FORMAT.into(),
        created_by: "test".into(),
        mode: "pretrain".into(),
        documents: docs.len() as u64,
        tokens,
        loss_tokens: loss,
        tokenizer: TokenizerInfo {
            path: "t".into(),
            sha256: "t".into(),
            vocab_size: VOCAB,
            eos_id: None,
        },
        inputs: vec![],
        shards: vec![ShardInfo {
            file: "shard-00000.parquet".into(),
            documents: docs.len() as u64,
            tokens,
            bytes: 0,
            sha256: String::new(),
            row_groups,
        }],
    }
}

fn read_all(dir: &Path, m: &Manifest) -> Result<Vec<Doc>, DataError> {
    let mut r = ShardReader::new(dir, m);
    let mut out = Vec::new();
    let mut buf = RowGroupDocs::default();
    for g in 0..m.shards[0].row_groups.len() {
        r.read_into(0, g, &mut buf)?;
        out.extend((0..buf.len()).map(|i| {
            let (ids, mask) = buf.doc(i);
            (ids.to_vec(), mask.to_vec())
        }));
    }
    Ok(out)
}

fn ids_leaf() -> ColumnPath {
    ColumnPath::new(vec![INPUT_IDS.into(), "list".into(), "item".into()])
}

fn layouts() -> Vec<(&'static str, WriterPropertiesBuilder)> {
    let zstd = Compression::ZSTD(ZstdLevel::try_new(1).unwrap());
    let base = || {
        WriterProperties::builder()
            .set_compression(zstd)
            .set_dictionary_enabled(false)
    };
    vec![
        ("plain v1", base()),
        (
            "plain v2",
            base()
                .set_writer_version(WriterVersion::PARQUET_2_0)
                .set_encoding(Encoding::PLAIN),
        ),
        (
            "uncompressed",
            base().set_compression(Compression::UNCOMPRESSED),
        ),
        (
            "byte stream split",
            base().set_column_encoding(ids_leaf(), Encoding::BYTE_STREAM_SPLIT),
        ),
        ("dictionary", base().set_dictionary_enabled(true)),
        (
            "delta",
            base().set_column_encoding(ids_leaf(), Encoding::DELTA_BINARY_PACKED),
        ),
        ("snappy", base().set_compression(Compression::SNAPPY)),
    ]
}

#[test]
fn every_layout_reads_back_the_same_documents() {
    for (empty_every, chat) in [(0, false), (7, false), (0, true), (5, true)] {
        let want = docs(empty_every + chat as u64, empty_every, chat);
        for (name, props) in layouts() {
            let tmp = tempfile::tempdir().unwrap();
            let m = write(tmp.path(), &want, props);
            let got = read_all(tmp.path(), &m).unwrap();
            assert_eq!(
                got, want,
                "{name}, empty lists every {empty_every}, chat {chat}"
            );
        }
    }
}

#[test]
fn out_of_vocab_ids_are_found_on_every_layout() {
    let mut d = docs(9, 0, false);
    d[150].0[17] = VOCAB as i32; // row group 1, row 50
    d[250].0[0] = -1;
    for (name, props) in layouts() {
        let tmp = tempfile::tempdir().unwrap();
        let m = write(tmp.path(), &d, props);
        let err = read_all(tmp.path(), &m).unwrap_err().to_string();
        assert!(
            err.contains(&VOCAB.to_string())
                && err.contains("row 50")
                && err.contains("row group 1"),
            "{name}: {err}"
        );
    }
}
