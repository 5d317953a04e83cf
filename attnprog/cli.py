"""The `attnprog` command: options in, engine and synth calls out."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from attnprog.errors import AttnProgError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Explain attention heads with executable programs.",
)


# Commands are added below, one function each; keep them thin.


@app.command()
def models() -> None:
    """List the built-in model names and whether each is ready locally."""
    from attnprog.engine.models import BUILTIN_MODELS, builtin_status

    for name, builtin in BUILTIN_MODELS.items():
        typer.echo(f"{name:14s} {builtin_status(name)}\n{'':14s} {builtin.description}")


@app.command()
def extract(
    model: str = typer.Option("smollm2-135m", help="built-in name, checkpoint dir, .gguf file or hub id"),
    corpus: str = typer.Option("builtin", help="'builtin', a .txt or .jsonl file, or hf:NAME"),
    out: Path = typer.Option(Path("runs/attention.safetensors"), help="where to save the store"),
    text_field: str = typer.Option("text", help="field holding the text in a .jsonl corpus"),
    limit: int = typer.Option(0, help="use only the first N texts (0: all)"),
    max_tokens: int = typer.Option(256, help="truncate texts to this many tokens"),
    batch_size: int = typer.Option(8),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("float32", help="model dtype: float32, float16 or bfloat16"),
    reuse: bool = typer.Option(True, help="reuse --out when it holds the same model and corpus"),
) -> None:
    """Extract every head's attention on a corpus and save the store."""
    import torch

    from attnprog.engine.corpus import load_corpus
    from attnprog.engine.extract import extract_or_load
    from attnprog.engine.models import load_model

    torch_dtype = _dtype(dtype)
    texts = load_corpus(corpus, text_field=text_field)
    if limit:
        texts = texts.take(limit)
    lm, tokenizer = load_model(model, device=device, dtype=torch_dtype)
    store, reused = extract_or_load(
        lm, tokenizer, texts, out, reuse=reuse, batch_size=batch_size, max_tokens=max_tokens
    )
    verb = "reused" if reused else "wrote"
    typer.echo(
        f"{verb} {out}: {store.n_layers} layers x {store.n_heads} heads = {store.n_rows} heads, "
        f"{store.n_texts} texts, {int(store.lengths.sum())} tokens, {store.n_cells} causal cells"
    )


def _dtype(name: str):
    import torch

    from attnprog.errors import AttnProgError

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise AttnProgError(f"unknown dtype {name!r}: use float32, float16 or bfloat16")
    return table[name]


def main() -> None:
    """Console entry point: a user error prints one line, no traceback, and exits 2."""
    try:
        app()
    except AttnProgError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
