"""`dsv3 data build`: text/code files -> deduplicated, split, tokenized, memory-mapped shards.

Two passes keep memory flat however large the corpus: the first reads each file once to hash
it (exact duplicates) and MinHash it (near duplicates); the second re-reads only the kept files,
tokenizes them in batches and streams `tokens + [EOS]` into fixed-size shards. The held-out
split is decided per file from a hash of its relative path, so adding files never moves others.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from dsv3.data.dedup import NUM_PERM, SHINGLE_BYTES, MinHasher, NearDupIndex, jaccard, normalize, sha256_hex, shingle_hashes
from dsv3.data.shards import MANIFEST, SPLITS, DataError, shard_name, token_dtype

_GLOB_CHARS = re.compile(r"[*?\[]")
_SKIP_DIRS = {"__pycache__", "node_modules"}
_BATCH_BYTES = 4 << 20


def load_tokenizer(directory: str | Path) -> tuple[Tokenizer, int, str, int | None]:
    """(tokenizer, eos id, eos token, bos id or None) from `tokenizer.json` + `tokenizer_config.json`."""
    d = Path(directory)
    if not (d / "tokenizer.json").is_file():
        raise DataError(f"tokenizer directory {d} has no tokenizer.json.")
    config_path = d / "tokenizer_config.json"
    if not config_path.is_file():
        raise DataError(f"tokenizer directory {d} has no tokenizer_config.json (needed for eos_token).")
    try:
        tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        tok_config = json.loads(config_path.read_text())
        eos, bos = tok_config.get("eos_token"), tok_config.get("bos_token")
    except Exception as e:  # tokenizers raises plain Exception on a malformed file
        raise DataError(f"cannot read the tokenizer in {d}: {str(e).splitlines()[0]}") from None
    if isinstance(eos, dict):
        eos = eos.get("content")
    eos_id = tokenizer.token_to_id(eos) if isinstance(eos, str) else None
    if eos_id is None:
        raise DataError(f"eos_token {eos!r} of {config_path} is not in the tokenizer's vocabulary.")
    if isinstance(bos, dict):
        bos = bos.get("content")
    bos_id = tokenizer.token_to_id(bos) if isinstance(bos, str) else None
    tokenizer.encode_special_tokens = True  # a file's text can never produce EOS/FIM ids
    return tokenizer, int(eos_id), eos, bos_id


def _root_and_files(spec: str) -> tuple[Path, list[Path]]:
    if _GLOB_CHARS.search(spec):
        parts = Path(spec).parts
        fixed = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
        root = Path(*parts[:fixed]) if fixed else Path(".")
        return root, [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
    path = Path(spec)
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise DataError(f"input {spec} does not exist.")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and n not in _SKIP_DIRS)
        found += [Path(dirpath) / n for n in sorted(filenames) if not n.startswith(".")]
    return path, found


def discover(inputs: list[str], include: list[str] | None = None, exclude: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of every matching file, sorted; the relative path is
    `<input root name>/<path below the root>` and is what the split hash sees."""
    files: dict[str, Path] = {}
    excluded = exclude.resolve() if exclude is not None else None
    for spec in inputs:
        root, paths = _root_and_files(spec)
        root = Path(os.path.abspath(root))
        for p in paths:
            real = p.resolve()
            if excluded is not None and excluded in real.parents:
                continue
            if include and not any(fnmatch.fnmatch(p.name, pat) for pat in include):
                continue
            rel = f"{root.name or 'root'}/{Path(os.path.abspath(p)).relative_to(root).as_posix()}"
            if rel in files and files[rel].resolve() != real:
                raise DataError(f"inputs {files[rel]} and {p} share the relative path {rel}; give their directories different names.")
            files[rel] = p
    if not files:
        pats = f" with --include {' '.join(include)}" if include else ""
        raise DataError(f"no files matched --inputs {' '.join(inputs)}{pats}.")
    return sorted(files.items())


def split_of(rel: str, heldout_fraction: float, seed: int = 0) -> str:
    """`heldout` when sha256("<seed>:<rel>") read as a fraction of 2**64 is below the fraction."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "big")
    return "heldout" if h / 2.0**64 < heldout_fraction else "train"


class _ShardWriter:
    """Appends documents to `<split>-NNNNN.bin`, starting a new shard rather than splitting a
    document across two (a document longer than a shard gets a shard of its own)."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.limit = out, split, dtype, shard_tokens
        self.counts: list[int] = []
        self.handle = None

    def write(self, tokens: np.ndarray) -> tuple[int, int]:
        if self.handle is None or (self.counts[-1] and self.counts[-1] + len(tokens) > self.limit):
            self.close()
            self.handle = open(self.out / shard_name(self.split, len(self.counts)), "wb")
            self.counts.append(0)
        offset = self.counts[-1]
        self.handle.write(tokens.astype(self.dtype).tobytes())
        self.counts[-1] += len(tokens)
        return len(self.counts) - 1, offset

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _read_text(path: Path) -> tuple[bytes, str | None]:
    data = path.read_bytes()
    if b"\0" in data:
        return data, None
    try:
        return data, data.decode("utf-8")
    except UnicodeDecodeError:
        return data, None


def _shingles_of(path: Path) -> np.ndarray:
    return shingle_hashes(normalize(_read_text(path)[1] or ""))


