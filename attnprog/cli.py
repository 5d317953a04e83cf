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

ORDER_HELP = ("which heads are replaced first: 'iou' (best fit first), 'cost' (cheapest first by "
              "each head's ΔNLL replaced alone, measured on selection texts) or 'both', side by side")
COST_METHOD_HELP = ("how head costs are measured: 'exact' (a forward pass per head), 'fisher' "
                    "(second-order estimate, all heads at once), 'taylor', 'linear' or 'auto' "
                    "(exact on CUDA, fisher on CPU)")


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
    order: str = typer.Option("both", help=ORDER_HELP),
    cost_method: str = typer.Option("auto", help=COST_METHOD_HELP),
) -> None:
    """Replace heads by their best-fit programs and print the perplexity and QA sweep table."""
    from attnprog.engine.models import load_model
    from attnprog.engine.rank import IoUTable
    from attnprog.engine.store import AttentionStore
    from attnprog.engine.sweep import (
        fractions_up_to,
        load_qa,
        orders_from_option,
        perplexity_sweep,
    )

    orders = orders_from_option(order)
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
        orders=orders, cost_method=cost_method,
        qa_items=items, tokenizer=tokenizer, qa_source=str(qa or "built-in sample"),
        seed=seed, batch_size=batch_size,
    )
    typer.echo(result.to_text())


@app.command()
def generate(
    out: Path = typer.Option(Path("runs/pool.jsonl"), help="where to write the pool (JSON lines)"),
    candidates: int = typer.Option(5000, help="distinct generator programs (0: golden library only)"),
    golden: bool = typer.Option(True, help="include the hand-written golden library"),
) -> None:
    """Write a program pool: the golden library plus the built-in generator's candidates."""
    from attnprog.engine.pipeline import build_pool
    from attnprog.synth.program import save_pool

    pool = build_pool(candidates, golden=golden)
    save_pool(pool, out)
    families = len({p.family for p in pool})
    typer.echo(f"wrote {out}: {len(pool)} programs in {families} families")


@app.command()
def check(
    path: Path = typer.Argument(..., help="a .py file: one program, or a library in the paper's layout"),
    name: str = typer.Option("", help="entry point (default: inferred)"),
    unsafe: bool = typer.Option(False, help="run without OS isolation where it is unavailable"),
) -> None:
    """Validate programs in the sandbox and say what is wrong with each, if anything."""
    from attnprog.errors import ProgramError
    from attnprog.synth.program import check_file

    results = check_file(path, name=name or None, unsafe=unsafe)
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


