"""The vLLM peer without vLLM: the skip line on a machine without .venv-vllm, and the request, response,
metrics and timing code against a fake server (stdlib http.server) that answers like `vllm serve`."""

import json
import threading
import time
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from specdec.tooling.benchmark import hf_generate, markdown_table, pooled_tau, run_benchmark, summarize
from specdec.tooling.data import Prompt
from specdec.tooling.peers import Client, VllmServer, complete, parse_metrics, vllm_method, vllm_methods

from conftest import save_with_tokenizer, tiny_llama

EOS = 2
METRICS = """# HELP vllm:spec_decode_num_drafts Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts counter
vllm:spec_decode_num_drafts_total{{engine="0",model_name="m"}} {drafts}
vllm:spec_decode_num_draft_tokens_total{{engine="0",model_name="m"}} {draft_tokens}
vllm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="m"}} {accepted}
vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",model_name="m",position="0"}} {pos0}
vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",model_name="m",position="1"}} {pos1}
vllm:e2e_request_latency_seconds_sum{{engine="0",model_name="m"}} {e2e}
vllm:e2e_request_latency_seconds_count{{engine="0",model_name="m"}} {requests}
"""


class FakeVllm(BaseHTTPRequestHandler):
    """Answers /health, /metrics and /v1/completions; ``answer(prompt ids) -> new ids`` makes the text.
    Each completion adds 2 drafts of 3 tokens, 3 accepted (2 at position 0, 1 at 1) and 0.01 s of latency."""

    answer = staticmethod(lambda ids: [5, 6, EOS])
    counters = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "pos0": 0, "pos1": 0, "e2e": 0.0, "requests": 0}
    bodies: list = []
    omit_eos = False

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self._send(200, b"")
        elif self.path == "/metrics":
            self._send(200, METRICS.format(**self.counters).encode(), "text/plain")
        else:
            self._send(404, b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["max_tokens"] < 1:
            return self._send(400, b'{"error": "max_tokens must be at least 1"}')
        type(self).bodies.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        choices = []
        for i, ids in enumerate(prompts):
            new = self.answer(ids)[: body["max_tokens"]]
            stop = bool(new) and new[-1] in body["stop_token_ids"]
            if stop and self.omit_eos:
                new = new[:-1]
            choices.append({"index": i, "text": "", "token_ids": new, "finish_reason": "stop" if stop else "length"})
        c = type(self).counters
        c.update(drafts=c["drafts"] + 2, draft_tokens=c["draft_tokens"] + 6, accepted=c["accepted"] + 3,
                 pos0=c["pos0"] + 2, pos1=c["pos1"] + 1, e2e=c["e2e"] + 0.01, requests=c["requests"] + 1)
        self._send(200, json.dumps({"choices": list(reversed(choices))}).encode())


@pytest.fixture
def fake():
    FakeVllm.bodies = []
    FakeVllm.omit_eos = False
    FakeVllm.counters = dict.fromkeys(FakeVllm.counters, 0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVllm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_without_the_environment_every_vllm_method_is_skipped_with_one_line(tmp_path, capsys):
    with ExitStack() as stack:
        methods, notes = vllm_methods({"plain": None, "ngram": {"method": "ngram"}}, None, None, "m", 8, [EOS],
                                      tmp_path, stack, venv=tmp_path / "no-venv")
    assert methods == []
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "skipped" in printed[0] and "make vllm-env" in printed[0]
    assert "vllm_plain" in printed[0] and "vllm_ngram" in printed[0] and notes == printed


def test_no_methods_asked_is_silent(tmp_path, capsys):
    assert vllm_methods({}, None, None, "m", 8, [EOS], tmp_path, ExitStack()) == ([], [])
    assert capsys.readouterr().out == ""


def test_complete_sends_token_ids_greedy_and_reads_them_back(fake):
    new, seconds = complete(Client(fake), "plain", [[1, 7, 8], [1, 9]], 16, [EOS])
    assert new == [[5, 6, EOS], [5, 6, EOS]]  # in prompt order, whatever order the choices came in
    assert seconds > 0
    body = FakeVllm.bodies[-1]
    assert body["prompt"] == [[1, 7, 8], [1, 9]] and body["temperature"] == 0.0 and body["max_tokens"] == 16
    assert body["stop_token_ids"] == [EOS] and body["ignore_eos"] is False and body["return_token_ids"] is True
    complete(Client(fake), "plain", [[1, 7, 8]], 2, [EOS])
    assert FakeVllm.bodies[-1]["prompt"] == [1, 7, 8]  # one prompt: a flat list of ids


def test_an_eos_the_response_leaves_out_is_put_back(fake):
    FakeVllm.omit_eos = True
    assert complete(Client(fake), "plain", [[1, 3]], 16, [EOS])[0] == [[5, 6, EOS]]
    assert complete(Client(fake), "plain", [[1, 3]], 2, [EOS])[0] == [[5, 6]]  # cut by max_tokens: no EOS


def test_an_error_status_is_raised_with_the_body(fake):
    with pytest.raises(RuntimeError, match="400.*max_tokens"):
        complete(Client(fake), "plain", [[1]], 0, [EOS])


def test_parse_metrics_sums_label_sets_and_keeps_positions():
    m = parse_metrics(METRICS.format(drafts=4, draft_tokens=12, accepted=5, pos0=3, pos1=2, e2e=0.5, requests=2))
    assert m["vllm:spec_decode_num_drafts_total"] == 4 and m["vllm:e2e_request_latency_seconds_sum"] == 0.5
    assert m[("vllm:spec_decode_num_accepted_tokens_per_pos_total", 1)] == 2


def _server(port: int, speculative: dict | None) -> VllmServer:
    return VllmServer("ngram" if speculative else "plain", Path("."), Path("vllm"), Path("log"), speculative,
                      port=port)


def test_a_speculative_peer_row_has_tau_from_the_counters_and_its_http_overhead(fake):
    method = vllm_method(_server(fake, {"method": "ngram"}), 8, [EOS])
    ids = torch.tensor([[0, 1, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1]])  # left padding is not sent
    method.prepare(ids, mask)
    start = time.perf_counter()
    sequences, stats = method.run(ids, mask)
    wall = time.perf_counter() - start
    assert FakeVllm.bodies[-1]["prompt"] == [1, 7, 8]
    assert sequences.tolist() == [[0, 1, 7, 8, 5, 6, EOS]]  # (B, S + T)
    stats, extra = method.finish()
    assert (stats.drafted, stats.accepted, stats.new_tokens, stats.accepted_at) == (6, 3, 3, [2, 1])
    assert stats.steps == 1 and extra["steps"] == 1 and extra["vllm_drafts"] == 2  # 3 new, 3 accepted: floor 1
    assert extra["server_s"] == pytest.approx(0.01)
    assert 0 < extra["server_s"] + extra["http_overhead_s"] <= wall  # the request's round trip, within the call
    assert extra["peer_idle_cpu_s"] == 0.0  # no process: nothing to count


def test_a_plain_peer_has_no_stats(fake):
    method = vllm_method(_server(fake, None), 8, [EOS])
    method.run(torch.tensor([[1, 3]]), torch.tensor([[1, 1]]))
    stats, extra = method.finish()
    assert stats is None and "steps" not in extra and extra["http_overhead_s"] < 5


def test_peer_rows_sit_beside_the_baseline_in_the_same_table(fake, tmp_path):
    from specdec import load_model

    model, tokenizer = load_model(save_with_tokenizer(tiny_llama(), tmp_path / "tiny"))

    def greedy(ids):  # the fake server decodes with the same model
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        return out[0, len(ids):].tolist()

    FakeVllm.answer = staticmethod(greedy)
    methods = [hf_generate(model, 6), vllm_method(_server(fake, {"method": "ngram"}), 6, [EOS], "vllm_ngram")]
    rows = run_benchmark(methods, tokenizer, [Prompt(1, "t", "c", ("w5 w6 w7 w5 w6",))], progress=False,
                         eos_token_ids=[EOS])
    peer = rows[-1] if rows[-1]["method"] == "vllm_ngram" else rows[0]
    assert peer["matches_baseline"] and peer["seconds"] > 0 and peer["http_overhead_s"] is not None
    steps = max(peer["new_tokens"] - 3, 1)  # the fake accepts 3 drafts per request
    assert peer["steps"] == steps and peer["tau"] == pooled_tau([peer]) == peer["new_tokens"] / steps
    summary = summarize(rows)
    table = markdown_table(summary)
    assert "vllm_ngram tok/s" in table and "HTTP overhead" in table and "not subtracted" in table


def test_prepare_runs_outside_the_timing_and_the_warm_up_counts_in_the_first_row(tmp_path):
    from specdec import load_model
    from specdec.tooling.benchmark import Method

    model, tokenizer = load_model(save_with_tokenizer(tiny_llama(), tmp_path / "tiny"))
    base = hf_generate(model, 4)
    calls = []

    def prepare(ids, mask):  # stands for compiling: 0.2 s per call, never inside the timed region
        calls.append(tuple(ids.shape))
        time.sleep(0.2)

    slow = Method("compiled", base.run, prepare=prepare)
    prompts = [Prompt(1, "t", "c", ("w5 w6 w7",)), Prompt(2, "t", "c", ("w9 w10",))]
    rows = [r for r in run_benchmark([base, slow], tokenizer, prompts, progress=False) if r["method"] == "compiled"]
    assert len(calls) == 3  # the warm-up and each prompt
    assert rows[0]["untimed_s"] >= 0.4 and 0.2 <= rows[1]["untimed_s"] < 0.4  # the warm-up's in the first row
    assert all(r["seconds"] < 0.2 for r in rows)
    table = markdown_table(summarize(rows + [dict(r, method="generate") for r in rows]))
    assert "compiled:" not in table  # 0.6 s in all: under a second of preparation is not noted