def _validate(heldout_fraction: float, shard_tokens: int, near_dup_threshold: float) -> None:
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"--heldout-fraction {heldout_fraction} must be in [0, 1).")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens {shard_tokens} must be a positive number of tokens.")
    if not 0.0 < near_dup_threshold <= 1.0:
        raise DataError(f"--near-dup-threshold {near_dup_threshold} must be in (0, 1].")


def build(inputs: list[str], tokenizer_dir: str | Path, out: str | Path, include: list[str] | None = None,
          heldout_fraction: float = 0.01, shard_tokens: int = 100_000_000, near_dup_threshold: float = 0.85,
          seed: int = 0, progress: bool = True) -> dict:
    """Run the whole pipeline and return the manifest it wrote to `out/manifest.json`."""
    _validate(heldout_fraction, shard_tokens, near_dup_threshold)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory.")
    tokenizer, eos_id, eos_token, bos_id = load_tokenizer(tokenizer_dir)
    bos = [] if bos_id is None else [bos_id]  # documents start as prompts do: BOS ... EOS
    files = discover(inputs, include, exclude=out)
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1  # ids may be sparse
    dtype = token_dtype(vocab_size)

    # Pass 1: exact and near-duplicate removal, in sorted path order (the first copy wins).
    hasher, index = MinHasher(NUM_PERM, seed), NearDupIndex(near_dup_threshold, NUM_PERM)
    by_sha: dict[str, str] = {}
    kept, removed = [], []
    skipped = {"binary_or_not_utf8": 0, "empty": 0}
    for rel, path in tqdm(files, desc="dedup", unit="file", disable=not progress):
        data, text = _read_text(path)
        if text is None or not text.strip():
            skipped["empty" if text is not None else "binary_or_not_utf8"] += 1
            continue
        sha = sha256_hex(data)
        if sha in by_sha:
            removed.append({"path": rel, "sha256": sha, "reason": "exact", "duplicate_of": by_sha[sha], "similarity": 1.0})
            continue
        by_sha[sha] = rel
        shingles = shingle_hashes(normalize(text))
        sig = hasher.signature(shingles)
        hit = max(((jaccard(shingles, _shingles_of(kept[j][1])), -j) for j in index.candidates(sig)), default=None)
        if hit is not None and hit[0] >= near_dup_threshold:
            removed.append({"path": rel, "sha256": sha, "reason": "near", "duplicate_of": kept[-hit[1]][0],
                            "similarity": round(hit[0], 4)})
            continue
        index.add(sig)
        kept.append((rel, path, sha, len(data)))
    if not kept:
        raise DataError(f"none of the {len(files)} files matched by --inputs has text (they are empty, binary or not UTF-8).")

    # Pass 2: tokenize kept files in batches and stream them into per-split shards.
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.name == MANIFEST or re.fullmatch(r"(train|heldout)-\d{5}\.bin", stale.name):
            stale.unlink()
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    entries = []
    bar = tqdm(total=sum(k[3] for k in kept), desc="tokenize", unit="B", unit_scale=True, disable=not progress)
    start = 0
    while start < len(kept):
        stop, size = start, 0
        while stop < len(kept) and (stop == start or size + kept[stop][3] <= _BATCH_BYTES):
            size, stop = size + kept[stop][3], stop + 1
        texts = []
        for rel, path, sha, _ in kept[start:stop]:
            data, text = _read_text(path)
            if text is None or sha256_hex(data) != sha:
                raise DataError(f"input {path} changed while the shards were being built.")
            texts.append(text)
        for (rel, path, sha, nbytes), enc in zip(kept[start:stop], tokenizer.encode_batch_fast(texts, add_special_tokens=False)):
            ids = np.array(bos + enc.ids + [eos_id], dtype=np.int64)
            if (ids[:-1] == eos_id).any():
                raise DataError(f"the tokenizer turned text of {path} into the EOS id {eos_id}; it must not.")
            split = split_of(rel, heldout_fraction, seed)
            shard, offset = writers[split].write(ids)
            entries.append({"path": rel, "sha256": sha, "bytes": nbytes, "tokens": len(ids),
                            "split": split, "shard": shard, "offset": offset})
        bar.update(size)
        start = stop
    bar.close()
    for w in writers.values():
        w.close()

    tok_json = Path(tokenizer_dir) / "tokenizer.json"
    manifest = {
        "format": "dsv3-token-shards", "version": 1,
        "tokenizer": {"path": str(Path(tokenizer_dir).resolve()), "sha256": sha256_hex(tok_json.read_bytes()),
                      "vocab_size": vocab_size, "eos_id": eos_id, "eos_token": eos_token,
                      "bos_id": bos_id},
        "dtype": dtype.name, "document_separator": "eos",
        "settings": {"inputs": list(inputs), "include": include or [], "heldout_fraction": heldout_fraction,
                     "shard_tokens": shard_tokens, "near_dup_threshold": near_dup_threshold, "seed": seed},
        "dedup": {"exact_removed": sum(r["reason"] == "exact" for r in removed),
                  "near_removed": sum(r["reason"] == "near" for r in removed),
                  "skipped": skipped, "method": "minhash-lsh", "shingle_bytes": SHINGLE_BYTES,
                  "num_perm": NUM_PERM, "bands": index.bands, "rows": index.rows},
        "totals": {s: {"files": sum(e["split"] == s for e in entries), "tokens": sum(writers[s].counts)} for s in SPLITS},
        "shards": {s: [{"file": shard_name(s, i), "tokens": n} for i, n in enumerate(writers[s].counts)] for s in SPLITS},
        "files": entries,
        "removed": removed,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest
