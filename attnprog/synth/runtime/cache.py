"""On-disk cache of program outputs, keyed by (program hash, corpus hash, tokenizer id).

One safetensors file per program under ``<root>/<corpus>-<tokenizer>/``: the packed
normalised cells [C] float32, the failed flags [S], the failure reason and a checksum of
all of that together with the entry's key, verified on every read (a damaged, edited or
swapped file reads as a miss and is recomputed). Only the main process writes here. Root: the
``cache_dir`` argument, else ``outputs/`` under ``$ATTNPROG_CACHE_DIR`` or the user cache dir.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnprog.cachedir import ENV_VAR, cache_root
from attnprog.errors import StoreError


def default_cache_dir() -> Path:
    """``outputs/`` under attnprog's cache root (``$ATTNPROG_CACHE_DIR`` or the user cache dir)."""
    return cache_root() / "outputs"


def corpus_hash(sentences: Sequence) -> str:
    """Content hash of a tokenised corpus: every text and its token ids, in order (16 hex)."""
    digest = hashlib.sha256()
    for s in sentences:
        text = s.text.encode("utf-8")
        digest.update(len(text).to_bytes(8, "little") + text)
        ids = np.asarray(s.ids, dtype=np.int64)
        digest.update(len(ids).to_bytes(8, "little") + ids.tobytes())
    return digest.hexdigest()[:16]


@dataclass
class CachedOutput:
    """One program's outputs on one corpus."""

    values: np.ndarray  # [C] float32
    failed: np.ndarray  # [S] bool
    reason: str


class OutputCache:
    """Program outputs on disk; a lookup that misses or finds a damaged file returns None."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    def folder(self, corpus: str, tokenizer_id: str) -> Path:
        tokenizer = hashlib.sha256(tokenizer_id.encode()).hexdigest()[:8]
        return self.root / f"{corpus}-{tokenizer}"

    def path(self, program_hash: str, corpus: str, tokenizer_id: str) -> Path:
        return self.folder(corpus, tokenizer_id) / f"{program_hash}.safetensors"

    def get(
        self, program_hash: str, corpus: str, tokenizer_id: str, n_cells: int, n_texts: int
    ) -> CachedOutput | None:
        """The cached outputs, or None when absent or not of the expected size."""
        from safetensors import SafetensorError, safe_open

        path = self.path(program_hash, corpus, tokenizer_id)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="numpy") as handle:
                meta = handle.metadata() or {}
                values = np.array(handle.get_tensor("values"))  # copies: no view of the file
                failed = np.array(handle.get_tensor("failed"))
        except (OSError, SafetensorError, KeyError, ValueError):
            return None  # damaged: recompute and overwrite
        reason = meta.get("reason", "")
        if values.shape != (n_cells,) or failed.shape != (n_texts,) or values.dtype != np.float32:
            return None
        key = (program_hash, corpus, tokenizer_id)
        if meta.get("checksum") != _checksum(key, values, failed, reason):
            return None
        return CachedOutput(values, failed.astype(bool), reason)

    def put(
        self,
        program_hash: str,
        corpus: str,
        tokenizer_id: str,
        values: np.ndarray,
        failed: np.ndarray,
        reason: str = "",
    ) -> None:
        """Store one program's outputs (atomically: a reader never sees half a file)."""
        from safetensors.numpy import save_file

        folder = self.folder(corpus, tokenizer_id)
        path = folder / f"{program_hash}.safetensors"
        tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._describe(folder, corpus, tokenizer_id)
            tensors = {
                "values": np.ascontiguousarray(values, dtype=np.float32),
                "failed": np.ascontiguousarray(failed, dtype=np.uint8),
            }
            checksum = _checksum((program_hash, corpus, tokenizer_id), tensors["values"],
                                 tensors["failed"], reason)
            save_file(tensors, str(tmp), metadata={"reason": reason, "checksum": checksum})
            tmp.replace(path)
        except OSError as err:
            raise StoreError(
                f"cannot write the output cache at {folder} ({err}); set {ENV_VAR} or pass "
                "cache_dir to a writable directory"
            ) from err

    @staticmethod
    def _describe(folder: Path, corpus: str, tokenizer_id: str) -> None:
        about = folder / "corpus.json"
        if not about.exists():
            about.write_text(json.dumps({"corpus_hash": corpus, "tokenizer_id": tokenizer_id}))


def _checksum(key: tuple[str, str, str], values: np.ndarray, failed: np.ndarray, reason: str) -> str:
    """sha256 over the entry's key and content: a file moved to another key fails too."""
    digest = hashlib.sha256("\0".join(key).encode())
    digest.update(np.ascontiguousarray(values, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(failed, dtype=np.uint8).tobytes())
    digest.update(reason.encode("utf-8", errors="replace"))
    return digest.hexdigest()
