"""The `attnprog` command: each command parses its options into one config or call, hands off
to the engine, and prints. Commands are listed in pipeline order, `run` (all of them) first."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from attnprog.engine.run.config import at_least as _at_least
from attnprog.errors import AttnProgError, StoreError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Explain attention heads with executable programs.",
)

ORDER_HELP = ("which heads are replaced first: 'iou' (best fit first), 'cost' (cheapest first by "
              "each head's ΔNLL replaced alone, measured on selection texts) or 'both', side by side")
COST_METHOD_HELP = ("how head costs are measured: 'exact' (a forward pass per head), 'fisher' "
                    "(second-order estimate, all heads at once), 'taylor', 'linear' or 'auto' "
                    "(exact on CUDA, fisher on CPU)")
DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ..."
MODEL_HELP = "built-in name, checkpoint dir, .gguf file or hub id"
CORPUS_HELP = "'builtin', a .txt or .jsonl file, or hf:NAME[:SPLIT]"
HEADS_HELP = "heads as 18.3, 18.* (a layer), *.3 (a head in every layer), comma-separated, or all"


def example(command: str) -> str:
    """The line every command's --help ends with."""
    return f"Example: {command}"


@app.command(epilog=example("attnprog run --out runs/demo"))
def run(
    out: Path = typer.Option(Path("runs/demo"), help="run directory (re-running resumes it)"),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    corpus: str = typer.Option("builtin", help=CORPUS_HELP),
    text_field: str = typer.Option("text", help="field holding the text in a .jsonl corpus"),
    limit: int = typer.Option(0, help="use only the first N texts (0: all)"),
    max_tokens: int = typer.Option(128, help="truncate texts to this many tokens"),
    candidates: int = typer.Option(5000, help="generator programs added to the golden library"),
    fraction: float = typer.Option(1.0, help="largest share of heads replaced in the sweep "
                                   "(0, 5, 10, 25, 50, 75, 100 % up to it)"),
    qa: bool = typer.Option(True, help="score the built-in QA sample in the sweep"),
    order: str = typer.Option("both", help=ORDER_HELP),
    cost_method: str = typer.Option("auto", help=COST_METHOD_HELP),
    batch_size: int = typer.Option(8),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    fit: bool = typer.Option(True, help="fit one program per head (synthesis split) and rank it too"),
    fit_terms: int = typer.Option(12, help="features per fitted program"),
    ray: str = typer.Option("", "--ray", help="evaluate, rank and sweep on a Ray cluster: its "
                            "address (HOST:PORT, ray://HOST:10001) or 'auto' (this machine's)"),
    heads: str = typer.Option("", help=f"heads to explain: {HEADS_HELP} (default: all)"),
    seed: int = typer.Option(0, help="seed of the random baselines"),
    library_size: int = typer.Option(1000, help="most programs in the greedy library"),
    force: str = typer.Option(None, help="redo this stage and every later one: extract, pool, "
                              "llm, fit, evaluate, rank, library, heads, costs, sweep or report"),
    report: bool = typer.Option(True, help="write report.html at the end"),
    llm_base_url: str = typer.Option("", help="LLM stage: OpenAI-compatible endpoint "
                                     "(default $OPENAI_BASE_URL); the key comes from $OPENAI_API_KEY"),
    llm_model: str = typer.Option("", help="LLM stage: model name; setting it turns the stage on"),
    llm_heads: str = typer.Option("all", help=f"LLM stage: {HEADS_HELP}"),
    llm_n: int = typer.Option(4, help="LLM stage: hypotheses per head"),
    llm_rounds: int = typer.Option(1, help="LLM stage: refinement rounds per head"),
    llm_max_tokens_total: int = typer.Option(0, help="LLM stage: token cap (0: none)"),
) -> None:
    """Run the whole pipeline, from extraction to the report; a re-run resumes it.

    Stages: extract, pool, llm (with --llm-model), fit, evaluate, rank, library, heads, costs
    (with the cost order), sweep, report. Each is reused when its inputs did not change.
    """
    from attnprog.engine.run.config import RunConfig
    from attnprog.engine.run.pipeline import run_pipeline

    run_pipeline(RunConfig.from_cli(locals()), echo=typer.echo, force=force)


