"""`rlexport serve` without an engine: the command it starts, the run-folder rules of --follow (steps hooks,
settling, refusals), pinning against rotation, the guard on the control endpoints, and the supervisor's
decisions (swap, restart on a new shape, restart on the last good step after a failed swap). The real server is
in tests/vllm/test_serve_vllm.py."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from factories import FIXTURES
from rlexport.cli import cli
from rlexport.engines import follow
from rlexport.engines.follow import guard
from rlexport.engines.follow.pin import Pin
from rlexport.engines.follow.watch import Watch, order
from rlexport.engines.serving import SERVER_MODULE, serve_command, served
from rlexport.formats import Step, steps_of

VERL = FIXTURES / "verl_fsdp2_actor_qwen2" / "ckpt"


def test_the_server_is_started_from_this_interpreter_on_loopback():
    args, _ = served(VERL)
    cmd = serve_command(args, extra=("--dtype", "float32"))
    assert cmd[:3] == [sys.executable, "-m", SERVER_MODULE]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8000"
    assert json.loads(cmd[cmd.index("--model-loader-extra-config") + 1])["checkpoint"] == str(VERL.resolve())
    assert cmd[-2:] == ["--dtype", "float32"]


def test_print_only_and_one_line_errors_before_any_engine(tmp_path, capsys):
    r = CliRunner().invoke(cli, ["serve", str(VERL), "--print-only", "--host", "0.0.0.0", "--port", "9001"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"{sys.executable} -m {SERVER_MODULE} ") and "--host 0.0.0.0 --port 9001" in r.output
    bad = tmp_path / "run" / "global_step_1" / "actor"
    bad.mkdir(parents=True)
    (bad / "model_world_size_1_rank_0.pt").write_bytes(b"PK\x03\x04 cut")
    from rlexport.cli import main
    with pytest.raises(SystemExit) as e:  # the real entry point: one line, exit 2, no engine started
        main(["serve", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error[") and "vLLM" not in err[0]
    with pytest.raises(SystemExit) as e:  # one checkpoint is not a run to follow: said, not waited on
        main(["serve", str(FIXTURES / "trl_vhead_full" / "ckpt"), "--follow"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error[not-a-run-folder]" in err
    r = CliRunner().invoke(cli, ["serve", str(VERL), "--follow", "--tag", "global_step_4"])
    assert r.exit_code == 2 and "--follow" in r.output


def test_world_size_and_control_host():
    assert follow.world_size(("--tensor-parallel-size", "4", "-pp=2")) == 8
    assert follow.world_size(("--dtype", "float32")) == 1 and follow.world_size(("-dp", "2")) is None
    assert follow.control_host("0.0.0.0") == "127.0.0.1" and follow.control_host("::") == "[::1]"
    assert follow.control_host("10.1.2.3") == "10.1.2.3"


# ---- run folders: which steps are complete ----

def test_verl_steps_complete_once_the_tracker_names_them(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(VERL, run)
    shutil.copytree(run / "global_step_4", run / "global_step_6")
    got = {s.tag: s for s in steps_of(run)}
    assert got["global_step_4"].complete and not got["global_step_6"].complete
    assert "names step 4" in got["global_step_6"].why
    (run / "latest_checkpointed_iteration.txt").write_text("")  # verl opens it with "w": caught mid-write
    assert not any(s.complete for s in steps_of(run))
    (run / "latest_checkpointed_iteration.txt").write_text("6")
    assert [s.complete for s in steps_of(run)] == [True, True]
    assert steps_of(run / "global_step_4") == []  # a step is not a run


def test_trainer_checkpoints_complete_with_trainer_state_or_as_llama_factory_ppo(tmp_path):
    run = tmp_path / "out"
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoint-10" / "model.safetensors").write_bytes(b"")
    (run / "checkpoint-5").mkdir()
    (run / "checkpoint-5" / "trainer_state.json").write_text("{}")
    got = steps_of(run)
    assert [(s.tag, s.complete) for s in got] == [("checkpoint-5", True), ("checkpoint-10", False)]
    lf = steps_of(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt")  # no marker at all: complete, settled by polls
    assert [(s.tag, s.complete) for s in lf] == [("checkpoint-6", True)] and "LLaMA-Factory" in lf[0].why


def test_deepspeed_tags_complete_once_latest_names_them(tmp_path):
    run = tmp_path / "_actor"
    shutil.copytree(FIXTURES / "ds_z2_ws2" / "ckpt" / "global_step4", run / "global_step4")
    shutil.copytree(run / "global_step4", run / "global_step8")
    assert [s.complete for s in steps_of(run)] == [False, False]
    (run / "latest").write_text("global_step4")
    assert [(s.tag, s.complete) for s in steps_of(run)] == [("global_step4", True), ("global_step8", False)]


def test_watch_serves_settled_complete_steps_newest_first_and_refuses_once(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(VERL, run)
    w = Watch(run)
    assert w.poll(None) == []  # first sight: not settled yet
    assert [s.tag for s in w.poll(None)] == ["global_step_4"]
    shutil.copytree(run / "global_step_4", run / "global_step_6")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("rlexport.serve")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        for _ in range(3):
            assert w.poll("global_step_4") == []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert sum("global_step_6: not complete" in r.getMessage() for r in records) == 1
    (run / "latest_checkpointed_iteration.txt").write_text("6")
    w.poll("global_step_4")
    (ready,) = w.poll("global_step_4")
    w.refuse(ready, "error[x]: broken")
    assert w.poll("global_step_4") == []  # refused in this very state: not retried
    (run / "global_step_6" / "actor" / "fsdp_config.json").write_text('{"FSDP_version": 2, "world_size": 2}\n')
    w.poll("global_step_4")
    assert [s.tag for s in w.poll("global_step_4")] == ["global_step_6"]  # changed since: tried again
    assert order("global_step_10") > order("global_step_9")


def test_a_pinned_folder_stays_readable_after_rotation_deletes_it(tmp_path):
    src = tmp_path / "global_step_4"
    (src / "actor").mkdir(parents=True)
    (src / "actor" / "w.bin").write_bytes(b"weights")
    pin = Pin(src, tmp_path)
    shutil.rmtree(src)
    assert (pin.path / "actor" / "w.bin").read_bytes() == b"weights"
    pin.close()
    assert not pin.root.exists()


# ---- the guard on the control endpoints ----

def test_is_local():
    assert guard.is_local("127.0.0.1", "127.0.0.1") and guard.is_local("::1", "::1")
    assert guard.is_local("::ffff:127.0.0.1", "::ffff:127.0.0.1")
    assert guard.is_local("10.0.0.5", "10.0.0.5")  # this host, through its own address
    assert not guard.is_local("10.0.0.9", "10.0.0.5") and not guard.is_local(None, "10.0.0.5")


def _call(app, path, *, client, server="10.0.0.5", headers=()):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "path": path, "method": "POST" if path != guard.STATE_PATH else "GET",
             "client": (client, 5555), "server": (server, 8000), "headers": list(headers), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], dict(sent[0].get("headers", [])), b"".join(m.get("body", b"") for m in sent[1:])


def test_guard_keeps_control_endpoints_to_the_supervisor_on_this_host(tmp_path, monkeypatch):
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"tag": "global_step_6", "server_pid": 1}))
    monkeypatch.setenv(guard.TOKEN_ENV, "s3cret")
    monkeypatch.setenv(guard.STATE_ENV, str(state))
    monkeypatch.setattr(guard, "control_paths", lambda: frozenset({"/pause", "/collective_rpc"}))

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    g = guard.Guard(app)
    token = [(guard.TOKEN_HEADER, b"s3cret")]
    assert _call(g, "/pause", client="127.0.0.1")[0] == 403                       # no token
    assert _call(g, "/collective_rpc/", client="10.0.0.9", headers=token)[0] == 403  # token, remote
    assert _call(g, "/pause", client="127.0.0.1", headers=[(guard.TOKEN_HEADER, b"guess")])[0] == 403
    assert _call(g, "/pause", client="127.0.0.1", headers=token)[0] == 200
    assert _call(g, "/pause", client="10.0.0.5", headers=token)[0] == 200        # this host's own address
    status, headers, body = _call(g, "/v1/completions", client="10.0.0.9")
    assert status == 200 and headers[b"x-rlexport-checkpoint"] == b"global_step_6"
    status, _, body = _call(g, guard.STATE_PATH, client="10.0.0.9")
    assert status == 200 and json.loads(body)["tag"] == "global_step_6"


# ---- the supervisor's decisions, with a stand-in for the server process ----

class FakeEngine:
    def __init__(self, log, fail_swap=False):
        self.log, self.fail_swap, self.pid = log, fail_swap, 42

    def swap(self, options):
        self.log.append(("swap", options["checkpoint"]))
        if self.fail_swap:
            raise follow.EngineError("POST /collective_rpc: HTTP 500: Cannot copy out of meta tensor")
        return 1

    def resume(self):
        self.log.append(("resume",))

    def stop(self):
        self.log.append(("stop",))


def _supervisor(monkeypatch, tmp_path, fail_swap=False):
    log = []
    sup = follow.Supervisor(follow.Options(), name="run", follow=tmp_path)
    sup.engine = FakeEngine(log, fail_swap)
    monkeypatch.setattr(sup, "restart", lambda s, why: log.append(("restart", s.tag)))
    return sup, log


def _served(tag, shape=("policy",)):
    return follow.Served(tag, Path(tag), {"model_loader_extra_config": {"checkpoint": tag}}, shape)


def test_same_shape_swaps_in_place_and_a_new_shape_restarts(monkeypatch, tmp_path):
    sup, log = _supervisor(monkeypatch, tmp_path)
    sup.current = _served("global_step_4")
    assert sup.swap_to(_served("global_step_6")) is None
    assert log == [("swap", "global_step_6"), ("resume",)] and sup.current.tag == "global_step_6"
    assert json.loads(sup.state_file.read_text())["tag"] == "global_step_6"
    sup.swap_to(_served("global_step_8", shape=("policy", "bigger vocab")))
    assert log[-1] == ("restart", "global_step_8")
    sup.close()


def test_a_failed_swap_restarts_on_the_last_good_step(monkeypatch, tmp_path):
    sup, log = _supervisor(monkeypatch, tmp_path, fail_swap=True)
    sup.current = _served("global_step_4")
    new = _served("global_step_6")
    (tmp_path / "global_step_6").mkdir()
    (tmp_path / "global_step_6" / "w.bin").write_bytes(b"w")
    (tmp_path / "pins").mkdir()
    new.pin = Pin(tmp_path / "global_step_6", tmp_path / "pins")
    assert "in-place swap failed" in sup.swap_to(new)
    assert log == [("swap", "global_step_6"), ("restart", "global_step_4")]
    assert sup.current.tag == "global_step_4" and not new.pin.root.exists()  # the refused step is let go
    sup.close()
