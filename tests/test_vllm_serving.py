"""vLLM serves what specdec exports: the embedded default with the shipped reference-layout EAGLE-3 head
(exported by :func:`specdec.export.export_checkpoint`) and with n-gram drafting, in vLLM's CPU build (.venv-vllm,
``make vllm-env``), a server on loopback, 3 prompts x 16 greedy tokens.

Greedy output must equal ``model.generate``'s token for token, and the head's drafts must be accepted some of
the time (a head vLLM read wrongly drafts nothing it accepts: an exported head of the wrong layout, or fused
layers vLLM numbers differently, accepts 0). Each server takes about 100 s to start here, so the test is slow;
without .venv-vllm it is skipped with one line saying so (CI does not build vLLM's environment).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from specdec.export import export_checkpoint
from specdec.tooling.peers import SPEC_COUNTERS, Client, VllmServer, complete, export_hf, parse_metrics, peer_python

PROMPTS = ["Explain in three sentences why the sky is blue.", "Write a haiku about a lighthouse.",
           "List three uses of a paperclip."]
METHODS = {"ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 2},
           "eagle3": {"method": "eagle3", "num_speculative_tokens": 3}}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_vllm_serves_the_export_with_target_identical_output(smollm, method, tmp_path_factory):
    launcher = peer_python()
    if launcher is None:
        pytest.skip("vLLM's environment .venv-vllm is not built here (`make vllm-env`; CI does not build it): "
                    "the serving test did not run")
    from specdec.text import encode

    model, tokenizer = smollm[:2]
    root = tmp_path_factory.getbasetemp()
    model_dir = export_hf(model, tokenizer, root, "smollm2-135m-float32").resolve()
    spec = dict(METHODS[method])
    if method == "eagle3":
        head = export_checkpoint("eagle3-reference-smollm2-135m", root / "eagle3-head", target=model,
                                 verifier=str(model_dir))
        spec["model"] = str(head.resolve())
    prompts = [encode(tokenizer, [{"role": "user", "content": p}]).reshape(-1).tolist() for p in PROMPTS]
    eos = [tokenizer.eos_token_id]
    server = VllmServer(method, model_dir, launcher.absolute(), root / f"vllm_{method}.log", spec)
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        server.start()
        client = Client(server.port)
        outputs = [complete(client, method, [ids], 16, eos)[0][0] for ids in prompts]
        counters = parse_metrics(Client(server.port).request("GET", "/metrics")[1].decode())
    for ids, got in zip(prompts, outputs):
        ids = torch.tensor([ids])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
        assert got == want[0, ids.shape[1]:].tolist()
    drafts, accepted = counters.get(SPEC_COUNTERS[0], 0), counters.get(SPEC_COUNTERS[2], 0)
    print(f"vllm {method}: {int(drafts)} drafts, {int(accepted)} accepted over {len(prompts)} x 16 tokens")
    if method == "eagle3":  # n-gram lookup may find nothing to draft in 16 tokens; the head always drafts
        assert drafts > 0 and accepted > 0


def test_parity_table_flags_a_task_past_ten_percent_and_counts_identical_outputs():
    """experiments.vllm_eagle3_parity's verdict: the gap is relative to specdec's tau, one task past 10% fails
    the check, and the identical-output count is per task."""
    from experiments.vllm_eagle3_parity import table

    rows = [{"id": "a", "task": "qa"}, {"id": "b", "task": "qa"}, {"id": "c", "task": "rag"}]
    mine = {"tasks": {"qa": {"pooled_tau": 1.50}, "rag": {"pooled_tau": 1.20}}, "outputs": {"a": [1], "b": [2], "c": [3]}}
    theirs = {"tasks": {"qa": {"mean_acceptance_length": 1.60}, "rag": {"mean_acceptance_length": 1.25}},
              "outputs": {"a": [1], "b": [9], "c": [3]}}
    text, ok = table(theirs, mine, rows, 3)
    assert ok and "| qa | 1.600 | 1.500 | 6.7% | 1/2 |" in text and "| rag | 1.250 | 1.200 | 4.2% | 1/1 |" in text
    theirs["tasks"]["rag"]["mean_acceptance_length"] = 1.33  # 10.8% above specdec's 1.20
    text, ok = table(theirs, mine, rows, 3)
    assert not ok and "NOT within 10%" in text