@app.command(epilog=example("attnprog models"))
def models() -> None:
    """List the built-in model names, whether each is ready locally, and the tested architectures."""
    from attnprog.engine.models import BUILTIN_MODELS, TESTED_ARCHITECTURES, builtin_status

    for name, builtin in BUILTIN_MODELS.items():
        typer.echo(f"{name:14s} {builtin_status(name)}\n{'':14s} {builtin.description}")
    typer.echo("\ntested architectures (config model_type; others load with a warning):")
    for model_type, features in TESTED_ARCHITECTURES.items():
        typer.echo(f"  {model_type:14s} {features}")


@app.command(epilog=example("attnprog extract --model smollm2-135m --limit 20 "
                            "--out runs/attention.safetensors"))
def extract(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    corpus: str = typer.Option("builtin", help=CORPUS_HELP),
    out: Path = typer.Option(Path("runs/attention.safetensors"), help="where to save the store"),
    text_field: str = typer.Option("text", help="field holding the text in a .jsonl corpus"),
    limit: int = typer.Option(0, help="use only the first N texts (0: all)"),
    max_tokens: int = typer.Option(256, help="truncate texts to this many tokens"),
    batch_size: int = typer.Option(8),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help="model dtype: float32, float16 or bfloat16"),
    reuse: bool = typer.Option(True, help="reuse --out when it holds the same model and corpus"),
) -> None:
    """Extract every head's attention on a corpus and save the store."""
    from attnprog.engine.corpus import load_corpus
    from attnprog.engine.extract import extract_or_load
    from attnprog.engine.models import load_model

    _out_file(out, "attention.safetensors")
    _at_least(0, limit=limit)
    _at_least(1, batch_size=batch_size)
    _at_least(2, max_tokens=max_tokens)  # a negative count would cut tokens off each text
    texts = load_corpus(corpus, text_field=text_field)
    texts = texts.take(limit) if limit else texts
    lm, tokenizer = load_model(model, device=device, dtype=_dtype(dtype))
    store, reused = extract_or_load(lm, tokenizer, texts, out, reuse=reuse,
                                    batch_size=batch_size, max_tokens=max_tokens)
    typer.echo(
        f"{'reused' if reused else 'wrote'} {out}: {store.n_layers} layers x {store.n_heads} heads "
        f"= {store.n_rows} heads, {store.n_texts} texts, {int(store.lengths.sum())} tokens, "
        f"{store.n_cells} causal cells"
    )


@app.command(epilog=example("attnprog generate --candidates 2000 --out runs/pool.jsonl"))
def generate(
    out: Path = typer.Option(Path("runs/pool.jsonl"), help="where to write the pool (JSON lines)"),
    candidates: int = typer.Option(5000, help="distinct generator programs (0: golden library only)"),
    golden: bool = typer.Option(True, help="include the hand-written golden library"),
) -> None:
    """Write a program pool: the golden library plus the built-in generator's candidates."""
    from attnprog.engine.pool import build_pool
    from attnprog.synth.program import save_pool

    _out_file(out, "pool.jsonl")
    _at_least(0, candidates=candidates)
    if not candidates and not golden:
        raise AttnProgError("--candidates 0 with --no-golden leaves an empty pool: ask for some "
                            "candidates or keep the golden library")
    pool = build_pool(candidates, golden=golden)
    save_pool(pool, out)
    typer.echo(f"wrote {out}: {len(pool)} programs in {len({p.family for p in pool})} families")


