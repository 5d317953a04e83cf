"""Program evaluation as Ray tasks: batches of sandboxed programs run on every node.

Each task calls the public :func:`attnprog.synth.runtime.evaluate.evaluate_programs` on its
node, so programs run in that node's OS-isolated sandbox workers, with its output cache, and
a program that crashes, hangs or misbehaves there is marked failed exactly as on one machine.
Generator programs never travel: as on one machine, their rows are computed when ranking
reads them. If a Ray worker itself dies under a batch (its node is lost, or a program got
past the sandbox), the batch is split in halves and run again; a single program that still
takes its worker down is marked failed on every text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnprog.errors import AttnProgError, ClusterError
from attnprog.synth.features import Sentence
from attnprog.synth.program import Program
from attnprog.synth.runtime.evaluate import StreamedOutputs, evaluate_programs

from .cluster import connect, resources

LOST_WORKER = "its Ray worker died while running it (twice)"


def evaluate_batch(programs: list[Program], sentences: list[Sentence], options: dict):
    """One task's work: (values [programs, cells], failed [programs, texts], reasons) of
    ``programs`` on this node."""
    outputs = evaluate_programs(programs, sentences, progress=False, stream=False, **options)
    return outputs.values, outputs.failed, outputs.reasons


def evaluate_on_ray(
    programs: Sequence[Program],
    sentences: Sequence[Sentence],
    *,
    address: str = "auto",
    corpus_hash: str | None = None,
    tokenizer_id: str = "",
    batch_programs: int | None = None,
    cpus_per_task: int = 1,
    timeout: float = 2.0,
    memory_mb: float = 1024,
    use_cache: bool = True,
    cache_dir=None,
    stream: bool = False,
    progress: bool = True,
    tokenizer=None,
    _task=None,
):
    """:func:`evaluate_programs` with the sandboxed programs spread over a Ray cluster.

    Same arguments and result (ProgramOutputs, or StreamedOutputs with ``stream=True``).
    ``batch_programs`` programs go to each task (default: about four batches per CPU);
    each task runs ``cpus_per_task`` sandbox workers.
    """
    from attnprog.synth.generator.specs import is_generated

    ray = connect(address)
    programs, sentences = list(programs), list(sentences)
    unique = list({p.hash: p for p in programs}.values())
    generated = [p for p in unique if is_generated(p)]
    sandboxed = [p for p in unique if not is_generated(p)]
    # the single-machine call on the generator programs alone runs nothing: it checks the
    # texts, attaches syntax where they need it, and fixes the corpus hash and offsets
    local = evaluate_programs(generated, sentences, corpus_hash=corpus_hash,
                              tokenizer_id=tokenizer_id, progress=False, use_cache=False,
                              stream=True)
    options = {"corpus_hash": local.corpus_hash, "tokenizer_id": tokenizer_id,
               "workers": cpus_per_task, "timeout": timeout, "memory_mb": memory_mb,
               "use_cache": use_cache, "cache_dir": cache_dir, "tokenizer": tokenizer}
    results = {}
    if sandboxed:
        if batch_programs is None:
            batch_programs = -(-len(sandboxed) // max(1, 4 * int(resources()["CPU"])))
        task = _task or ray.remote(evaluate_batch)
        task = task.options(num_cpus=cpus_per_task, max_retries=0)  # we retry, by halves
        results = _run_batches(ray, task, sandboxed, ray.put(local.sentences), options,
                               max(1, int(batch_programs)), len(local.sentences),
                               int(local.offsets[-1]), progress)
    streamed = StreamedOutputs(programs, local.sentences, local.offsets, results,
                               local.corpus_hash)
    return streamed if stream else streamed.select(range(len(programs)))


def _run_batches(ray, task, programs, sentences_ref, options, batch, n_texts, n_cells, progress):
    """Run ``programs`` in batches as tasks; {hash: (values, failed, reason)} for each."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(programs), desc="evaluating on Ray", unit="program", disable=None)
    results: dict[str, tuple] = {}
    pending: dict = {}  # ref -> (batch of programs, attempts of a single program)

    def submit(part: list[Program], attempts: int = 0) -> None:
        pending[task.remote(part, sentences_ref, options)] = (part, attempts)

    for start in range(0, len(programs), batch):
        submit(programs[start : start + batch])
    while pending:
        [done], _ = ray.wait(list(pending), num_returns=1)
        part, attempts = pending.pop(done)
        try:
            values, failed, reasons = ray.get(done)
        except AttnProgError:
            raise  # a user error on the worker (e.g. spaCy missing there): same as locally
        except ray.exceptions.RayTaskError as err:
            raise ClusterError(f"evaluating a batch failed on a Ray worker: {err}") from err
        except ray.exceptions.RayError:  # the worker process or its node died
            if len(part) > 1:
                half = len(part) // 2
                submit(part[:half])
                submit(part[half:])
            elif attempts == 0:
                submit(part, 1)  # once more: it may have been the node, not the program
            else:
                results[part[0].hash] = (np.zeros(n_cells, np.float32),
                                         np.ones(n_texts, bool), LOST_WORKER)
                if bar is not None:
                    bar.update(1)
            continue
        for row, program in enumerate(part):
            results[program.hash] = (values[row], failed[row], reasons[row])
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    return results
