"""`rlexport serve` as a user starts it (the venv's bin/rlexport, venv not activated), talked to over HTTP on
127.0.0.1: plain serving answers /v1/completions with the training-time numbers; `--follow` on a verl run folder
swaps a newly completed step into the same server process, ignores a step the tracker does not name yet, and
survives a step with a truncated rank file; a critic (pooling runner) follows too. Three engine starts in all."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from conftest import expected
from factories import FIXTURES
from rlexport.formats import open_checkpoint
from rlexport.verify.numbers import reference

pytestmark = pytest.mark.vllm
CASE = "verl_fsdp2_actor_qwen2"
TOL = 2e-3  # float32 engine vs float32 training stack
ENGINE_ARGS = ["--", "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "8"]
RLEXPORT = Path(sys.executable).parent / "rlexport"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    """bin/rlexport with a PATH that does not hold the venv (not activated), one engine at a time."""
    venv_bin = str(RLEXPORT.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != venv_bin)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([str(RLEXPORT), "serve", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env)


def http(port: int, path: str, body: dict | None = None, timeout: float = 60):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode() if body else None,
                                 {"content-type": "application/json"}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def wait_for(check, timeout: float, proc: subprocess.Popen, log: Path, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"rlexport serve exited ({proc.returncode}): {log.read_text()[-3000:]}"
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-3000:]}")


def state(port: int) -> dict:
    status, body = http(port, "/rlexport/checkpoint", timeout=10)
    return body if status == 200 else {}


def numbers(port: int, model: str, prompts) -> tuple[list, list]:
    logprobs, greedy = [], []
    for p in prompts:
        status, out = http(port, "/v1/completions", {"model": model, "prompt": p, "max_tokens": 12, "temperature": 0,
                                                     "prompt_logprobs": 0, "ignore_eos": True,
                                                     "return_token_ids": True})
        assert status == 200, out
        c = out["choices"][0]
        logprobs.append([c["prompt_logprobs"][j][str(p[j])]["logprob"] for j in range(1, len(p))])
        greedy.append(c["token_ids"])
    return logprobs, greedy


def max_diff(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> tuple[int, list]:
    """Signal rlexport serve; (exit code, processes it started that outlived it)."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    assert kids, "no vLLM server under rlexport serve"
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    _, alive = psutil.wait_procs(kids, timeout=30)
    return code, [k for k in alive if k.status() != psutil.STATUS_ZOMBIE]


def perturbed_step(run: Path, src_step: Path, n: int, *, seed: int, truncate: bool = False) -> Path:
    """A copy of `src_step` as global_step_N with every weight moved (the numbers change measurably);
    `truncate`: rank 1's file cut in half, as a copy interrupted mid-file."""
    import torch.distributed.tensor  # noqa: F401 - DTensor for the weights-only unpickler
    dst = run / f"global_step_{n}"
    shutil.copytree(src_step, dst)
    for f in sorted(dst.glob("*/model_world_size_*_rank_*.pt")):
        sd = torch.load(f, weights_only=True)
        g = torch.Generator().manual_seed(seed)
        for t in sd.values():
            local = t._local_tensor if hasattr(t, "_local_tensor") else t
            if local.is_floating_point() and local.numel():
                local.add_(0.05 * torch.randn(local.shape, generator=g, dtype=local.dtype))
        torch.save(sd, f)
    if truncate:
        f = next(dst.glob("*/model_world_size_2_rank_1.pt"))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return dst


def test_every_dev_mode_route_is_a_guarded_control_path():
    from rlexport.engines.follow.guard import control_paths
    paths = control_paths()
    assert {"/pause", "/resume", "/collective_rpc", "/reset_prefix_cache", "/sleep", "/update_weights"} <= paths
    assert not paths & {"/v1/completions", "/v1/models", "/health", "/pooling", "/rlexport/checkpoint"}


def test_serve_answers_with_the_training_time_numbers_and_stops_everything(tmp_path):
    exp, port, log = expected(CASE), free_port(), tmp_path / "serve.log"
    ckpt = FIXTURES / CASE / "ckpt"
    proc = start([str(ckpt), "--port", str(port), *ENGINE_ARGS], log)
    try:
        wait_for(lambda: http(port, "/health", timeout=5)[0] == 200, 900, proc, log, "the server")
        status, models = http(port, "/v1/models")
        assert status == 200 and models["data"][0]["id"] == str(ckpt)
        logprobs, greedy = numbers(port, str(ckpt), exp["prompts"])
        assert max_diff(logprobs, exp["policy"]["logprobs"]) < TOL
        assert greedy == exp["policy"]["greedy"]
        # without --follow the control endpoints are not there at all
        assert http(port, "/pause", {})[0] in (403, 404)
        code, orphans = stop(proc)
        assert code == 0 and not orphans, (code, orphans)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_follow_swaps_complete_steps_in_place_and_ignores_incomplete_and_broken_ones(tmp_path):
    exp, port, log = expected(CASE), free_port(), tmp_path / "follow.log"
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / CASE / "ckpt", run)
    step4, staged = run / "global_step_4", tmp_path / "staged"
    step6 = perturbed_step(staged, step4, 6, seed=1)  # made before the engine starts, moved in when needed
    step8 = perturbed_step(staged, step6, 8, seed=2, truncate=True)
    ref = reference(open_checkpoint(step6), "policy", exp["prompts"], weights=False).numbers
    proc = start([str(run), "--follow", "--poll", "0.5", "--port", str(port), *ENGINE_ARGS], log)
    model, prompts = str(run), exp["prompts"]
    try:
        first = wait_for(lambda: state(port).get("tag") == "global_step_4" and state(port), 900, proc, log,
                         "global_step_4 served")
        wait_for(lambda: http(port, "/health", timeout=5)[0] == 200, 60, proc, log, "health")
        lp4, greedy4 = numbers(port, model, prompts)
        assert max_diff(lp4, exp["policy"]["logprobs"]) < TOL and greedy4 == exp["policy"]["greedy"]
        # the control endpoints: not without the supervisor's token, even from this host
        assert http(port, "/pause", {})[0] == 403
        assert http(port, "/collective_rpc", {"method": "reload_weights"})[0] == 403

        # a complete-looking step the tracker does not name yet is not served
        step6.rename(run / step6.name)
        wait_for(lambda: "global_step_6: not complete" in log.read_text(), 30, proc, log, "step 6 noticed")
        time.sleep(3)  # six more polls
        assert state(port)["tag"] == "global_step_4"
        assert max_diff(numbers(port, model, prompts[:1])[0], lp4[:1]) < 1e-6

        # named by the tracker: swapped in within 30 s, same server process
        t0 = time.monotonic()
        (run / "latest_checkpointed_iteration.txt").write_text("6")
        now = wait_for(lambda: state(port).get("tag") == "global_step_6" and state(port), 30, proc, log,
                       "global_step_6 served")
        assert time.monotonic() - t0 < 30
        assert now["server_pid"] == first["server_pid"] and now["swaps"] == 1 and now["restarts"] == 0
        lp6, greedy6 = numbers(port, model, prompts)
        assert max_diff(lp6, ref.logprobs) < TOL and greedy6 == ref.greedy
        assert max_diff(lp6, lp4) > 10 * TOL  # the swap changed what is served
        assert "swap global_step_4 -> global_step_6: started" in log.read_text()
        assert "swap global_step_4 -> global_step_6: done" in log.read_text()

        # a step with a truncated rank file: logged in one line, never served, the server keeps step 6
        step8.rename(run / step8.name)
        (run / "latest_checkpointed_iteration.txt").write_text("8")
        line = wait_for(lambda: [x for x in log.read_text().splitlines() if "global_step_8: not served" in x],
                        30, proc, log, "step 8 refused")
        assert len(line) == 1 and str(run / "global_step_8" / "actor" / "model_world_size_2_rank_1.pt") in line[0]
        after = state(port)
        assert after["tag"] == "global_step_6" and after["server_pid"] == first["server_pid"]
        assert max_diff(numbers(port, model, prompts[:1])[0], lp6[:1]) < 1e-6

        code, orphans = stop(proc, signal.SIGINT)
        assert code == 0 and not orphans, (code, orphans)
    finally:
        if proc.poll() is None:
            proc.kill()


def values(port: int, model: str, prompts) -> list[list[float]]:
    out = []
    for p in prompts:
        status, body = http(port, "/pooling", {"model": model, "input": p, "task": "token_classify"})
        assert status == 200, body
        out.append([float(v) for v in torch.tensor(body["data"][0]["data"]).reshape(-1).tolist()])
    return out


def test_follow_a_critic_through_the_pooling_runner(tmp_path):
    case = "verl_fsdp2_critic_qwen2"
    exp, port, log = expected(case), free_port(), tmp_path / "critic.log"
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / case / "ckpt", run)
    step6 = perturbed_step(tmp_path / "staged", run / "global_step_4", 6, seed=3)
    ref = reference(open_checkpoint(step6 / "critic"), "value", exp["prompts"], weights=False).numbers.scores
    proc = start([str(run), "--follow", "--target", "value", "--poll", "0.5", "--port", str(port), *ENGINE_ARGS],
                 log)
    try:
        first = wait_for(lambda: state(port).get("tag") == "global_step_4" and state(port), 900, proc, log,
                         "global_step_4 served")
        v4 = values(port, str(run), exp["prompts"])
        assert max_diff(v4, exp["value"]) < TOL
        step6.rename(run / step6.name)
        (run / "latest_checkpointed_iteration.txt").write_text("6")
        now = wait_for(lambda: state(port).get("tag") == "global_step_6" and state(port), 30, proc, log,
                       "global_step_6 served")
        assert now["server_pid"] == first["server_pid"] and now["restarts"] == 0
        v6 = values(port, str(run), exp["prompts"])
        assert max_diff(v6, ref) < TOL and max_diff(v6, v4) > 10 * TOL
        code, orphans = stop(proc)
        assert code == 0 and not orphans, (code, orphans)
    finally:
        if proc.poll() is None:
            proc.kill()
