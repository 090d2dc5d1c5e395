"""Packaging: ``import specdec`` stays light, and a wheel built from the checkout installs into a fresh
virtualenv with the core dependencies only and generates; with ``[experiments]`` it runs the default
experiment end to end outside the checkout, configs and Spec-Bench included, and takes a config
directory of the user's own (Hydra's ``--config-dir``).

The wheel test builds once (a copy of the files git would check out, so a stray build/ never leaks in),
installs ``torch==2.13.0`` first (the CPU build pip takes from this machine's disk; the library itself
asks for ``torch>=2.4``) and then the wheel from the package index. About a minute; marked slow.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import save_with_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("triton", "hydra", "wandb", "matplotlib", "accelerate")  # never imported by `import specdec`
TORCH = os.environ.get("SPECDEC_TEST_TORCH", "torch==2.13.0")

WHO_IMPORTS = textwrap.dedent("""
    import json, sys

    EXTRAS = {extras!r}
    importers = {{}}

    class Spy:  # notes which file's code asks for each extra (a meta path finder sees every import)
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in EXTRAS:
                frame = sys._getframe(1)
                while frame and frame.f_code.co_filename.startswith("<frozen"):
                    frame = frame.f_back
                importers.setdefault(top, set()).add(frame.f_code.co_filename if frame else "?")
            return None

    sys.meta_path.insert(0, Spy())
    import specdec
    print(json.dumps({{"loaded": [m for m in EXTRAS if m in sys.modules],
                       "importers": {{k: sorted(v) for k, v in importers.items()}}}}))
""")


def test_import_specdec_imports_no_extra():
    """torch and transformers probe for triton and accelerate themselves; specdec's own modules
    import none of the extras, and hydra, wandb and matplotlib are not loaded at all."""
    done = subprocess.run([sys.executable, "-c", WHO_IMPORTS.format(extras=EXTRAS)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert not {"hydra", "wandb", "matplotlib"} & set(seen["loaded"])
    ours = (str(ROOT / "specdec"), str(ROOT / "kernels" / "specdec_kernels"))
    by_us = {m: [f for f in files if f.startswith(ours)] for m, files in seen["importers"].items()}
    assert not any(by_us.values()), by_us


def _checkout_copy(dest: Path) -> Path:
    """The files a clone has (tracked and new, not ignored), copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes((ROOT / name).read_bytes())
    return dest


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


CORE_CHECK = textwrap.dedent("""
    import sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import specdec
    from specdec.tooling.data import load_prompts

    assert "site-packages" in specdec.__file__, specdec.__file__
    assert not [m for m in {extras!r} if m in sys.modules]
    assert len(load_prompts()) == 480  # Spec-Bench, shipped inside the wheel
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    out = specdec.generate(model, ids, specdec.PromptLookup(k=3), max_new_tokens=12, return_dict_in_generate=True)
    want = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out.sequences, want), (out.sequences, want)
    print("core ok", out.stats.tau)
""")


@pytest.mark.slow
def test_wheel_installs_lean_and_runs_the_experiments_outside_the_checkout(tmp_path):
    src = _checkout_copy(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
          str(tmp_path / "dist"), str(src)])
    (wheel,) = (tmp_path / "dist").glob("specdec-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", TORCH])
    _run([py, "-m", "pip", "install", "-q", str(wheel)])  # the core dependencies only
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    installed = _run([py, "-m", "pip", "list", "--format", "json"], env=env).stdout
    assert not {p["name"].lower() for p in json.loads(installed)} & {*EXTRAS, "hydra-core"}
    _run([py, "-m", "pip", "check"], env=env)
    assert "core ok" in _run([py, "-c", CORE_CHECK.format(extras=EXTRAS)], cwd=elsewhere, env=env).stdout

    # the experiments: the extra, then the console script from a directory that is not the checkout
    _run([py, "-m", "pip", "install", "-q", f"{wheel}[experiments]"])
    tiny = save_with_tokenizer(tiny_llama(), tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) + "\n" for i, c, t in
                               [(1, "loop", "w5 w6 w7 w5 w6 w7 w5 w6"), (2, "other", "w30 w31 w40 w41")]))
    mine = elsewhere / "my_configs" / "drafter"
    mine.mkdir(parents=True)
    (mine / "my_lookup.yaml").write_text("name: my_lookup\n_target_: specdec.drafters.PromptLookup\nk: 2\n")
    args = [f"model.name={tiny}", f"dataset.path={prompts}", "dataset.per_task=null", "dataset.name=tiny",
            "max_new_tokens=8", "threads=1", "progress=false", "hf_prompt_lookup_num_tokens=0"]
    _run([str(venv / "bin" / "specdec-run"), "--config-dir", "my_configs", "drafter=my_lookup", *args,
          "hydra.run.dir=run"], cwd=elsewhere, env=env)
    run = elsewhere / "run"
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"generate", "specdec_no_draft", "specdec_my_lookup", "specdec_prompt_lookup"}
    assert all(r["matches_baseline"] for r in rows)
    assert (run / "speedup.pdf").is_file() and list(run.glob("wandb/offline-run-*/run-*.wandb"))
    # the default experiment's own config and data: Spec-Bench from the wheel, one prompt per task
    done = _run([py, "-m", "specdec_experiments.run", "--cfg", "job", "--resolve"], cwd=elsewhere, env=env)
    assert "spec_bench_sample" in done.stdout and "lookup_else_recycling" in done.stdout
    _run([py, "-m", "specdec_experiments.report", str(run), "--out", "report"], cwd=elsewhere, env=env)
    assert (elsewhere / "report" / "report.md").is_file()
