"""What one pipeline run does: ``RunConfig``, saved as ``config.json`` in the run directory."""

from __future__ import annotations

from dataclasses import dataclass, fields


def at_least(least: int, **counts: int) -> None:
    """Refuse a count below ``least`` up front, named as its option (``max_tokens`` ->
    ``--max-tokens``), before any work."""
    from attnprog.errors import AttnProgError

    for name, value in counts.items():
        if value < least:
            raise AttnProgError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


@dataclass
class RunConfig:
    """Every setting of ``attnprog run``; the CLI fills it, the pipeline reads it."""

    out: str = "runs/demo"
    model: str = "smollm2-135m"
    corpus: str = "builtin"
    text_field: str = "text"
    limit: int = 0  # first N texts only (0: all)
    max_tokens: int = 128
    n_candidates: int = 5000  # generator programs, on top of the golden library
    fraction: float = 1.0  # largest share of heads replaced in the sweep
    qa: bool = True
    order: str = "both"  # heads replaced by "iou" (best fit first), "cost" (cheapest first), "both"
    cost_method: str = "auto"  # head costs: "exact" (a pass per head), "fisher", "taylor", "linear"
    batch_size: int = 8
    device: str = "auto"  # "auto": CUDA when present, else the CPU
    top: int = 12  # best fits printed
    fit: bool = True  # fit one program per head on the synthesis split and add it to the pool
    fit_terms: int = 12  # features per fitted program (its sink share is one more setting)
    ray: str = ""  # Ray cluster address or "auto" ("": this machine only, Ray not imported)
    seed: int = 0  # random baselines (random program, random token)
    heads: str = ""  # heads to explain, e.g. "18.*,20.3" (empty: all)
    library_size: int = 1000  # most programs in the greedy library
    library_min_gain: float = 1e-4  # stop adding programs below this gain in mean IoU
    report: bool = True  # write report.html at the end
    # optional LLM stage (off unless llm_model is set); the API key comes from $OPENAI_API_KEY
    llm_base_url: str = ""
    llm_model: str = ""
    llm_heads: str = "all"
    llm_n: int = 4
    llm_rounds: int = 1
    llm_max_tokens_total: int = 0

    # command-line option names that differ from the field they fill
    CLI_NAMES = {"candidates": "n_candidates"}
    # the least value of each count that has one (option name as the CLI spells it)
    LEAST = {"limit": 0, "max_tokens": 2, "candidates": 0, "batch_size": 1, "fit_terms": 1,
             "library_size": 1, "llm_n": 1, "llm_rounds": 0, "llm_max_tokens_total": 0}

    def check(self) -> None:
        """Refuse a setting a later stage would refuse, before the run spends minutes on
        extraction and costs (a head out of range waits for the model: see run_extract)."""
        from attnprog.engine.head_costs import check_method
        from attnprog.engine.heads import check_spec
        from attnprog.engine.models import resolve_device
        from attnprog.engine.sweep import fractions_up_to, orders_from_option

        for option, least in self.LEAST.items():
            at_least(least, **{option: getattr(self, self.CLI_NAMES.get(option, option))})
        fractions_up_to(self.fraction)
        orders_from_option(self.order)
        check_method(self.cost_method)
        check_spec(self.heads)
        check_spec(self.llm_heads)
        resolve_device(self.device)

    @classmethod
    def from_cli(cls, options: dict) -> RunConfig:
        """The config from a command's options (``locals()``); options it does not know are
        left out (e.g. ``force``, which says what to redo, not what to compute)."""
        names = {f.name for f in fields(cls)}
        values = {cls.CLI_NAMES.get(key, key): value for key, value in options.items()}
        return cls(**{key: str(value) if key == "out" else value
                      for key, value in values.items() if key in names})