@app.command()
def synthesize(
    store: Path = typer.Option(..., help="attention store from `attnprog extract`"),
    heads: str = typer.Option(..., help="LAYER.HEAD list, e.g. 18.7,20.3, or all"),
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
    from attnprog.engine.synthesis import head_tasks, parse_heads, report_path, synthesize_into_pool
    from attnprog.synth.llm.client import LLMSettings
    from attnprog.synth.llm.synthesiser import SynthesisOptions, head_prompt

    attention = AttentionStore.load(store)
    chosen = parse_heads(heads, attention)
    settings = LLMSettings(model=model, base_url=base_url, api_key=api_key, temperature=temperature,
                           max_tokens=max_tokens, max_tokens_total=max_tokens_total,
                           concurrency=concurrency, timeout=timeout, cache_dir=cache_dir)
    options = SynthesisOptions(n=n, rounds=rounds, attempts=attempts, summary_format=summary,
                               summary_tokens=summary_tokens)
    if print_prompt:
        task = head_tasks(attention, chosen[:1], texts)[0]
        for message in head_prompt(task, options):
            typer.echo(f"--- {message['role']} ---\n{message['content']}\n")
        return
    added, report = synthesize_into_pool(attention, chosen, settings, options, out, n_texts=texts)
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


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", help="built-in name or checkpoint directory"),
    port: int = typer.Option(8000, help="port on 127.0.0.1 (0: any free one)"),
) -> None:
    """Serve a model offline on loopback with `transformers serve`, for `synthesize --base-url`."""
    import signal
    import time

    from attnprog.engine.llm_server import local_server
    from attnprog.engine.models import BUILTIN_MODELS, builtin_checkpoint

    checkpoint = builtin_checkpoint(model) if model in BUILTIN_MODELS else Path(model).expanduser()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the server too
    typer.echo(f"starting transformers serve for {checkpoint} ...")
    with local_server(checkpoint, port=port) as (base_url, name):
        typer.echo(f"serving at {base_url}\n  --base-url {base_url} --model {name}\n(Ctrl-C stops it)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@app.command()
def show(
    table: Path = typer.Option(..., help="IoU table from `attnprog rank` or `attnprog run`"),
    head: str = typer.Argument(..., help="LAYER.HEAD, e.g. 18.8"),
    top: int = typer.Option(3, help="how many of the head's best programs to print"),
) -> None:
    """Print a head's best programs, with their IoU, as readable source."""
    from attnprog.engine.rank import IoUTable

    layer, _, head_index = head.partition(".")
    if not (layer.isdigit() and head_index.isdigit()):
        raise AttnProgError(f"head {head!r} is not LAYER.HEAD, e.g. 18.8")
    ious = IoUTable.load(table)
    layer_no, head_no = int(layer), int(head_index)
    if layer_no >= ious.n_layers or head_no >= ious.n_heads:
        raise AttnProgError(f"the model has {ious.n_layers} layers x {ious.n_heads} heads; "
                            f"L{layer_no} H{head_no} is out of range")
    column = layer_no * ious.n_heads + head_no
    values, indices = ious.topk(top)
    for rank_no, (iou, index) in enumerate(zip(values[column].tolist(), indices[column].tolist()), 1):
        program = ious.programs[index]
        typer.echo(f"# {rank_no}. L{layer_no} H{head_no}: IoU {iou:.3f} on {ious.split}, "
                   f"family {program.family}, hash {program.hash}")
        if program.provenance.get("generator") == "llm":
            typer.echo("# provenance: " + ", ".join(
                f"{key} {program.provenance.get(key)}" for key in
                ("model", "request_id", "round", "parent", "head") if key in program.provenance))
        typer.echo(program.source.rstrip() + "\n")


@app.command()
def run(
    out: Path = typer.Option(Path("runs/demo"), help="run directory (re-running resumes it)"),
    model: str = typer.Option("smollm2-135m", help="built-in name, checkpoint dir, .gguf file or hub id"),
    corpus: str = typer.Option("builtin", help="'builtin', a .txt or .jsonl file, or hf:NAME"),
    text_field: str = typer.Option("text", help="field holding the text in a .jsonl corpus"),
    limit: int = typer.Option(0, help="use only the first N texts (0: all)"),
    max_tokens: int = typer.Option(128, help="truncate texts to this many tokens"),
    candidates: int = typer.Option(5000, help="generator programs added to the golden library"),
    fraction: float = typer.Option(0.25, help="largest share of heads replaced in the sweep"),
    qa: bool = typer.Option(True, help="score the built-in QA sample in the sweep"),
    order: str = typer.Option("both", help=ORDER_HELP),
    cost_method: str = typer.Option("auto", help=COST_METHOD_HELP),
    batch_size: int = typer.Option(8),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    fit: bool = typer.Option(True, help="fit one program per head (synthesis split) and rank it too"),
    fit_terms: int = typer.Option(12, help="features per fitted program"),
    ray: str = typer.Option("", "--ray", help="evaluate, rank and sweep on a Ray cluster: its "
                            "address (HOST:PORT, ray://HOST:10001) or 'auto' (this machine's)"),
    heads: str = typer.Option("", help="heads to explain, e.g. '18.*,20.3' (default: all)"),
    seed: int = typer.Option(0, help="seed of the random baselines"),
    library_size: int = typer.Option(1000, help="most programs in the greedy library"),
    force: str = typer.Option(None, help="redo this stage and every later one: extract, pool, "
                              "evaluate, rank, library, sweep or report"),
    report: bool = typer.Option(True, help="write report.html at the end"),
    llm_base_url: str = typer.Option("", help="LLM stage: OpenAI-compatible endpoint "
                                     "(default $OPENAI_BASE_URL); the key comes from $OPENAI_API_KEY"),
    llm_model: str = typer.Option("", help="LLM stage: model name; setting it turns the stage on"),
    llm_heads: str = typer.Option("all", help="LLM stage: heads to synthesise for (18.7,20.3 or all)"),
    llm_n: int = typer.Option(4, help="LLM stage: hypotheses per head"),
    llm_rounds: int = typer.Option(1, help="LLM stage: refinement rounds per head"),
    llm_max_tokens_total: int = typer.Option(0, help="LLM stage: token cap (0: none)"),
) -> None:
    """Run the whole pipeline: extract, generate, evaluate, rank, select a library, replace
    heads, write the report."""
    from attnprog.engine.pipeline import RunConfig, run_pipeline

    run_pipeline(RunConfig(
        out=str(out), model=model, corpus=corpus, text_field=text_field, limit=limit,
        max_tokens=max_tokens, n_candidates=candidates, fraction=fraction, qa=qa,
        order=order, cost_method=cost_method, batch_size=batch_size, device=device, ray=ray,
        heads=heads, seed=seed,
        library_size=library_size, report=report, llm_base_url=llm_base_url,
        llm_model=llm_model, llm_heads=llm_heads, llm_n=llm_n, llm_rounds=llm_rounds,
        llm_max_tokens_total=llm_max_tokens_total, fit=fit, fit_terms=fit_terms,
    ), echo=typer.echo, force=force)


@app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="a run directory written by `attnprog run`"),
    out: Path = typer.Option(None, help="where to write the page (default: RUN_DIR/report.html)"),
    texts: int = typer.Option(2, help="held-out texts drawn per head"),
    tokens: int = typer.Option(24, help="tokens per heatmap axis"),
) -> None:
    """Rebuild a run's self-contained HTML report (summary, IoU grid, curves, every head)."""
    from attnprog.engine.report import write_report

    path = write_report(run_dir, out=out, texts=texts, tokens=tokens)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("rank")