def _check_model(spec: str):
    """(tokenizer, probe sentences) for ``check --model``; (None, None) for the stand-in."""
    from attnprog.engine.models import DEFAULT_MODEL, builtin_status

    if spec == "auto":
        spec = DEFAULT_MODEL if builtin_status(DEFAULT_MODEL) == "ready" else "none"
    if spec == "none":
        return None, None
    from attnprog.engine.extract import model_probes
    from attnprog.engine.models import load_model

    lm, tokenizer = load_model(spec)
    return tokenizer, model_probes(lm, tokenizer)


@app.command(epilog=example("attnprog check my_program.py"))
def check(
    path: Path = typer.Argument(..., help="a .py file: one program, or a library in the paper's layout"),
    name: str = typer.Option("", help="entry point (default: inferred)"),
    unsafe: bool = typer.Option(False, help="run without OS isolation where it is unavailable"),
    model: str = typer.Option("auto", help="whose tokenizer and input embeddings paper-form "
                              "programs get: a model (as for run), 'auto' (the built-in "
                              "smollm2-135m when it is ready) or 'none' (a stand-in tokenizer "
                              "that knows only the probe texts, and one-hot stand-in embeddings: "
                              "a token is similar only to its own copies)"),
) -> None:
    """Validate programs in the sandbox and say what is wrong with each, if anything."""
    from attnprog.errors import ProgramError
    from attnprog.synth.runtime.validate import check_file

    results = check_file(path, name=name or None, unsafe=unsafe,
                         model=lambda: _check_model(model))  # loaded only if a program runs
    if len(results) == 1:
        program_name, reason = results[0]
        if reason:
            raise ProgramError(f"{path}: {reason}")
        typer.echo(f"{path}: ok ({program_name})")
        return
    for program_name, reason in results:
        typer.echo(f"{path}:{program_name}: {reason or 'ok'}")
    failed = sum(bool(reason) for _, reason in results)
    typer.echo(f"{len(results) - failed} of {len(results)} programs pass")
    if failed:
        raise ProgramError(f"{path}: {failed} of {len(results)} programs failed the check")


@app.command(epilog=example("attnprog serve --model smollm2-135m --port 8000"))
def serve(
    model: str = typer.Option("smollm2-135m", help="built-in name or checkpoint directory"),
    port: int = typer.Option(8000, help="port on 127.0.0.1 (0: any free one)"),
) -> None:
    """Serve a model offline on loopback with `transformers serve`, for `synthesize --base-url`."""
    import signal
    import time

    from attnprog.engine.models import BUILTIN_MODELS, builtin_checkpoint
    from attnprog.synth.llm.server import local_server

    if not 0 <= port <= 65535:
        raise AttnProgError(f"--port {port} is not a TCP port: use 1 to 65535, or 0 for any free one")
    if model in BUILTIN_MODELS and BUILTIN_MODELS[model].package is None:
        raise AttnProgError(f"{model} is built in memory with random weights and has no "
                            "checkpoint to serve: serve smollm2-135m or a checkpoint directory")
    checkpoint = builtin_checkpoint(model) if model in BUILTIN_MODELS else Path(model).expanduser()
    if not checkpoint.is_dir() or not (checkpoint / "config.json").is_file():
        raise AttnProgError(f"{checkpoint} is not a checkpoint directory (no config.json): serve "
                            f"a built-in model ({', '.join(BUILTIN_MODELS)}) or a directory "
                            "with config.json")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the server too
    typer.echo(f"starting transformers serve for {checkpoint} ...")
    with local_server(checkpoint, port=port) as (base_url, name):
        typer.echo(f"serving at {base_url}\n  --base-url {base_url} --model {name}\n(Ctrl-C stops it)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@app.command(epilog=example(  # the model name `attnprog serve` (running) prints: its checkpoint path
    "attnprog synthesize --store runs/attention.safetensors --heads 18.7 "
    "--base-url http://127.0.0.1:8000/v1 --model \"$(python -c 'from attnprog.engine.models "
    "import builtin_checkpoint as b; print(b(\"smollm2-135m\"))')\""))
