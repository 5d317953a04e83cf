"""AttentionStore: every head's attention on a corpus, packed in the causal layout."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnprog.errors import StoreError
from attnprog.layout import causal_offsets
from attnprog.synth.embeddings import TokenEmbeddings, attach_similarity
from attnprog.synth.features import Sentence

FORMAT_VERSION = "1"


@dataclass
class AttentionStore:
    """Attention of all n_heads_total heads (n_layers * n_heads) on some texts.

    attn_packed [n_heads_total, cells]  row head_index = layer * n_heads + head; packed causal
                                        cells of every text
    offsets     [texts + 1]             int64, where each text starts in the packed layout
                                        (offsets[-1] = cells)
    lengths     [texts]                 int64 token count per text
    ids_packed  [n_tokens]              int64 token ids of all texts concatenated
                                        (n_tokens = sum of lengths)
    embeddings                          the model's input-embedding rows of the token ids
                                        used (None in stores written before they were kept)
    """

    attn_packed: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    ids_packed: torch.Tensor
    texts: list[str]
    tokens: list[list[str]]
    spans: list[list[tuple[int, int]]]
    splits: list[str]
    meta: dict = field(default_factory=dict)
    embeddings: TokenEmbeddings | None = None

    # --- shape -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.meta["n_heads"])

    @property
    def n_rows(self) -> int:
        """n_heads_total: the rows of ``attn_packed``, one per head_index."""
        return int(self.attn_packed.shape[0])

    @property
    def n_texts(self) -> int:
        return len(self.texts)

    @property
    def n_cells(self) -> int:
        return int(self.attn_packed.shape[1])

    @property
    def device(self) -> torch.device:
        return self.attn_packed.device

    def row(self, layer: int, head: int) -> int:
        """head_index of (layer, head): its row in ``attn_packed``."""
        return layer * self.n_heads + head

    def head_of(self, row: int) -> tuple[int, int]:
        """(layer, head) of a head_index (a row of ``attn_packed``)."""
        return divmod(int(row), self.n_heads)

    # --- per text ----------------------------------------------------------------------------
    def token_ids(self, s: int) -> list[int]:
        start = int(self.lengths[:s].sum())
        return self.ids_packed[start : start + int(self.lengths[s])].tolist()

    def dense(self, row: int, s: int) -> torch.Tensor:
        """Attention of head ``row`` (its head_index) on text s as an n x n matrix (zeros above
        the diagonal)."""
        n = int(self.lengths[s])
        cells = self.attn_packed[row, int(self.offsets[s]) : int(self.offsets[s + 1])]
        dense = torch.zeros(n, n, dtype=cells.dtype, device=cells.device)
        rows, cols = torch.tril_indices(n, n, device=cells.device)
        dense[rows, cols] = cells
        return dense

    def sentences(self, indices=None) -> list[Sentence]:
        """``Sentence`` objects for the given texts (all when None), from the stored tokens."""
        indices = range(self.n_texts) if indices is None else indices
        sentences = [
            Sentence(self.texts[s], self.token_ids(s), self.tokens[s], self.spans[s])
            for s in indices
        ]
        if self.embeddings is not None:  # token meaning: s.embedding_similarity(i, j)
            attach_similarity(sentences, self.embeddings)
        return sentences

    def split_indices(self, split: str | None) -> list[int]:
        """Indices of texts in a split ('synthesis', 'selection', 'heldout'); all when None."""
        if split in (None, "all"):
            return list(range(self.n_texts))
        known = sorted(set(self.splits))
        if split not in known:
            raise StoreError(f"no texts in split {split!r}; the store has {known}")
        return [s for s, name in enumerate(self.splits) if name == split]

    def subset(self, indices) -> AttentionStore:
        """A new store with only the given texts, re-packed."""
        indices = list(indices)
        lengths = self.lengths[indices]
        offsets = torch.from_numpy(causal_offsets(lengths.cpu().numpy()))
        cells = [self.attn_packed[:, int(self.offsets[s]) : int(self.offsets[s + 1])] for s in indices]
        ids = [torch.tensor(self.token_ids(s), dtype=torch.int64) for s in indices]
        return AttentionStore(
            attn_packed=torch.cat(cells, dim=1) if cells else self.attn_packed[:, :0],
            offsets=offsets,
            lengths=lengths.clone(),
            ids_packed=torch.cat(ids) if ids else self.ids_packed[:0],
            texts=[self.texts[s] for s in indices],
            tokens=[self.tokens[s] for s in indices],
            spans=[self.spans[s] for s in indices],
            splits=[self.splits[s] for s in indices],
            meta=dict(self.meta, corpus_hash=_subset_hash(self.meta.get("corpus_hash", ""), indices)),
            embeddings=self.embeddings,
        )

    def to(self, device) -> AttentionStore:
        """The same store with the attention on ``device`` (index tensors stay on the CPU)."""
        self.attn_packed = self.attn_packed.to(device)
        return self

    # --- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the store to one safetensors file (tensors bit-exact, the rest as metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "attn_packed": self.attn_packed.detach().cpu().contiguous(),
            "offsets": self.offsets.cpu().contiguous(),
            "lengths": self.lengths.cpu().contiguous(),
            "ids_packed": self.ids_packed.cpu().contiguous(),
        }
        if self.embeddings is not None:
            tensors["embedding_ids"] = torch.from_numpy(self.embeddings.ids)
            tensors["embedding_rows"] = torch.from_numpy(self.embeddings.rows)
        metadata = {
            "format": FORMAT_VERSION,
            "texts": json.dumps(self.texts),
            "tokens": json.dumps(self.tokens),
            "spans": json.dumps(self.spans),
            "splits": json.dumps(self.splits),
            "meta": json.dumps(self.meta),
        }
        if self.embeddings is not None:
            metadata["embeddings_source"] = self.embeddings.source
        tmp = path.with_suffix(path.suffix + ".partial")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)  # never leave a half-written store behind
        return path

    @staticmethod
    def read_meta(path: str | Path) -> dict:
        """The ``meta`` dict of a saved store, without reading its tensors."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return json.loads((handle.metadata() or {}).get("meta", "{}"))
        except (SafetensorError, OSError, ValueError) as err:
            raise StoreError(f"{path} is not a readable attention store ({err})") from err

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> AttentionStore:
        """Read a store written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if path.is_dir():
            raise StoreError(f"{path} is a directory: give the store file in it, e.g. "
                             f"{path / 'attention.safetensors'}")
        if not path.is_file():
            raise StoreError(f"no attention store at {path}: run `attnprog extract` first")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise StoreError(f"{path} is not a readable attention store ({err})") from err
        if metadata.get("format") != FORMAT_VERSION or "attn_packed" not in tensors:
            raise StoreError(f"{path} is not an attnprog attention store (format {metadata.get('format')})")
        return cls(
            attn_packed=tensors["attn_packed"].to(device),
            offsets=tensors["offsets"],
            lengths=tensors["lengths"],
            ids_packed=tensors["ids_packed"],
            texts=json.loads(metadata["texts"]),
            tokens=json.loads(metadata["tokens"]),
            spans=[[tuple(span) for span in spans] for spans in json.loads(metadata["spans"])],
            splits=json.loads(metadata["splits"]),
            meta=json.loads(metadata["meta"]),
            embeddings=_embeddings(tensors, metadata),
        )


def _embeddings(tensors: dict, metadata: dict) -> TokenEmbeddings | None:
    if "embedding_ids" not in tensors:
        return None
    return TokenEmbeddings(tensors["embedding_ids"].numpy(), tensors["embedding_rows"].numpy(),
                           metadata.get("embeddings_source", ""))


def _subset_hash(corpus_hash: str, indices: list[int]) -> str:
    """Corpus hash of a subset: differs for every choice of texts, so caches never mix them."""
    digest = hashlib.sha256(f"{corpus_hash}:{','.join(map(str, indices))}".encode()).hexdigest()
    return digest[:16]


def packed_offsets_tensor(lengths) -> torch.Tensor:
    """``causal_offsets`` as an int64 tensor."""
    return torch.from_numpy(causal_offsets(np.asarray(lengths)))
