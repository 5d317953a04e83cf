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


@app.command()
def replace(
    store: Path = typer.Option(..., help="attention store from `attnprog extract`"),
    table: Path = typer.Option(..., help="IoU table from `attnprog rank` (same store)"),
    fraction: float = typer.Option(
        1.0, help="largest share of heads to replace; the sweep runs the standard fractions "
        "0, 5, 10, 25, 50, 100 % up to it, plus this value when it is not one of them"
    ),
    qa: Path = typer.Option(None, help="multiple-choice JSONL (context/choices/label, HellaSwag, "
                            "PIQA or ARC fields); default: the built-in sample"),
    no_qa: bool = typer.Option(False, "--no-qa", help="skip the QA columns"),
    model: str = typer.Option(None, help="model to run (default: the store's model)"),
    split: str = typer.Option("heldout", help="texts of the store to measure perplexity on"),
    batch_size: int = typer.Option(8),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    seed: int = typer.Option(0, help="seed of the random-program baseline"),
) -> None:
    """Replace heads by their best-fit programs and print the perplexity and QA sweep table."""
    from attnprog.engine.evaluate import fractions_up_to, load_qa, perplexity_sweep
    from attnprog.engine.models import load_model
    from attnprog.engine.rank import IoUTable
    from attnprog.engine.store import AttentionStore

    if not 0.0 <= fraction <= 1.0:
        raise AttnProgError(f"--fraction must be between 0 and 1, got {fraction}")
    attention = AttentionStore.load(store)
    ious = IoUTable.load(table)
    spec = model or str(attention.meta.get("model_id", "")).split("@")[0]
    if not spec:
        raise AttnProgError(f"{store} does not say which model made it: pass --model")
    lm, tokenizer = load_model(spec, device=device)
    items = None if no_qa else load_qa(qa)
    result = perplexity_sweep(
        lm, attention, ious, fractions=fractions_up_to(fraction), split=split,
        qa_items=items, tokenizer=tokenizer, qa_source=str(qa or "built-in sample"),
        seed=seed, batch_size=batch_size,
    )
    typer.echo(result.to_text())


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
