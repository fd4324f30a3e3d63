"""The peer server (infinity-emb) launcher: the command it builds, its life cycle against a stand-in, and,
where `make peer` has built .venv-infinity, the real server's embeddings against the teacher's."""
import os
import stat
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # loadtests/ is not an installed package; `python -m pytest` adds the root itself
    sys.path.insert(0, str(REPO))

from deployments.ports import free_port, port_is_free  # noqa: E402
from loadtests.peer import DEFAULT_VENV, InfinityServer, infinity_available  # noqa: E402

from conftest import SENTENCES  # noqa: E402


def _pid_gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_command_line(tmp_path):
    srv = InfinityServer(tmp_path / "model", port=7997, venv=tmp_path / "venv", batch_size=16,
                         threads=2, cpus=[0, 1], nice=5, log_path=tmp_path / "peer.log")
    cmd = srv.command()
    assert cmd[:6] == ["nice", "-n", "5", "taskset", "-c", "0,1"]
    assert cmd[6:8] == [str(tmp_path / "venv" / "bin" / "infinity_emb"), "v2"]
    args = cmd[8:]

    def value(flag):
        return args[args.index(flag) + 1]

    assert value("--model-id") == str(tmp_path / "model")
    assert value("--served-model-name") == "all-MiniLM-L6-v2"
    assert value("--host") == "127.0.0.1" and value("--port") == "7997"
    assert value("--engine") == "torch" and value("--device") == "cpu" and value("--dtype") == "float32"
    assert value("--batch-size") == "16"
    for flag in ("--no-compile", "--no-vector-disk-cache", "--no-bettertransformer"):
        assert flag in args
    assert srv.url == "http://127.0.0.1:7997" and srv.pid is None and srv.log_path == tmp_path / "peer.log"

    env = srv.environment({"PATH": "/usr/bin", "INFINITY_API_KEY": "x", "VIRTUAL_ENV": "/elsewhere"})
    assert env["HF_HUB_OFFLINE"] == "1" and env["DO_NOT_TRACK"] == "1"
    assert env["OMP_NUM_THREADS"] == "2" and env["MKL_NUM_THREADS"] == "2"
    assert "INFINITY_API_KEY" not in env and "VIRTUAL_ENV" not in env and env["PATH"] == "/usr/bin"

    plain = InfinityServer("/m", port=1234, log_path=tmp_path / "p.log")
    assert plain.command()[0] == str(plain.venv / "bin" / "infinity_emb")
    assert plain.venv.name == DEFAULT_VENV and plain.venv.is_absolute()
    assert "OMP_NUM_THREADS" not in plain.environment({})
    plain.stop()  # never started: a no-op


FAKE_SERVER = """\
#!{python}
# Stand-in for infinity_emb: answers GET /health on --port, and starts a child in its process group.
import os, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[1:]
open({server_pid_file!r}, "w").write(str(os.getpid()))
if "--die" in args:
    print("fake: dying on purpose", flush=True)
    sys.exit(3)
if "--hang" in args:
    print("fake: never ready", flush=True)
    time.sleep(600)
port = int(args[args.index("--port") + 1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open({child_pid_file!r}, "w").write(str(child.pid))

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"{{}}")
    def log_message(self, *a):
        pass

print("fake: listening", flush=True)
HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


@pytest.fixture
def fake_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    exe = venv / "bin" / "infinity_emb"
    exe.write_text(FAKE_SERVER.format(python=sys.executable, child_pid_file=str(tmp_path / "child.pid"),
                                      server_pid_file=str(tmp_path / "server.pid")))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return venv, model


def test_life_cycle_with_stand_in(fake_venv, tmp_path):
    venv, model = fake_venv
    assert infinity_available(venv) and not infinity_available(tmp_path / "nowhere")
    with InfinityServer(model, port=free_port(), venv=venv, log_path=tmp_path / "fake.log") as srv:
        pid, port = srv.pid, srv.port
        assert srv.running() and not port_is_free(port)
        child = int((tmp_path / "child.pid").read_text())
        with pytest.raises(RuntimeError, match="already"):
            srv.start()
        with pytest.raises(RuntimeError, match="in use"):
            InfinityServer(model, port=port, venv=venv, log_path=tmp_path / "other.log").start(timeout_s=5)
    assert srv.pid is None
    assert _pid_gone(pid) and _pid_gone(child), "the server and its child must be gone"
    assert port_is_free(port)
    srv.stop()  # idempotent
    assert "fake: listening" in srv.log_tail()


def test_start_reports_early_exit(fake_venv, tmp_path):
    venv, model = fake_venv
    srv = InfinityServer(model, port=free_port(), venv=venv, log_path=tmp_path / "die.log", extra_args=["--die"])
    with pytest.raises(RuntimeError, match="dying on purpose"):
        srv.start(timeout_s=30)
    assert srv.pid is None


def test_start_times_out_and_cleans_up(fake_venv, tmp_path):
    venv, model = fake_venv
    srv = InfinityServer(model, port=free_port(), venv=venv, log_path=tmp_path / "hang.log", extra_args=["--hang"])
    with pytest.raises(TimeoutError, match="never ready"):
        srv.start(timeout_s=1.5)
    assert srv.pid is None and not srv.running()
    assert _pid_gone(int((tmp_path / "server.pid").read_text())), "a server that never got ready must be ended"


@pytest.mark.skipif(not infinity_available(DEFAULT_VENV),
                    reason=f"{DEFAULT_VENV} is absent: `make peer` installs infinity-emb (not part of CI)")
@pytest.mark.timeout(300)
def test_infinity_matches_teacher(teacher, tokenizer, tmp_path):
    from elastic_core.model import teacher_dir

    texts = ["a sentence", "another"] + SENTENCES
    srv = InfinityServer(teacher_dir(), port=free_port(), threads=2, log_path=tmp_path / "infinity.log")
    with srv:
        pid, port = srv.pid, srv.port
        got = torch.tensor(srv.embed(texts), dtype=torch.float32)
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt",
                          return_token_type_ids=False)
        want = teacher.embed(**batch)
    assert got.shape == want.shape == (len(texts), 384)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min().item() >= 0.999, f"cosine to the teacher: {cos.tolist()}"
    assert _pid_gone(pid), f"infinity_emb pid {pid} still alive"
    assert port_is_free(port)
