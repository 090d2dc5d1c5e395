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


def test_a_variant_named_like_the_drafter_fails_naming_it():
    with pytest.raises(ValueError, match="variants.prompt_lookup has the name of drafter.name"):
        validate(compose_with("drafter=prompt_lookup", "+variants.prompt_lookup={_target_: specdec.drafters.PromptLookup}"))
    mine = "+variants.prompt_lookup={_target_: specdec.drafters.PromptLookup}"
    with pytest.raises(ValueError, match="variants.prompt_lookup has the name of the prompt lookup run beside .*_k=0"):
        validate(compose_with(mine))  # the default drafter runs with specdec's prompt lookup beside it
    validate(compose_with("prompt_lookup_k=0", mine))
    with pytest.raises(ValueError, match="variants.no_draft"):
        validate(compose_with("+variants.no_draft={_target_: specdec.engine.NoDraft}"))


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
                          "hf_prompt_lookup_num_tokens=0", "drafter=prompt_lookup", "drafter.k=3",
                          f"hydra.run.dir={run_dir}",
                          "+variants.plain_torch={_target_:specdec.engine.NoDraft,linear_backend:torch}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def _offline_run(run_dir: Path):
    """(records, files dir) of the one offline W&B run in ``run_dir``."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return read_wandb_records(run_file), run_file.parent / "files"


def _wandb_table(files: Path, history: list[dict], key: str) -> dict:
    """A logged wandb.Table, read back from the run's media files."""
    (entry,) = [json.loads(h[f"{key}/path"]) for h in history if f"{key}/path" in h]
    return json.loads((files / entry).read_text())


def test_tiny_run_logs_to_wandb_offline(tiny_run):
    run_dir = tiny_run
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4  # prompts x (generate, no draft, prompt lookup, no draft with F.linear untouched)
    assert all(r["matches_baseline"] for r in rows)
    assert sum(r["method"] == "specdec_plain_torch" for r in rows) == 3
    table = (run_dir / "table.md").read_text()
    assert "Greedy output identical to `model.generate` on every prompt: yes" in table
    by_method = table.split("Speedup (tau) per task:")[1]
    assert "| method | loop | other | overall | tok/s overall | acceptance overall |" in by_method
    assert by_method.count("| specdec_prompt_lookup | ") == 1 and "x (" in by_method
    report = (run_dir / "report.md").read_text()
    assert (run_dir / "speedup.png").is_file() and (run_dir / "speedup.pdf").is_file() and "![speedup]" in report

    records, files = _offline_run(run_dir)
    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.display_name == f"prompt_lookup {run_dir.parent.name}/{run_dir.name}" and run.job_type == "benchmark"
    assert {"prompt_lookup", "tiny", "greedy", "batch1"} <= set(run.tags)
    config = {_key(i): json.loads(i.value_json) for i in run.config.update}
    assert config["max_new_tokens"] == 12 and config["drafter"]["k"] == 3 and config["batch_size"] == 1
    assert config["prompt_ids"] == [1, 2, 3]  # ids are config, not metrics
    history = [{_key(i): i.value_json for i in r.history.item} for r in records if r.HasField("history")]
    per_prompt = [h for h in history if "specdec_prompt_lookup/tokens_per_s" in h]
    assert len(per_prompt) == 3  # one step per prompt, holding every method's numbers
    assert all("generate/tokens_per_s" in h and "specdec_prompt_lookup/tau" in h for h in per_prompt)
    assert not [k for h in history for k in h if k.split("/")[-1] in ("prompt_id", "turn", "batch_size")]
    results = _wandb_table(files, history, "results")
    assert len(results["data"]) == len(rows) and {"prompt_id", "turn", "batch_size"} <= set(results["columns"])
    acceptance = _wandb_table(files, history, "position_acceptance")
    assert acceptance["columns"] == ["method", "depth", "acceptance", "prompts"]
    assert {m for m, *_ in acceptance["data"]} == {"specdec_prompt_lookup"}  # the engine alone drafts nothing
    assert [d for m, d, *_ in acceptance["data"]] == list(range(1, len(acceptance["data"]) + 1))
    assert any(k.startswith("position_acceptance_plot") for h in history for k in h)  # the line plot's table
    figures = {k.split("/")[1] for h in history for k in h if k.startswith("figures/") and k.endswith("/_type")}
    assert figures == {"speedup", "tau", "acceptance", "latency"}
    summary = {_key(i): json.loads(i.value_json) for r in records if r.HasField("summary") for i in r.summary.update}
    for task in ("loop", "other", "overall"):
        for metric in ("tau", "speedup", "tokens_per_s") + (("acceptance_rate",) if task != "other" else ()):
            assert summary[f"{task}/specdec_prompt_lookup/{metric}"] >= 0, (task, metric)  # (other: nothing drafted)
        assert summary[f"{task}/specdec_prompt_lookup/tau"] >= 1
        assert f"{task}/generate/tokens_per_s" in summary and f"{task}/generate/tau" not in summary
    assert not [k for k in summary if k.count("/") == 1 and not k.startswith(("_", "figures", "results",
                                                                               "summary_table", "position"))]


