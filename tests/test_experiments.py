"""The experiment layer: every config composes, bad keys and values fail before a model loads,
a tiny end-to-end run logs to W&B offline (read back from its run file), and a 2-job multirun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from experiments.schema import register, validate

from conftest import save_with_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
register()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in ("model", "drafter", "tree", "dataset", "sampling", "logger") for o in options(g)]
    + [f"+experiment={o}" for o in options("experiment")],
)
def test_every_config_composes_and_validates(override):
    cfg = compose_with(override)
    validate(cfg)
    assert cfg.max_new_tokens >= 1 and "_target_" in cfg.drafter


def test_misspelt_key_fails_naming_it():
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="max_new_token"):
        compose_with("max_new_token=3")
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="per_tsk"):
        compose_with("dataset.per_tsk=3")


def test_wrong_type_fails_naming_it():
    with pytest.raises((ConfigCompositionException, ValidationError), match="threads"):
        compose_with("threads=many")


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_new_tokens=0", "max_new_tokens=0"),
        ("attention_backend=cuda", "attention_backend='cuda'"),
        ("logger.kind=tensorboard", "logger.kind='tensorboard'"),
        ("batch_size=0", "batch_size=0"),
        ("linear_backend=fast", "linear_backend='fast'"),
        ("+variants.plain={_target_:specdec.engine.NoDraft,linear_backend:fast}", "variants.plain.linear_backend='fast'"),
    ],
)
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        validate(compose_with(override))


# --- end to end, in a subprocess as a user runs it, on a tiny model --------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_with_tokenizer(tiny_llama(), tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [
        {"question_id": 1, "category": "loop", "turns": ["w5 w6 w7 w5 w6 w7 w5 w6"]},
        {"question_id": 2, "category": "loop", "turns": ["w9 w10 w11 w12 w9 w10"]},
        {"question_id": 3, "category": "other", "turns": ["w30 w31 w40 w41"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_experiment(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "experiments.run", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def read_wandb_records(path: Path) -> list:
    """Records of a W&B run file (a LevelDB-style log of protobuf ``Record`` messages)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a header never straddles a block: the rest is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, prompts_file, tmp_path_factory):
    """One end-to-end run on the tiny model, logged to W&B offline."""
    tmp_path = tmp_path_factory.mktemp("tiny-run")
    run_dir = tmp_path / "run"
    done = run_experiment(f"model.name={tiny_model_dir}", f"dataset.path={prompts_file}", "dataset.per_task=null",
                          "dataset.name=tiny", "max_new_tokens=12", "logger=wandb", "progress=false",
                          "hf_prompt_lookup_num_tokens=0", "drafter.k=3", f"hydra.run.dir={run_dir}",
                          "+variants.plain_torch={_target_:specdec.engine.NoDraft,linear_backend:torch}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_tiny_run_logs_to_wandb_offline(tiny_run):
    run_dir = tiny_run
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4  # prompts x (generate, no draft, prompt lookup, no draft with F.linear untouched)
    assert all(r["matches_baseline"] for r in rows)
    assert sum(r["method"] == "specdec_plain_torch" for r in rows) == 3
    table = (run_dir / "table.md").read_text()
    assert "Greedy output identical to `model.generate` on every prompt: yes" in table
    by_method = table.split("Speedup (tau) per task:")[1]
    assert "| method | loop | other | overall | tok/s overall |" in by_method
    assert by_method.count("| specdec_prompt_lookup | ") == 1 and "x (" in by_method
    assert (run_dir / "speedup.png").is_file() and "![speedup]" in (run_dir / "report.md").read_text()

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    config = {_key(i): json.loads(i.value_json) for r in records if r.HasField("run") for i in r.run.config.update}
    assert config["max_new_tokens"] == 12 and config["drafter"]["k"] == 3
    history = [{_key(i): i.value_json for i in r.history.item} for r in records if r.HasField("history")]
    logged = [h for h in history if "specdec_prompt_lookup/tokens_per_s" in h]
    assert len(logged) == 3 and all(float(h["specdec_prompt_lookup/tokens_per_s"]) > 0 for h in logged)
    table = {k.split("/", 1)[1]: json.loads(v) for h in history for k, v in h.items() if k.startswith("results/")}
    assert table["_type"] == "table-file" and table["nrows"] == len(rows)
    summary = {_key(i): i.value_json for r in records if r.HasField("summary") for i in r.summary.update}
    speedup = [k for k in summary if k.startswith("overall/specdec_prompt_lookup/speedup")]
    assert speedup and float(summary[speedup[0]]) > 0


def test_two_job_multirun(tiny_model_dir, prompts_file, tmp_path):
    sweep = tmp_path / "sweep"
    done = run_experiment("--multirun", "tree=chain,dynamic", f"model.name={tiny_model_dir}",
                          f"dataset.path={prompts_file}", "dataset.per_task=1", "dataset.name=tiny",
                          "max_new_tokens=8", "logger=csv", "progress=false", "hf_prompt_lookup_num_tokens=0",
                          f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/results.csv"))
    assert [p.name for p in jobs] == ["0", "1"]
    for job, tree in zip(jobs, ("chain", "dynamic")):
        assert f"tree={tree}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert "specdec_prompt_lookup" in (job / "results.csv").read_text()
        resolved = (job / ".hydra" / "config.yaml").read_text()
        assert f"branches: {1 if tree == 'chain' else 3}" in resolved


def test_tree_group_reaches_the_drafters():
    from hydra.utils import instantiate

    lookup = instantiate({k: v for k, v in compose_with("tree=dynamic").drafter.items() if k != "name"})
    assert (lookup.k, lookup.branches) == (6, 3)
    cfg = compose_with("drafter=truncated", "tree=dynamic", "tree.budget=16")
    assert (cfg.drafter.top_k, cfg.drafter.width, cfg.drafter.budget, cfg.drafter.k) == (4, 4, 16, 6)


def test_report_writes_tables_and_figures(tiny_run, tmp_path):
    from specdec.tooling.report import FIGURES, write_report

    report = write_report(tiny_run, tmp_path / "report")
    text = report.read_text()
    assert "| overall |" in text and "specdec_prompt_lookup" in text
    for name in FIGURES:
        png = tmp_path / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({name}.png)" in text


def test_report_of_a_missing_directory_is_a_clear_error(tmp_path):
    from specdec.tooling.report import load_runs

    with pytest.raises(FileNotFoundError, match="no results.jsonl"):
        load_runs(tmp_path)


def test_notebook_executes(tiny_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "benchmark.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    monkeypatch.setenv("SPECDEC_RUN_DIR", str(tiny_run))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("result rows from" in o.get("text", "") for o in outputs)


def test_two_processes_shard_the_prompts_and_merge(tiny_model_dir, prompts_file, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "experiments.run", f"model.name={tiny_model_dir}", f"dataset.path={prompts_file}",
         "dataset.per_task=null", "dataset.name=tiny", "max_new_tokens=8", "logger=none", "progress=false",
         "threads=1", "hf_prompt_lookup_num_tokens=0", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [[json.loads(line)["prompt_id"] for line in (run_dir / f"results.rank{r}.jsonl").read_text().splitlines()]
              for r in range(2)]
    assert sorted(set(shards[0])) == [1, 3] and sorted(set(shards[1])) == [2]  # prompts[rank::2]
    merged = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert sorted({r["prompt_id"] for r in merged}) == [1, 2, 3] and len(merged) == 3 * 3
    assert "2 processes" in (run_dir / "table.md").read_text()


def test_slurm_launcher_config_runs_in_submitit_local_mode(tiny_model_dir, prompts_file, tmp_path):
    sweep = tmp_path / "sweep"
    done = run_experiment("--multirun", "hydra/launcher=slurm_local", "drafter.k=2,3",
                          f"model.name={tiny_model_dir}", f"dataset.path={prompts_file}", "dataset.per_task=1",
                          "dataset.name=tiny", "max_new_tokens=6", "logger=none", "progress=false", "threads=1",
                          "hf_prompt_lookup_num_tokens=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p.parent.name for p in sweep.glob("*/results.jsonl"))
    assert jobs == ["0", "1"]
    assert list(sweep.glob(".submitit/*"))  # submitit ran them


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.timeout_min == 120


def test_two_turn_prompts_run_as_conversations(tiny_model_dir):
    from specdec import PromptLookup, load_model
    from specdec.tooling.benchmark import hf_generate, run_benchmark, specdec_generate
    from specdec.tooling.data import Prompt

    model, tokenizer = load_model(tiny_model_dir)
    prompts = [Prompt(1, "mt_bench", "writing", ("w5 w6 w7 w5 w6", "w9 w10 w9 w10"))]
    methods = [hf_generate(model, 6), specdec_generate(model, PromptLookup(k=3), 6, "specdec_lookup")]
    rows = run_benchmark(methods, tokenizer, prompts, progress=False, all_turns=True)
    assert [(r["turn"], r["method"]) for r in rows] == [
        (1, "generate"), (1, "specdec_lookup"), (2, "generate"), (2, "specdec_lookup")]
    assert all(r["matches_baseline"] for r in rows)
    assert rows[2]["prompt_tokens"] > rows[0]["prompt_tokens"] + 4  # turn 2 carries turn 1 and its answer
    only_first = run_benchmark(methods, tokenizer, prompts, progress=False)
    assert [r["turn"] for r in only_first] == [1, 1]


def test_draft_model_from_pretrained_keeps_first_layers(tiny_model_dir):
    from specdec import DraftModel

    drafter = DraftModel.from_pretrained(str(tiny_model_dir), layers=1, k=2, top_k=2)
    assert len(drafter.model.model.layers) == 1 and drafter.model.config.num_hidden_layers == 1
    assert (drafter.k, drafter.top_k) == (2, 2)
    with pytest.raises(ValueError, match="layers=5 must be in"):
        DraftModel.from_pretrained(str(tiny_model_dir), layers=5)


def test_bench_forward_prints_every_width_and_restores_the_model(tiny_model_dir):
    """The forward-cost benchmark runs on any model directory: one row per width plus the prefill,
    a column pair per backend (linear-free included), and the model's layers as they were."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "experiments.bench_forward", "--model", str(tiny_model_dir),
                           "--cached", "8", "--tokens", "1", "3", "--repeats", "2", "--linear-free"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert lines[0].count("/ 1 token") == 3  # torch, auto, linear-free
    rows = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert set(rows) == {"1", "3", "prefill of 8"}
    assert rows["1"].count("1.00x") == 3  # each backend against its own 1-token forward

    import torch

    from experiments.bench_forward import linear_free
    from specdec import load_model

    model, _ = load_model(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode(), linear_free(model):
        assert not model(ids).logits.any()  # the output head is free too: zeros
    with torch.inference_mode():
        assert model(ids).logits.any() and all("forward" not in vars(m) for m in model.modules())
