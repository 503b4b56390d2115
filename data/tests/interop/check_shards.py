#!/usr/bin/env python3
"""Check a `moeru data prepare` output with pyarrow (the CI interop step).

    python3 data/tests/interop/check_shards.py DIR

Verifies, for every shard listed in DIR/manifest.json: the sha256 and byte size, that pyarrow
reads it, the schema (input_ids: list<int32>, loss_mask: list<uint8>), zstd compression,
row-group layout, row and token counts against the manifest, equal per-row lengths of ids
and mask, mask values in {0, 1}, and token ids in [0, vocab_size). Exits non-zero on the first
failure with a message naming the shard.
"""
import hashlib
import json
import os
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def fail(msg):
    print(f"check_shards: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    if len(sys.argv) != 2:
        fail("usage: check_shards.py DIR")
    root = sys.argv[1]
    manifest = json.load(open(os.path.join(root, "manifest.json"), encoding="utf-8"))
    if manifest.get("format") != "moeru-data/1":
        fail(f"unexpected manifest format {manifest.get('format')!r}")
    vocab = manifest["tokenizer"]["vocab_size"]
    want = pa.schema([
        pa.field("input_ids", pa.list_(pa.field("item", pa.int32(), nullable=False)), nullable=False),
        pa.field("loss_mask", pa.list_(pa.field("item", pa.uint8(), nullable=False)), nullable=False),
    ])
    docs = tokens = loss = 0
    listed = set()
    for shard in manifest["shards"]:
        path = os.path.join(root, shard["file"])
        listed.add(shard["file"])
        if os.path.getsize(path) != shard["bytes"]:
            fail(f"{path}: size {os.path.getsize(path)} != manifest {shard['bytes']}")
        if sha256(path) != shard["sha256"]:
            fail(f"{path}: sha256 does not match the manifest")
        pf = pq.ParquetFile(path)
        if not pf.schema_arrow.equals(want):
            fail(f"{path}: schema {pf.schema_arrow} != {want}")
        md = pf.metadata
        if md.num_row_groups != len(shard["row_groups"]):
            fail(f"{path}: {md.num_row_groups} row groups, manifest lists {len(shard['row_groups'])}")
        for i, rg in enumerate(shard["row_groups"]):
            if md.row_group(i).num_rows != rg["rows"]:
                fail(f"{path}: row group {i} has {md.row_group(i).num_rows} rows, manifest {rg['rows']}")
            for c in range(md.row_group(i).num_columns):
                comp = md.row_group(i).column(c).compression
                if comp != "ZSTD":
                    fail(f"{path}: row group {i} column {c} is {comp}, expected ZSTD")
        table = pf.read()
        ids, mask = table.column("input_ids"), table.column("loss_mask")
        if table.num_rows != shard["documents"]:
            fail(f"{path}: {table.num_rows} rows, manifest {shard['documents']}")
        if not pc.all(pc.equal(pc.list_value_length(ids), pc.list_value_length(mask))).as_py():
            fail(f"{path}: input_ids and loss_mask lengths differ in some row")
        flat_ids, flat_mask = pc.list_flatten(ids), pc.list_flatten(mask)
        n = len(flat_ids)
        if n != shard["tokens"]:
            fail(f"{path}: {n} tokens, manifest {shard['tokens']}")
        if n and (pc.min(flat_ids).as_py() < 0 or pc.max(flat_ids).as_py() >= vocab):
            fail(f"{path}: token id outside [0, {vocab})")
        if n and pc.max(flat_mask).as_py() > 1:
            fail(f"{path}: loss_mask value other than 0/1")
        docs += table.num_rows
        tokens += n
        loss += pc.sum(flat_mask.cast(pa.int64())).as_py() or 0
    for key, got in (("documents", docs), ("tokens", tokens), ("loss_tokens", loss)):
        if manifest[key] != got:
            fail(f"manifest {key} = {manifest[key]}, shards hold {got}")
    extra = {f for f in os.listdir(root) if f.endswith(".parquet")} - listed
    if extra:
        fail(f"shards not in the manifest: {sorted(extra)}")
    print(f"check_shards: OK {root}: {len(listed)} shard(s), {docs} documents, {tokens} tokens, "
          f"{loss} with loss")


if __name__ == "__main__":
    main()