def synthesize(
    store: Path = typer.Option(..., help="attention store from `attnprog extract`"),
    heads: str = typer.Option(..., help=HEADS_HELP),
    model: str = typer.Option(..., help="model name the endpoint serves"),
    base_url: str = typer.Option("", help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, "
                                 "else OpenAI)"),
    api_key: str = typer.Option("", help="API key (default: $OPENAI_API_KEY; local servers need none)"),
    out: Path = typer.Option(Path("runs/pool.jsonl"), help="pool to add the programs to (created "
                             "when missing); the report goes beside it as .llm.json"),
    n: int = typer.Option(4, help="hypotheses asked for per head"),
    rounds: int = typer.Option(1, help="refinement rounds per head"),
    attempts: int = typer.Option(3, help="tries per hypothesis (re-prompted with the failure)"),
    texts: int = typer.Option(4, help="synthesis texts summarised in the prompt"),
    summary: str = typer.Option("stratified", help="summary format: stratified or top"),
    summary_tokens: int = typer.Option(1500, help="size budget of the summary, in tokens"),
    temperature: float = typer.Option(0.0),
    max_tokens: int = typer.Option(1024, help="token limit of one reply"),
    max_tokens_total: int = typer.Option(0, help="stop sending requests once this many tokens "
                                         "(prompt + reply) are spent (0: no cap)"),
    concurrency: int = typer.Option(4, help="requests in flight at once"),
    timeout: float = typer.Option(600.0, help="seconds to wait for one reply (a timed-out request "
                                  "is retried from the start)"),
    cache_dir: str = typer.Option("", help="reply cache (default: $ATTNPROG_CACHE_DIR/llm or "
                                  "~/.cache/attnprog/llm)"),
    print_prompt: bool = typer.Option(False, "--print-prompt",
                                      help="print the first head's prompt and send nothing"),
) -> None:
    """Ask an LLM for programs explaining heads; add the valid ones to a pool."""
    from attnprog.engine.store import AttentionStore
    from attnprog.engine.synthesis import head_pairs, head_tasks, synthesize_into_pool
    from attnprog.synth.llm.client import LLMSettings
    from attnprog.synth.llm.synthesiser import SynthesisOptions, head_prompt

    _out_file(out, "pool.jsonl")
    _at_least(1, n=n, attempts=attempts, texts=texts, summary_tokens=summary_tokens,
              max_tokens=max_tokens, concurrency=concurrency)
    _at_least(0, rounds=rounds, max_tokens_total=max_tokens_total)
    if base_url and not base_url.startswith(("http://", "https://")):  # else 5 retries, then "unreachable"
        raise AttnProgError(f"--base-url {base_url!r} is not an http(s) URL: e.g. "
                            "http://127.0.0.1:8000/v1")
    attention = AttentionStore.load(store)
    chosen = head_pairs(heads, attention)
    settings = LLMSettings(model=model, base_url=base_url, api_key=api_key, temperature=temperature,
                           max_tokens=max_tokens, max_tokens_total=max_tokens_total,
                           concurrency=concurrency, timeout=timeout, cache_dir=cache_dir)
    options = SynthesisOptions(n=n, rounds=rounds, attempts=attempts, summary_format=summary,
                               summary_tokens=summary_tokens)
    if print_prompt:
        for message in head_prompt(head_tasks(attention, chosen[:1], texts)[0], options):
            typer.echo(f"--- {message['role']} ---\n{message['content']}\n")
        return
    added, report = synthesize_into_pool(attention, chosen, settings, options, out, n_texts=texts)
    _print_synthesis(chosen, added, report, out)


