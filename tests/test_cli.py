"""The command line: every device option defaults to auto, every --help ends with an example,
commands are listed in pipeline order, and options fill one RunConfig."""

import pytest
import torch
import typer
from typer.testing import CliRunner

from attnprog.cli import app
from attnprog.engine.models import resolve_device
from attnprog.engine.run.config import RunConfig
from attnprog.errors import AttnProgError, StoreError

COMMANDS = typer.main.get_command(app).commands


def test_every_device_option_defaults_to_auto():
    defaults = {name: param.default for name, command in COMMANDS.items()
                for param in command.params if param.name == "device"}
    assert set(defaults) >= {"run", "extract", "replace", "rank", "bench"}
    assert set(defaults.values()) == {"auto"}


def test_run_help_shows_device_defaulting_to_auto():
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    line = next(line for line in result.output.splitlines() if "--device" in line)
    assert line.rstrip(" │").endswith("[default: auto]")


def test_auto_picks_cuda_only_when_a_gpu_is_present():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


def test_every_help_ends_with_a_runnable_example():
    for name, command in COMMANDS.items():
        assert (command.epilog or "").startswith(f"Example: attnprog {name}"), name


def test_help_paragraphs_wrap_to_the_terminal_not_to_the_source_lines():
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    # one paragraph of the docstring, broken over two source lines, prints as one line
    assert "Stages: extract, pool, llm (with --llm-model), fit, evaluate, rank, library, heads, costs " \
           "(with the cost order)" in result.output


def test_commands_are_listed_in_pipeline_order():
    listed = list(COMMANDS)
    assert listed[0] == "run"
    pipeline = ["extract", "generate", "synthesize", "rank", "show", "replace", "report"]
    assert [name for name in listed if name in pipeline] == pipeline


def test_run_options_fill_one_config():
    config = RunConfig.from_cli({"out": "runs/x", "candidates": 7, "force": "rank", "device": "auto"})
    assert config.out == "runs/x" and config.n_candidates == 7 and config.device == "auto"


def test_the_force_help_names_every_stage():
    from attnprog.engine.run.stages import STAGE_NAMES

    force = next(p for p in COMMANDS["run"].params if p.name == "force")
    assert all(name in force.help for name in STAGE_NAMES)


def test_an_out_that_is_a_directory_is_refused_before_any_work(tmp_path):
    # --model would fail too: the --out check comes first, so no model loads for nothing
    result = CliRunner().invoke(app, ["extract", "--model", "no-such-model", "--out", str(tmp_path)])
    assert isinstance(result.exception, StoreError)
    assert f"is a directory: give a file path, e.g. {tmp_path / 'attention.safetensors'}" in str(
        result.exception)


def test_an_out_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    result = CliRunner().invoke(app, ["generate", "--out", str(tmp_path / "notes.txt" / "pool.jsonl")])
    assert isinstance(result.exception, StoreError) and "is a file, not a folder" in str(result.exception)


def test_replace_refuses_an_unknown_cost_method_before_reading_the_store(tmp_path):
    missing = str(tmp_path / "missing.safetensors")  # would be refused next
    result = CliRunner().invoke(app, ["replace", "--store", missing, "--table", missing,
                                      "--cost-method", "foo"])
    assert "unknown cost method 'foo'" in str(result.exception)


def test_a_count_below_its_least_is_refused_naming_the_option():
    result = CliRunner().invoke(app, ["extract", "--max-tokens", "-5", "--model", "no-such-model"])
    assert "--max-tokens must be at least 2, got -5" in str(result.exception)


def test_rank_refuses_an_unknown_impl_before_reading_the_store(tmp_path):
    result = CliRunner().invoke(app, ["rank", "--store", str(tmp_path / "missing"), "--pool",
                                      str(tmp_path / "pool.jsonl"), "--impl", "foo"])
    assert "unknown --impl 'foo': use auto, triton, numba or torch" in str(result.exception)


def test_rank_refuses_impl_triton_without_a_gpu_before_reading_the_store(tmp_path, monkeypatch):
    from attnprog.kernels import iou

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(iou, "_interpreted", lambda: False)
    result = CliRunner().invoke(app, ["rank", "--store", str(tmp_path / "missing"), "--pool",
                                      str(tmp_path / "pool.jsonl"), "--impl", "triton"])
    assert isinstance(result.exception, AttnProgError)
    assert "--impl triton: " in str(result.exception)
    assert "use --impl auto, numba or torch" in str(result.exception)


@pytest.fixture(scope="module")
def store_file(tiny_gpt2, builtin_corpus, tmp_path_factory):
    from attnprog.engine.extract import extract_attention

    model, tokenizer = tiny_gpt2
    path = tmp_path_factory.mktemp("store") / "attention.safetensors"
    extract_attention(model, tokenizer, builtin_corpus.take(12), max_tokens=16).save(path)
    return path


def test_rank_refuses_a_heldout_split_the_store_lacks(store_file, tmp_path):
    result = CliRunner().invoke(app, ["rank", "--store", str(store_file), "--pool",
                                      str(tmp_path / "pool.jsonl"), "--heldout", "foo"])
    assert isinstance(result.exception, StoreError)
    assert "no texts in split 'foo'" in str(result.exception) and "--heldout ''" in str(result.exception)