@pytest.fixture(scope="module")
def tiny_sweep(tiny_model_dir, prompts_file, tmp_path_factory):
    """A 2x2 sweep on the tiny model (tree shape x draft depth), logged to W&B offline."""
    tmp_path = tmp_path_factory.mktemp("tiny-sweep")
    sweep = tmp_path / "sweep"
    done = run_experiment("--multirun", "tree=chain,dynamic", "drafter=prompt_lookup", "drafter.k=2,3",
                          f"model.name={tiny_model_dir}",
                          f"dataset.path={prompts_file}", "dataset.per_task=1", "dataset.name=tiny",
                          "max_new_tokens=8", "logger=wandb", "progress=false", "hf_prompt_lookup_num_tokens=0",
                          "threads=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep


def test_2x2_multirun_jobs_and_their_wandb_runs(tiny_sweep):
    jobs = sorted((p.parent for p in tiny_sweep.glob("*/results.jsonl")), key=lambda p: p.name)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    names = []
    for job, (tree, k) in zip(jobs, [("chain", 2), ("chain", 3), ("dynamic", 2), ("dynamic", 3)]):
        assert f"tree={tree}" in (job / ".hydra" / "overrides.yaml").read_text()
        resolved = (job / ".hydra" / "config.yaml").read_text()
        assert f"branches: {1 if tree == 'chain' else 3}" in resolved and f"k: {k}" in resolved
        records, _ = _offline_run(job)
        (run,) = [r.run for r in records if r.HasField("run")]
        assert run.run_group == f"sweep {tiny_sweep}" and run.job_type == "benchmark" and "sweep" in run.tags
        names.append(run.display_name)
    assert names == ["tree=chain drafter.k=2", "tree=chain drafter.k=3", "tree=dynamic drafter.k=2",
                     "tree=dynamic drafter.k=3"]


def _texts_inside(fig) -> list[str]:
    """Every visible text of ``fig`` after drawing, asserting that none reaches past the figure's edge."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer, box, texts = canvas.get_renderer(), fig.bbox, []
    undrawn = set()  # labels of ticks outside the view, which matplotlib keeps but never draws
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            undrawn |= {id(t.label1) for t in axis.get_major_ticks() if not lo - 1e-9 <= t.get_loc() <= hi + 1e-9}
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text().strip() and id(text) not in undrawn:
            extent = text.get_window_extent(renderer)
            assert (extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1 and extent.y0 >= box.y0 - 1
                    and extent.y1 <= box.y1 + 1), f"cut: {text.get_text()!r} {extent} outside {box}"
            texts.append(text.get_text())
    for ax in fig.axes:  # readable ticks: no two labels of an axis overlap
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t.label1 for t in axis.get_major_ticks() + axis.get_minor_ticks()
                      if t.label1.get_visible() and t.label1.get_text() and id(t.label1) not in undrawn]
            boxes = [label.get_window_extent(renderer) for label in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    assert not boxes[i].overlaps(boxes[j]), f"{labels[i].get_text()!r} overlaps {labels[j].get_text()!r}"
    return texts


def test_sweep_report_has_one_series_per_method_and_swept_value(tiny_sweep, tmp_path):
    import warnings

    from matplotlib.container import BarContainer

    from specdec.tooling.report import FIGURES, acceptance_figure, load_runs, speedup_figure, tau_figure

    runs = load_runs(tiny_sweep)
    assert runs.swept == ["tree", "drafter.k"] and runs.facets == [""]
    swept = [f"specdec_prompt_lookup (tree={t}, drafter.k={k})" for t in ("chain", "dynamic") for k in (2, 3)]
    assert runs.series == ["generate", "specdec_no_draft", *swept]  # baselines once, pooled over the jobs
    assert "tiny-model" in runs.caption and "tiny (2 prompts, 2 tasks)" in runs.caption
    assert "8 new tokens" in runs.caption and "batch 1" in runs.caption and "greedy" in runs.caption
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constrained layout collapsing warns: it must not
        figures = {name: draw(runs) for name, draw in FIGURES.items()}
        for fig in figures.values():
            texts = _texts_inside(fig)
            assert fig.get_suptitle().replace("\n", " ") == runs.caption
            stray = ("max_new_tokens=", "dataset.", "logger=", "threads=", "model.name=", "progress=")
            assert not [t for t in texts if any(k in t for k in stray)]  # what is not swept labels nothing

    (ax,) = figures["speedup"].axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in bars] == ["specdec_no_draft", *[s.replace(" (", "\n").rstrip(")") for s in swept]]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["loop", "other", "overall"]
    assert all(len(c) == 3 for c in bars)  # a bar per task and overall
    legend = [t.get_text() for t in figures["speedup"].legends[0].get_texts()]
    assert legend[0] == "model.generate() (= 1)" and len(legend) == 1 + len(bars)

    (ax,) = figures["tau"].axes
    assert [t.get_text().replace("\n", " (") + ")" for t in ax.get_yticklabels()] == swept
    (ax,) = figures["acceptance"].axes
    assert len(ax.get_lines()) == 4 and all(t.get_text().isdigit() for t in ax.get_xticklabels() if t.get_text())
    assert len(figures["latency"].axes) == 2 and len(figures["latency"].axes[0].get_yticklabels()) == 2 + 4

    from specdec.tooling.report import write_report

    text = write_report(tiny_sweep, tmp_path / "report").read_text()
    for name in FIGURES:
        assert (tmp_path / "report" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "report" / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
    assert text.count("## tree=") == 4 and "[" not in text.split("## tree=chain, drafter.k=2")[1].split("\n")[4]
    assert acceptance_figure and speedup_figure and tau_figure


def test_runs_with_the_same_settings_are_kept_apart(tiny_run, tmp_path):
    import shutil

    from specdec.tooling.report import load_runs, write_report

    for name in ("first", "second"):
        shutil.copytree(tiny_run, tmp_path / "outputs" / name)
    runs = load_runs(tmp_path / "outputs")
    assert runs.swept == ["run"] and runs.facets == ["run=first", "run=second"]
    per_facet = {f: sum(1 for r in runs.rows if r["facet"] == f and r["method"] == "generate") for f in runs.facets}
    assert per_facet == {"run=first": 3, "run=second": 3}  # never 6 prompts pooled from two runs
    text = write_report(tmp_path / "outputs").read_text()
    assert "## run=first" in text and "## run=second" in text


def test_sampled_summary_reports_tau_and_acceptance_not_equality(tiny_run):
    from specdec.tooling.benchmark import markdown_table, speedup_table, summarize

    rows = [json.loads(line) for line in (tiny_run / "results.jsonl").read_text().splitlines()]
    summary = summarize(rows, greedy=False)
    assert all(s["exact"] is None for s in summary)
    table = markdown_table(summary)
    assert "Greedy output identical" not in table and "Sampled" in table and "tau" in table
    assert "acceptance overall" in speedup_table(summary)


def test_find_runs_searches_upward(tiny_run, tmp_path, monkeypatch):
    import shutil

    from specdec.tooling.report import find_runs, load_runs

    shutil.copytree(tiny_run, tmp_path / "repo" / "outputs" / "run")
    (tmp_path / "repo" / "pyproject.toml").write_text("")  # the project's root: the search stops there
    (tmp_path / "repo" / "notebooks" / "deeper").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    monkeypatch.chdir(tmp_path / "repo" / "notebooks" / "deeper")
    assert find_runs("outputs") == tmp_path / "repo" / "outputs"
    assert len(load_runs("outputs").jobs) == 1
    with pytest.raises(FileNotFoundError, match="no 'outside' in .* up to the project root"):
        find_runs("outside")  # above the project: not searched


def test_tree_group_reaches_the_drafters():
    from hydra.utils import instantiate

    drafter = compose_with("drafter=prompt_lookup", "tree=dynamic").drafter
    lookup = instantiate({k: v for k, v in drafter.items() if k != "name"})
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
        assert (tmp_path / "report" / f"{name}.pdf").is_file() and f"({name}.pdf)" in text


def test_report_of_a_missing_directory_is_a_clear_error(tmp_path):
    from specdec.tooling.report import load_runs

    with pytest.raises(FileNotFoundError, match="no results.jsonl"):
        load_runs(tmp_path)


def test_notebook_executes_from_its_own_directory(tiny_run, tmp_path, monkeypatch):
    """As Jupyter runs it: the working directory is notebooks/, and the default ``outputs`` is the
    repository's (found by looking upward)."""
    import shutil

    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "benchmark.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    shutil.copytree(tiny_run, tmp_path / "repo" / "outputs" / "2026-01-01" / "00-00-00")
    (tmp_path / "repo" / "pyproject.toml").write_text("")
    (tmp_path / "repo" / "notebooks").mkdir()
    monkeypatch.delenv("SPECDEC_RUN_DIR", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path / "repo" / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4
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
    assert sorted({r["prompt_id"] for r in merged}) == [1, 2, 3] and len(merged) == 3 * 4
    # the default drafter (lookup, else Token Recycling), with specdec's prompt lookup run beside it
    assert {r["method"] for r in merged} == {"generate", "specdec_no_draft", "specdec_lookup_else_recycling",
                                             "specdec_prompt_lookup"}
    assert all(r["matches_baseline"] for r in merged)
    assert "2 processes" in (run_dir / "table.md").read_text()


def test_slurm_launcher_config_runs_in_submitit_local_mode(tiny_model_dir, prompts_file, tmp_path):
    sweep = tmp_path / "sweep"
    done = run_experiment("--multirun", "hydra/launcher=slurm_local", "drafter=prompt_lookup", "drafter.k=2,3",
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
    assert (drafter.k, drafter.shape.top_k) == (2, 2)
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
    assert lines[0].count("/ 1 token") == 4  # torch, skinny, auto, linear-free
    rows = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert set(rows) == {"1", "3", "prefill of 8"}
    assert rows["1"].count("1.00x") == 4  # each backend against its own 1-token forward

    import torch

    from experiments.bench_forward import linear_free
    from specdec import load_model

    model, _ = load_model(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode(), linear_free(model):
        assert not model(ids).logits.any()  # the output head is free too: zeros
    with torch.inference_mode():
        assert model(ids).logits.any() and all("forward" not in vars(m) for m in model.modules())


def test_eagle_accuracy_prints_each_task_split_by_lookup(tiny_model_dir, prompts_file):
    """The benchmark-side accuracy command (its numbers against drafting: test_train) prints a row per task and
    one for all, whose answer tokens add up."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "experiments.eagle_accuracy", "--model", str(tiny_model_dir),
                           "--untrained", "--prompts", str(prompts_file), "--per-task", "2", "--max-new-tokens", "8",
                           "--steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| task")}
    assert set(rows) == {"loop", "other", "all"}
    assert int(rows["all"][0]) == int(rows["loop"][0]) + int(rows["other"][0]) > 0
    assert all(0.0 <= float(x) <= 1.0 for x in rows["all"][2].split())


# --- Spec-Bench's own files and formulas ------------------------------------------------------------

MT_BENCH = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


def _spec_bench_rows(path: Path, task: str) -> list[dict]:
    """Spec-Bench's ``speed.py`` selection: every row (overall), the MT-bench labels, or one category."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if task == "overall":
        return rows
    return [r for r in rows if (r["category"] in MT_BENCH if task == "mt_bench" else r["category"] == task)]


def _spec_bench_speed(method_file: Path, base_file: Path, task: str) -> tuple[float, float, float]:
    """Spec-Bench's ``evaluation/speed.py``, written out here: (tokens/s, speedup, tau). Per question,
    tokens/s = sum(new_tokens) / sum(wall_time); speedup = mean of those over the baseline's mean; tau =
    the mean of every step's accept length, pooled over all questions. (speed.py re-tokenizes the
    baseline's text to count its tokens, less Vicuna's BOS; ``new_tokens`` is the exact count.)"""
    def speeds(path):
        return [sum(r["choices"][0]["new_tokens"]) / sum(r["choices"][0]["wall_time"])
                for r in _spec_bench_rows(path, task)]

    mine, base = speeds(method_file), speeds(base_file)
    lengths = [n for r in _spec_bench_rows(method_file, task) for n in r["choices"][0]["accept_lengths"]]
    mean = sum(mine) / len(mine)
    return mean, mean / (sum(base) / len(base)), sum(lengths) / len(lengths)


def test_run_exports_spec_bench_answers_that_reproduce_its_table(tiny_run):
    """Every method's ``model_answer/<method>.jsonl``; Spec-Bench's formulas over them give the run's
    summary exactly (tokens/s, speedup, pooled tau), per task and overall."""
    answers = tiny_run / "model_answer"
    summary = list(__import__("csv").DictReader((tiny_run / "summary.csv").open()))
    methods = {r["method"] for r in summary}
    assert {p.stem for p in answers.glob("*.jsonl")} == methods and "generate" in methods
    for row in summary:
        mine = answers / f"{row['method']}.jsonl"
        tokens_per_s, speedup, tau = _spec_bench_speed(mine, answers / "generate.jsonl", row["task"])
        assert float(row["tokens_per_s"]) == pytest.approx(tokens_per_s, rel=1e-12)
        assert float(row["speedup"]) == pytest.approx(speedup, rel=1e-12)
        if row["method"] != "generate":
            assert float(row["tau"]) == pytest.approx(tau, rel=1e-12), row
    lookup = [json.loads(line) for line in (answers / "specdec_prompt_lookup.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in lookup] == [1, 2, 3] and [r["category"] for r in lookup] == ["loop", "loop",
                                                                                                    "other"]
    for r in lookup:
        choice = r["choices"][0]
        assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"]) and len(choice["turns"]) == 1


def _equal_py(file1: Path, file2: Path) -> bool:
    """Spec-Bench's ``evaluation/equal.py``: each question's ``str(turns)``, one line each, line for line."""
    def lines(path):
        return [str(json.loads(line)["choices"][0]["turns"]) for line in path.read_text().splitlines()]

    return all(a == b for a, b in zip(lines(file1), lines(file2))) and len(lines(file1)) == len(lines(file2))


def test_exported_greedy_runs_are_equal_by_spec_bench_rule(tiny_run, tmp_path):
    answers = tiny_run / "model_answer"
    for path in answers.glob("specdec_*.jsonl"):
        assert _equal_py(path, answers / "generate.jsonl"), path.name
    # the rule can fail: one changed word in one answer
    rows = [json.loads(line) for line in (answers / "specdec_prompt_lookup.jsonl").read_text().splitlines()]
    rows[1]["choices"][0]["turns"][0] += " w1"
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not _equal_py(changed, answers / "generate.jsonl")


def test_run_records_its_manifest_in_the_run_dir_report_and_wandb(tiny_run, tiny_model_dir):
    import importlib.metadata

    import torch

    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["packages"]["transformers"] == importlib.metadata.version("transformers")
    assert manifest["packages"]["torch"] == torch.__version__
    assert manifest["threads"] == 2  # the experiment's threads, in effect when the manifest was taken
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert manifest["specdec"]["commit"] == commit and isinstance(manifest["specdec"]["dirty"], bool)
    assert manifest["cpu"] and manifest["torch_backends"]["cpu_capability"]
    weights = {Path(p).name: h for p, h in manifest["model"]["sha256"].items()}
    assert weights and all(len(h) == 64 for h in weights.values())
    assert manifest["drafter_checkpoints"] == {}  # prompt lookup and the plain engine load no checkpoint
    assert commit[:10] in (tiny_run / "report.md").read_text() and commit[:10] in (tiny_run / "table.md").read_text()
    records, _ = _offline_run(tiny_run)
    (run,) = [r.run for r in records if r.HasField("run")]
    config = {_key(i): json.loads(i.value_json) for i in run.config.update}
    assert config["manifest"]["specdec"]["commit"] == commit


def test_manifest_hashes_drafter_checkpoints_of_nested_configs():
    from specdec.tooling.manifest import checkpoint_names, run_manifest

    combined = {"drafters": [{"checkpoint": "medusa-smollm2-135m"}, {"k": 3}], "checkpoint": None}
    assert checkpoint_names(combined) == ["medusa-smollm2-135m"]
    manifest = run_manifest("no/such/model", [combined, {"checkpoint": "eagle-smollm2-135m"}])
    assert sorted(Path(p).name for p in manifest["drafter_checkpoints"]) == ["eagle-smollm2-135m.pt",
                                                                              "medusa-smollm2-135m.pt"]
    assert manifest["model"] == {"name": "no/such/model", "sha256": {}}


def test_multi_turn_and_batched_answers_follow_spec_bench(tiny_model_dir):
    """A two-turn question is one answer with two turns, its steps in order; a batch gives each question
    its own tokens and steps and the batch's wall time; pooled tau is the mean over all steps, which a
    mean of per-question taus is not."""
    from specdec import PromptLookup, load_model
    from specdec.tooling.benchmark import hf_generate, pooled_tau, run_benchmark, specdec_generate, summarize
    from specdec.tooling.data import Prompt
    from specdec.tooling.spec_bench import answers

    model, tokenizer = load_model(tiny_model_dir)
    methods = [hf_generate(model, 8), specdec_generate(model, PromptLookup(k=3), 8, "specdec_lookup")]
    two_turns = [Prompt(7, "mt_bench", "writing", ("w5 w6 w7 w5 w6", "w9 w10 w9 w10"))]
    rows = run_benchmark(methods, tokenizer, two_turns, progress=False, all_turns=True)
    (answer,) = answers(rows, "specdec_lookup")
    choice = answer["choices"][0]
    mine = [r for r in rows if r["method"] == "specdec_lookup"]
    assert answer["category"] == "writing" and len(choice["turns"]) == 2
    assert choice["accept_lengths"] == mine[0]["accept_lengths"][0] + mine[1]["accept_lengths"][0]
    assert choice["wall_time"] == [r["seconds"] for r in mine]
    (row,) = [r for r in summarize(rows) if r["task"] == "overall" and r["method"] == "specdec_lookup"]
    assert row["tokens_per_s"] == pytest.approx(sum(choice["new_tokens"]) / sum(choice["wall_time"]))

    batch = [Prompt(1, "loop", "loop", ("w5 w6 w7 w5 w6 w7 w5 w6",)), Prompt(2, "loop", "loop", ("w30 w31",))]
    rows = run_benchmark(methods, tokenizer, batch, progress=False, batch_size=2)
    got = answers(rows, "specdec_lookup")
    (row,) = [r for r in rows if r["method"] == "specdec_lookup"]
    assert [a["question_id"] for a in got] == [1, 2]
    assert [a["choices"][0]["wall_time"] for a in got] == [[row["seconds"]]] * 2
    assert [sum(a["choices"][0]["accept_lengths"]) for a in got] == [sum(a["choices"][0]["new_tokens"]) for a in got]
    lengths = [a["choices"][0]["accept_lengths"] for a in got]
    assert pooled_tau(rows=[row]) == pytest.approx(sum(map(sum, lengths)) / sum(map(len, lengths)))
    rows = [{"accept_lengths": [[1, 1, 1, 1, 1, 1]]}, {"accept_lengths": [[4]]}]
    assert pooled_tau(rows) == pytest.approx(10 / 7)  # a per-prompt mean would say (1 + 4) / 2


def test_table_tau_is_spec_bench_pooled_tau_not_a_mean_of_prompt_taus(tiny_model_dir, tmp_path):
    """A drafter that is always right (the target drafting for itself) on answers of different lengths:
    the table's tau is Spec-Bench's pooled mean over the exported accept lengths, and differs from the
    mean of per-prompt taus that reports printed before (13 tokens in 5 + 5 + 3, 6 in 5 + 1)."""
    from specdec import DraftModel, load_model
    from specdec.tooling.benchmark import hf_generate, run_benchmark, specdec_generate, summarize
    from specdec.tooling.data import Prompt
    from specdec.tooling.spec_bench import export_answers

    model, tokenizer = load_model(tiny_model_dir)
    drafter = DraftModel.from_pretrained(str(tiny_model_dir), k=4)
    rows = []
    for i, n in enumerate([13, 6]):
        methods = [hf_generate(model, n), specdec_generate(model, drafter, n, "specdec_self", goodput=False)]
        rows += run_benchmark(methods, tokenizer, [Prompt(i, "t", "t", (f"w5 w{6 + i}",))], progress=False)
    folder = export_answers(rows, tmp_path)
    _, _, tau = _spec_bench_speed(folder / "specdec_self.jsonl", folder / "generate.jsonl", "overall")
    (row,) = [r for r in summarize(rows) if r["task"] == "overall" and r["method"] == "specdec_self"]
    per_prompt = [r["tau"] for r in rows if r["method"] == "specdec_self"]
    assert row["tau"] == pytest.approx(tau, rel=1e-12) == 19 / 5
    assert per_prompt == pytest.approx([13 / 3, 6 / 2]) and sum(per_prompt) / 2 != pytest.approx(tau)


@pytest.mark.parametrize("overrides, message", [
    (["sampling=sample", "sampling.temperature=0"], "config sampling.temperature=0.0 must be > 0"),
    (["sampling=sample", "sampling.top_p=1.5"], r"config sampling.top_p=1.5 must be in \(0, 1\]"),
    (["sampling=sample", "sampling.top_k=-1"], "config sampling.top_k=-1 must be >= 0"),
    (["drafter=eagle", "tree.top_k=0"], "config tree.top_k=0 is not read by drafter eagle .*set drafter.top_k"),
    (["drafter=eagle", "tree=dynamic"], "config tree=dynamic is not read by drafter eagle"),
    (["drafter=prompt_lookup", "tree.width=3"], "config tree.width=3 is not read by drafter prompt_lookup .*reads "
                                                "tree.branches, tree.depth"),
])
def test_bad_configs_fail_before_the_model_loads(monkeypatch, capsys, tmp_path, overrides, message):
    """Run as a user runs it (Hydra's main, the command line's overrides), with load_model replaced by a
    spy: the error names the setting, and no model was loaded."""
    import re

    import experiments.run as run

    loaded = []
    monkeypatch.setattr(run, "load_model", lambda *args, **kwargs: loaded.append(args) or 1 / 0)
    monkeypatch.setattr(sys, "argv", ["run", *overrides, f"hydra.run.dir={tmp_path}", "logger=none",
                                      "progress=false"])
    with pytest.raises(SystemExit):
        run.main()
    assert re.search(message, capsys.readouterr().err), message
    assert loaded == []


def test_a_tree_setting_the_drafter_reads_is_accepted():
    validate(compose_with("drafter=prompt_lookup", "tree.depth=7"), ["drafter=prompt_lookup", "tree.depth=7"])
    validate(compose_with("drafter=truncated", "tree=dynamic"), ["drafter=truncated", "tree=dynamic"])