def rank_command(
    store: Path = typer.Option(..., help="attention store written by `attnprog extract`"),
    pool: Path = typer.Option(None, help="program pool (.jsonl) to evaluate on the store's texts"),
    outputs: Path = typer.Option(None, help="program outputs (.safetensors) instead of --pool"),
    out: Path = typer.Option(Path("runs/iou_table.safetensors"), help="where to write the table"),
    split: str = typer.Option("selection", help="split that picks each head's best fit"),
    heldout: str = typer.Option("heldout", help="split the best fits are measured on ('' skips)"),
    top: int = typer.Option(10, help="print this many heads, best fits first"),
    per_text: bool = typer.Option(False, help="also keep per-text IoU in the table"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    impl: str = typer.Option("auto", help="sum-min path: auto, triton, numba or torch"),
    memory_mb: int = typer.Option(512, help="working memory per program chunk, MiB"),
    ray: str = typer.Option("", "--ray", help="evaluate and rank on a Ray cluster, heads sharded "
                            "over its GPUs: its address (HOST:PORT) or 'auto' (this machine's)"),
) -> None:
    """Score every program against every head; write the IoU table and print best fits."""
    import time

    import torch

    from attnprog.engine.pipeline import evaluate_pool, rank_table, ranking_subset
    from attnprog.engine.store import AttentionStore
    from attnprog.synth.program import load_pool
    from attnprog.synth.runtime.outputs import ProgramOutputs

    if (pool is None) == (outputs is None):
        raise AttnProgError("pass exactly one of --pool (programs to evaluate) or --outputs")
    if ray:  # reach the cluster before reading a large store
        from attnprog.engine.distributed.cluster import connect, describe

        connect(ray)
        typer.echo(describe())
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    attention = AttentionStore.load(store, device=device)
    if outputs is not None:
        program_outputs = ProgramOutputs.load(outputs)
        # outputs may cover every text of the store or only the ranked splits
        if len(program_outputs.offsets) != attention.n_texts + 1:
            attention = ranking_subset(attention, split, heldout)
    else:
        attention = ranking_subset(attention, split, heldout)
        programs = load_pool(pool)
        typer.echo(f"evaluating {len(programs)} programs on {attention.n_texts} texts")
        program_outputs = evaluate_pool(attention, programs, ray=ray)

    start = time.perf_counter()
    table = rank_table(attention, program_outputs, split=split, heldout=heldout, per_text=per_text,
                       impl=impl, memory_budget=memory_mb << 20, progress=True, ray=ray)
    seconds = time.perf_counter() - start
    table.save(out)
    n_failed = int(program_outputs.failed.all(axis=1).sum())
    typer.echo(
        f"ranked {table.n_programs} programs x {table.iou.shape[1]} heads on the {split} split "
        f"in {seconds:.1f} s ({table.meta['impl']}); {n_failed} programs failed on every text; "
        f"wrote {out}"
    )
    fits = sorted(table.best_fits(), key=lambda fit: -fit.reported_iou)
    held = f"IoU {heldout}" if table.heldout_iou is not None else ""
    header = f"{'head':>7}  {'IoU ' + split:>14}  {held:>12}  program (#index family: name)"

    def show(fit) -> str:
        held_iou = "" if fit.heldout_iou is None else f"{fit.heldout_iou:.3f}"
        return (f"{f'L{fit.layer}H{fit.head}':>7}  {fit.iou:>14.3f}  {held_iou:>12}  "
                f"#{fit.program_index} {fit.family}: {fit.name}")

    typer.echo(f"\nthe {min(top, len(fits))} heads with the best fits\n{header}")
    for fit in fits[:top]:
        typer.echo(show(fit))
    families = {}
    for fit in fits:  # fits are sorted, so the first head seen per family is its best
        families.setdefault(fit.family, fit)
    typer.echo(f"\nthe best head for each program family (among heads it fits best)\n{header}")
    for fit in families.values():
        typer.echo(show(fit))


@app.command("bench")
def bench_command(
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
    full: bool = typer.Option(False, help="all 9 shapes P x H instead of 3"),
    texts: int = typer.Option(0, help="texts of 64 tokens per shape (0: 32 on GPU, 4 on CPU)"),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16 inputs"),
    override: bool = typer.Option(True, help="also time the override kernel per layer (GPU)"),
) -> None:
    """Time the ranking kernel against torch broadcasting and the authors' numpy loop, and on
    a GPU the head-replacement kernel per layer against SDPA and eager attention."""
    from attnprog.engine.bench import run_override_bench, run_rank_bench

    device = None if device == "auto" else device
    run_rank_bench(device, quick=not full, n_texts=texts or None, dtype=_dtype(dtype))
    import torch

    on_gpu = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    if override and on_gpu:  # on a CPU both paths are SDPA plus a matmul: nothing to compare
        half = _dtype(dtype) if _dtype(dtype) != torch.float32 else torch.float16
        run_override_bench(device, dtype=half)


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
    import warnings

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        app()
    except AttnProgError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