def test_rank_names_the_store_file_when_given_its_directory(store_file, tmp_path):
    result = CliRunner().invoke(app, ["rank", "--store", str(store_file.parent), "--pool",
                                      str(tmp_path / "pool.jsonl")])
    assert f"is a directory: give the store file in it, e.g. {store_file}" in str(result.exception)


def test_rank_refuses_outputs_that_are_not_program_outputs(store_file):
    result = CliRunner().invoke(app, ["rank", "--store", str(store_file), "--outputs", str(store_file)])
    assert isinstance(result.exception, StoreError)
    assert "is not a file of program outputs" in str(result.exception)


@pytest.mark.parametrize("command", [["show", "--table", "t", "1.1", "--top", "0"],
                                     ["rank", "--store", "s", "--pool", "p", "--top", "-1"],
                                     ["synthesize", "--store", "s", "--heads", "1.1", "--model", "m",
                                      "--n", "0"]])
def test_counts_that_would_print_or_ask_nothing_are_refused(command):
    result = CliRunner().invoke(app, command)
    assert "must be at least" in str(result.exception)


def test_generate_refuses_an_empty_pool(tmp_path):
    result = CliRunner().invoke(app, ["generate", "--candidates", "0", "--no-golden", "--out",
                                      str(tmp_path / "pool.jsonl")])
    assert "leaves an empty pool" in str(result.exception) and not (tmp_path / "pool.jsonl").exists()


def test_serve_refuses_a_model_without_a_checkpoint_before_starting(tmp_path):
    tiny = CliRunner().invoke(app, ["serve", "--model", "tiny-llama"])
    assert "has no checkpoint to serve" in str(tiny.exception)
    empty = CliRunner().invoke(app, ["serve", "--model", str(tmp_path)])
    assert "is not a checkpoint directory (no config.json)" in str(empty.exception)
    port = CliRunner().invoke(app, ["serve", "--port", "99999"])
    assert "is not a TCP port" in str(port.exception)


def test_report_refuses_a_file_for_a_run_directory(tmp_path):
    (tmp_path / "one.txt").write_text("x")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "one.txt")])
    assert isinstance(result.exception, StoreError) and "is a file: give the run directory" in str(
        result.exception)


def test_synthesize_refuses_a_base_url_without_its_scheme():
    result = CliRunner().invoke(app, ["synthesize", "--store", "s", "--heads", "1.1", "--model", "m",
                                      "--base-url", "127.0.0.1:8000/v1"])
    assert "is not an http(s) URL" in str(result.exception)


def test_replace_without_model_loads_the_tiny_model_that_made_the_store(store_file, tmp_path):
    from attnprog.engine.rank import IoUTable
    from attnprog.synth.program import Program

    table = tmp_path / "other.safetensors"  # refused once the model is loaded, before any sweep
    IoUTable(torch.zeros(1, 3), [Program("def program(s): ...")], "selection", 1, 3).save(table)
    result = CliRunner().invoke(app, ["replace", "--store", str(store_file), "--table", str(table)])
    assert "the IoU table has 3 heads, the store 2 x 4" in str(result.exception)


def test_rank_refuses_to_write_its_table_over_its_pool(store_file, tmp_path):
    from attnprog.engine.pool import build_pool
    from attnprog.synth.program import save_pool

    pool = tmp_path / "pool.jsonl"
    save_pool(build_pool(0)[:1], pool)  # golden: runs in-process, no sandbox needed
    before = pool.read_text()
    result = CliRunner().invoke(app, ["rank", "--store", str(store_file), "--pool", str(pool),
                                      "--out", str(pool)])
    assert isinstance(result.exception, StoreError) and "is one of the inputs" in str(result.exception)
    assert pool.read_text() == before


def test_rank_of_a_pool_fitted_to_another_model_says_so(store_file, tmp_path):
    from attnprog.engine.pool import build_pool
    from attnprog.synth.program import save_pool

    (golden,) = build_pool(0)[:1]
    golden.provenance["model_id"] = "smollm2-135m@sha256:b179c952"  # as a fitted program records it
    save_pool([golden], tmp_path / "fitted.jsonl")
    with pytest.warns(UserWarning, match="fitted to another model .*smollm2-135m.*not to this store's"):
        CliRunner().invoke(app, ["rank", "--store", str(store_file), "--pool", str(tmp_path / "fitted.jsonl"),
                                 "--out", str(tmp_path / "t.safetensors")])


def test_rank_hands_paper_form_programs_the_models_tokenizer(store_file, tmp_path):
    from attnprog.synth.program import Program, save_pool

    # the stand-in tokenizer knows only the text being explained; the model's tokenises any
    paper = Program("import numpy as np\ndef f(sentence, tokenizer):\n"
                    "    assert len(tokenizer(' the')['input_ids']) > 0\n"
                    "    n = len(tokenizer(sentence)['input_ids'])\n"
                    "    return 'all', np.ones((n, n))\n", name="f")
    save_pool([paper], tmp_path / "pool.jsonl")
    result = CliRunner().invoke(app, ["rank", "--store", str(store_file), "--pool",
                                      str(tmp_path / "pool.jsonl"), "--out",
                                      str(tmp_path / "t.safetensors")],
                                env={"ATTNPROG_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    assert "0 programs failed on every text" in result.output