def _print_synthesis(chosen, added, report, out: Path) -> None:
    from attnprog.engine.synthesis import report_path

    usage = report.usage
    failed = sum(1 for h in report.heads for c in h["candidates"] if not c["ok"])
    typer.echo(f"{len(chosen)} heads: {len(added)} new programs added to {out}; {failed} failed "
               f"attempts recorded in {report_path(out)}")
    typer.echo(f"requests sent {usage['requests']}, served from cache {usage['cache_hits']}, "
               f"retries {usage['retries']}; tokens {usage['prompt_tokens']} prompt + "
               f"{usage['completion_tokens']} completion = {usage['total_tokens']}")
    for head in report.heads:
        if head["error"]:
            typer.echo(f"  {head['label']}: stopped early: {head['error']}")


@app.command("rank", epilog=example("attnprog rank --store runs/attention.safetensors "
                                    "--pool runs/pool.jsonl --out runs/iou_table.safetensors"))
def rank_command(
    store: Path = typer.Option(..., help="attention store written by `attnprog extract`"),
    pool: Path = typer.Option(None, help="program pool (.jsonl) to evaluate on the store's texts"),
    outputs: Path = typer.Option(None, help="program outputs (.safetensors) instead of --pool"),
    out: Path = typer.Option(Path("runs/iou_table.safetensors"), help="where to write the table"),
    split: str = typer.Option("selection", help="split that picks each head's best fit"),
    heldout: str = typer.Option("heldout", help="split the best fits are measured on ('' skips)"),
    top: int = typer.Option(10, help="print this many heads, best fits first"),
    per_text: bool = typer.Option(False, help="also keep per-text IoU in the table"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    impl: str = typer.Option("auto", help="sum-min path: auto, triton, numba or torch"),
    memory_mb: int = typer.Option(512, help="working memory per program chunk, MiB"),
    ray: str = typer.Option("", "--ray", help="evaluate and rank on a Ray cluster, heads sharded "
                            "over its GPUs: its address (HOST:PORT, ray://HOST:10001) or 'auto' "
                            "(this machine's)"),
) -> None:
    """Score every program against every head; write the IoU table and print best fits."""
    import time

    from attnprog.engine.pool import rank_table
    from attnprog.kernels.iou import IMPLS

    if (pool is None) == (outputs is None):
        raise AttnProgError("pass exactly one of --pool (programs to evaluate) or --outputs")
    _out_file(out, "iou_table.safetensors")
    if out.resolve() in {p.resolve() for p in (store, pool, outputs) if p is not None}:
        raise StoreError(f"--out {out} is one of the inputs and would be overwritten: give the "
                         "table its own file, e.g. iou_table.safetensors")
    _at_least(0, top=top)
    if impl not in IMPLS:  # checked before the evaluation
        raise AttnProgError(f"unknown --impl {impl!r}: use {', '.join(IMPLS[:-1])} or {IMPLS[-1]}")
    if impl == "triton" and not ray:  # a cluster's nodes may have the GPU this one lacks
        from attnprog.engine.models import resolve_device
        from attnprog.kernels.iou import triton_unavailable

        why = triton_unavailable(resolve_device(device))
        if why:
            raise AttnProgError(f"--impl triton: {why}: use --impl auto, numba or torch")
    _connect(ray)  # reach the cluster before reading a large store
    attention, program_outputs = _store_and_outputs(store, pool, outputs, split, heldout, device, ray)
    start = time.perf_counter()
    table = rank_table(attention, program_outputs, split=split, heldout=heldout, per_text=per_text,
                       impl=impl, memory_budget=memory_mb << 20, progress=True, ray=ray)
    seconds = time.perf_counter() - start
    table.save(out)
    n_failed = int(program_outputs.failed.all(axis=1).sum())
    typer.echo(f"ranked {table.n_programs} programs x {table.iou.shape[1]} heads on the {split} "
               f"split in {seconds:.1f} s ({table.meta['impl']}); {n_failed} programs failed on "
               f"every text; wrote {out}")
    _print_best_fits(table, top, split, heldout)


def _store_and_outputs(store: Path, pool, outputs, split: str, heldout: str, device: str, ray: str):
    """The store (on ``device``) and the program outputs ``rank`` scores it against."""
    import warnings

    from attnprog.engine.models import resolve_device
    from attnprog.engine.pool import evaluate_pool, ranking_subset, store_tokenizer
    from attnprog.engine.store import AttentionStore
    from attnprog.synth.program import load_pool
    from attnprog.synth.runtime.outputs import ProgramOutputs

    attention = AttentionStore.load(store, device=resolve_device(device))
    if heldout and heldout not in attention.splits:
        if heldout != "heldout":  # the default: a store without held-out texts ranks without
            raise StoreError(f"no texts in split {heldout!r}; the store has "
                             f"{sorted(set(attention.splits))}: pass one of them or --heldout ''")
        typer.echo(f"{store} has no held-out texts: best fits are measured on {split} only")
    if outputs is not None:
        program_outputs = ProgramOutputs.load(outputs)
        # outputs may cover every text of the store or only the ranked splits
        if len(program_outputs.offsets) != attention.n_texts + 1:
            attention = ranking_subset(attention, split, heldout)
        return attention, program_outputs
    attention = ranking_subset(attention, split, heldout)
    programs = load_pool(pool)
    made_by = attention.meta.get("model_id", "")
    others = {p.provenance.get("model_id") for p in programs} - {made_by, "", None}
    if made_by and others:  # their weights were fitted to other heads and other embeddings
        warnings.warn(f"{pool} holds programs fitted to another model ({', '.join(sorted(others))}), "
                      f"not to this store's {made_by}: they are ranked as they are, not refitted",
                      stacklevel=2)
    typer.echo(f"evaluating {len(programs)} programs on {attention.n_texts} texts")
    tokenizer = store_tokenizer(attention, programs)  # paper-form programs get the model's
    return attention, evaluate_pool(attention, programs, ray=ray, tokenizer=tokenizer)


def _print_best_fits(table, top: int, split: str, heldout: str) -> None:
    """The best-fitting heads, then the best head of each program family."""
    from attnprog.engine.heads import head_label

    fits = sorted(table.best_fits(), key=lambda fit: -fit.reported_iou)
    held = f"IoU {heldout}" if table.heldout_iou is not None else ""
    header = f"{'head':>7}  {'IoU ' + split:>14}  {held:>12}  program (#index family: name)"

    def line(fit) -> str:
        held_iou = "" if fit.heldout_iou is None else f"{fit.heldout_iou:.3f}"
        label = head_label(fit.layer * table.n_heads + fit.head, table.n_heads)
        return (f"{label:>7}  {fit.iou:>14.3f}  {held_iou:>12}  "
                f"#{fit.program_index} {fit.family}: {fit.title}")

    typer.echo(f"\nthe {min(top, len(fits))} heads with the best fits\n{header}")
    for fit in fits[:top]:
        typer.echo(line(fit))
    families = {}
    for fit in fits:  # fits are sorted, so the first head seen per family is its best
        families.setdefault(fit.family, fit)
    typer.echo(f"\nthe best head for each program family (among heads it fits best)\n{header}")
    for fit in families.values():
        typer.echo(line(fit))


@app.command(epilog=example("attnprog show --table runs/demo 18.3"))
def show(
    table: Path = typer.Option(..., help="IoU table from `attnprog rank`, or a run directory "
                               "(its iou_table.safetensors and heads.json)"),
    head: str = typer.Argument(..., help="one head: LAYER.HEAD (e.g. 18.3) or L18.H3"),
    top: int = typer.Option(3, help="how many of the head's best programs to print"),
) -> None:
    """Print a head's best programs, with their IoU, by name and as readable source.

    With heads.json beside the table (a run directory), also the head's type and the shortest
    program that fits."""
    from attnprog.engine.run.show import show_head

    _at_least(1, top=top)
    typer.echo(show_head(table, head, top))


@app.command(epilog=example("attnprog replace --store runs/demo/attention.safetensors "
                            "--table runs/demo/iou_table.safetensors --fraction 0.25"))
def replace(
    store: Path = typer.Option(..., help="attention store from `attnprog extract`"),
    table: Path = typer.Option(..., help="IoU table from `attnprog rank` (same store)"),
    fraction: float = typer.Option(
        1.0, help="largest share of heads to replace; the sweep runs the standard fractions "
        "0, 5, 10, 25, 50, 75, 100 % up to it, plus this value when it is not one of them"
    ),
    qa: Path = typer.Option(None, help="multiple-choice JSONL (context/choices/label, HellaSwag, "
                            "PIQA or ARC fields); default: the built-in sample"),
    no_qa: bool = typer.Option(False, "--no-qa", help="skip the QA columns"),
    model: str = typer.Option(None, help="model to run (default: the store's model)"),
    split: str = typer.Option("heldout", help="texts of the store to measure perplexity on"),
    batch_size: int = typer.Option(8),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    seed: int = typer.Option(0, help="seed of the random-program control (seeds SEED, SEED+1, ...)"),
    random_seeds: int = typer.Option(3, help="random-program draws per row; the mean is shown"),
    order: str = typer.Option("both", help=ORDER_HELP),
    cost_method: str = typer.Option("auto", help=COST_METHOD_HELP),
) -> None:
    """Replace heads by their best-fit programs and by controls; print what the model loses.

    Controls: uniform, random program, zero and mean ablation. Printed: perplexity with
    intervals, KL, the replaceable share and QA accuracy."""
    from attnprog.engine.head_costs import check_method
    from attnprog.engine.models import load_model, spec_of_id
    from attnprog.engine.qa import load_qa
    from attnprog.engine.rank import IoUTable
    from attnprog.engine.store import AttentionStore
    from attnprog.engine.sweep import fractions_up_to, orders_from_option, perplexity_sweep

    orders, fractions = orders_from_option(order), fractions_up_to(fraction)
    _at_least(1, batch_size=batch_size, random_seeds=random_seeds)
    check_method(cost_method)
    attention, ious = AttentionStore.load(store), IoUTable.load(table)
    attention.split_indices(split)  # an unknown split is refused before the model loads
    spec = model or spec_of_id(str(attention.meta.get("model_id", "")))
    if not spec:
        raise AttnProgError(f"{store} does not say which model made it: pass --model")
    lm, tokenizer = load_model(spec, device=device)
    result = perplexity_sweep(
        lm, attention, ious, fractions=fractions, split=split, orders=orders,
        cost_method=cost_method, qa_items=None if no_qa else load_qa(qa), tokenizer=tokenizer,
        qa_source=str(qa or "built-in sample"), seed=seed, random_seeds=random_seeds,
        batch_size=batch_size,
    )
    typer.echo(result.to_text())


@app.command("surrogate", epilog=example(
    'attnprog surrogate runs/demo --prompt "Once upon a time" --max-new-tokens 20'))
def surrogate_command(
    run_dir: Path = typer.Argument(..., help="a run directory written by `attnprog run`"),
    prompt: str = typer.Option("", help="text to continue (greedy), with and without replacement"),
    max_new_tokens: int = typer.Option(20, help="tokens to generate"),
    fraction: float = typer.Option(0.25, help="share of heads replaced, as in the sweep"),
    order: str = typer.Option("cost", help="'cost' (cheapest first) or 'iou' (best fit first)"),
    score: Path = typer.Option(None, help="a text file: perplexity of its lines with and "
                               "without replacement"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    batch_size: int = typer.Option(8),
) -> None:
    """Run the model with a run's heads replaced by their programs, on new text.

    Generates a continuation beside the unmodified model's, or scores a file's lines."""
    from attnprog.engine.run.surrogate_command import SurrogateConfig, run_surrogate

    config = SurrogateConfig(run=run_dir, prompt=prompt, max_new_tokens=max_new_tokens,
                             fraction=fraction, order=order, score=score, device=device,
                             batch_size=batch_size)
    if not prompt and score is None:
        raise AttnProgError("nothing to do: give --prompt TEXT, --score FILE or both")
    _at_least(0, max_new_tokens=max_new_tokens)
    _at_least(1, batch_size=batch_size)
    run_surrogate(config, echo=typer.echo)


@app.command("report", epilog=example("attnprog report runs/demo"))
def report_command(
    run_dir: Path = typer.Argument(..., help="a run directory written by `attnprog run`"),
    out: Path = typer.Option(None, help="where to write the page (default: RUN_DIR/report.html)"),
    texts: int = typer.Option(5, help="held-out texts in the attention viewer"),
    tokens: int = typer.Option(48, help="tokens shown per held-out text (the first ones)"),
) -> None:
    """Rebuild a run's self-contained HTML report (summary, IoU grid, curves, every head)."""
    from attnprog.engine.run.report import write_report

    _at_least(0, texts=texts)
    _at_least(1, tokens=tokens)
    path = write_report(run_dir, out=out and _out_file(out, "report.html"), texts=texts, tokens=tokens)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("bench", epilog=example("attnprog bench --full"))
def bench_command(
    device: str = typer.Option("auto", help=DEVICE_HELP),
    full: bool = typer.Option(False, help="all 9 shapes P x H instead of 3"),
    texts: int = typer.Option(0, help="texts of 64 tokens per shape (0: 32 on GPU, 4 on CPU)"),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16 inputs"),
    override: bool = typer.Option(True, help="also time the override kernel per layer (GPU)"),
) -> None:
    """Time the ranking kernel against torch broadcasting and the authors' numpy loop.

    On a GPU, also the head-replacement kernel per layer against SDPA and eager attention."""
    import torch

    from attnprog.engine.models import resolve_device
    from attnprog.kernels.bench import run_override_bench, run_rank_bench

    device = resolve_device(device)
    _at_least(0, texts=texts)
    run_rank_bench(device, quick=not full, n_texts=texts or None, dtype=_dtype(dtype))
    if override and device.startswith("cuda"):  # on a CPU both paths are SDPA plus a matmul
        half = _dtype(dtype) if _dtype(dtype) != torch.float32 else torch.float16
        run_override_bench(device, dtype=half)


def _out_file(path: Path, name: str) -> Path:
    """``path`` when a file can be written there: a directory (or a file where a folder must
    be) is refused before any work, not with a traceback once the result is ready."""
    if path.is_dir():
        raise StoreError(f"--out {path} is a directory: give a file path, e.g. {path / name}")
    folder = next((parent for parent in path.parents if parent.exists()), None)
    if folder is not None and not folder.is_dir():
        raise StoreError(f"--out {path}: {folder} is a file, not a folder: choose another path")
    return path


def _connect(ray: str) -> None:
    if ray:
        from attnprog.engine.distributed.cluster import connect, describe

        connect(ray)
        typer.echo(describe())


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise AttnProgError(f"unknown dtype {name!r}: use float32, float16 or bfloat16")
    return table[name]


def _unwrap_help() -> None:
    """Each command's help from its docstring with the source's line breaks joined: typer
    keeps single breaks after the first paragraph, which ragged the wrapped text."""
    import inspect

    for info in app.registered_commands:
        doc = inspect.getdoc(info.callback) or ""
        info.help = info.help or "\n\n".join(" ".join(p.split()) for p in doc.split("\n\n"))


_unwrap_help()


def main() -> None:
    """Console entry point: a user error prints one line, no traceback, and exits 2."""
    import warnings

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        app()
    except AttnProgError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # `python -m attnprog.cli` as well as the `attnprog` script
    main()
