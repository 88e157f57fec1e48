"""Security hygiene: argument-list subprocesses, servers on 127.0.0.1, no credentials in params, logs or MLflow.

(Downloads over https only, except loopback: test_downloads.py, through the download stage.)
"""

from __future__ import annotations

import ast
import re

import mlflow
import pytest
import yaml

from pipeline import servers as serve
from pipeline import tracking
from tests.reliability.harness import ROOT

pytestmark = pytest.mark.reliability

SOURCES = sorted(p for folder in ("idm", "pipeline", "bench", "tests") for p in (ROOT / folder).rglob("*.py"))
SPAWNERS = {"run", "Popen", "call", "check_call", "check_output"}
SHELLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
          ("asyncio", "create_subprocess_shell")}
SECRET_KEY = re.compile(r"passw|secret|token|api_?key|access_?key|credential", re.IGNORECASE)
USERINFO = re.compile(r"://[^/\s@]+:[^/\s@]*@")


def _dotted(node: ast.AST) -> tuple[str, ...]:
    if isinstance(node, ast.Attribute):
        return (*_dotted(node.value), node.attr)
    return (node.id,) if isinstance(node, ast.Name) else ()


def _is_string_command(node: ast.AST) -> bool:
    """A literal, f-string, concatenation, %-format or .format(): a command line, not an argument list."""
    if isinstance(node, (ast.Constant, ast.JoinedStr)):
        return isinstance(node, ast.JoinedStr) or isinstance(node.value, str)
    if isinstance(node, ast.BinOp):
        return _is_string_command(node.left) or _is_string_command(node.right)
    return isinstance(node, ast.Call) and _dotted(node.func)[-1:] == ("format",)


def test_no_subprocess_runs_a_shell_or_a_command_string():
    spawns, problems = 0, []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name, where = _dotted(node.func), f"{path.relative_to(ROOT)}:{node.lineno}"
            if name[-2:] in SHELLS:
                problems.append(f"{where}: {'.'.join(name)} runs a shell")
            if name[:1] != ("subprocess",) or name[-1] not in SPAWNERS:
                continue
            spawns += 1
            if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                problems.append(f"{where}: shell=")
            if node.args and _is_string_command(node.args[0]):
                problems.append(f"{where}: the command is a string, not an argument list")
    assert spawns >= 10, "the scan found the project's subprocess calls"
    assert problems == []


def test_dvc_commands_interpolate_no_params():
    """DVC runs `cmd` through a shell: a ${param} there would put params.yaml values into a shell line."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert [name for name, stage in stages.items() if "${" in stage["cmd"] or "$(" in stage["cmd"]] == []


def test_the_servers_bind_loopback_and_keep_the_store_uri_off_the_command_line(tmp_path, monkeypatch):
    started = []

    class Started:
        def wait_until_up(self, url: str) -> None:
            started[-1]["url"] = url

    def start(name, cmd, log_dir, env=None):
        started.append({"name": name, "cmd": cmd, "env": env or {}})
        return Started()

    monkeypatch.setattr(serve.Service, "start", start)
    monkeypatch.setattr(serve, "port_is_free", lambda port: True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:hunter2@db.internal/mlflow")
    serve.start_prefect_server(4200, tmp_path)
    serve.start_mlflow_ui(5000, tmp_path)
    assert serve.HOST == "127.0.0.1"
    for server in started:
        cmd = server["cmd"]
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1", server["name"]
        assert server["url"].startswith("http://127.0.0.1:"), server["name"]
        assert not any("hunter2" in arg for arg in cmd), f"{server['name']}: a password on the command line"
    assert started[1]["env"]["MLFLOW_BACKEND_STORE_URI"].endswith("@db.internal/mlflow")


def test_no_server_listens_on_every_interface():
    texts = {p: p.read_text() for p in [*SOURCES, ROOT / "Makefile"] if "tests" not in p.relative_to(ROOT).parts}
    assert [str(p) for p, text in texts.items() if "0.0.0.0" in text or "::/0" in text] == []
    assert "--host 127.0.0.1" in texts[ROOT / "Makefile"]


def _walk(value, path=""):
    """(dotted key, value) of every leaf of a YAML document."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")
    else:
        yield path, value


@pytest.mark.parametrize("name", ["params.yaml", "dvc.yaml", "bench/sunhays80.yaml", ".dvc/config"])
def test_no_credentials_in_params_and_config(name):
    text = (ROOT / name).read_text()
    assert not USERINFO.search(text), f"{name}: a URL with user:password@"
    if name.endswith(".yaml"):
        leaves = list(_walk(yaml.safe_load(text)))
        assert leaves and [key for key, _ in leaves if SECRET_KEY.search(key)] == []


def test_urls_logged_to_mlflow_lose_their_credentials(mlflow_store):
    secrets = ("hunter2", "s3cr3t", "AKIAEXAMPLE")
    params = {"datasets.web.url": "https://data.example.com/d.zip?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=s3cr3t",
              "datasets.mirror.url": "https://alice:hunter2@mirror.example.com/d.zip", "train.steps": 5}
    with tracking.stage_run("download", tags={"source": "https://alice:hunter2@mirror.example.com/d.zip"},
                            params=params) as run:
        run_id = run.info.run_id
    logged = mlflow.MlflowClient(mlflow_store).get_run(run_id).data
    text = repr(logged.params) + repr(logged.tags)
    assert not [s for s in secrets if s in text], text
    assert logged.params["datasets.web.url"] == ("https://data.example.com/d.zip?X-Amz-Credential=***"
                                                 "&X-Amz-Signature=***")
    assert logged.tags["source"] == "https://alice:***@mirror.example.com/d.zip" and logged.params["train.steps"] == "5"


@pytest.mark.parametrize("uri, shown", [
    ("postgresql://mlflow:hunter2@db/mlflow", "postgresql://mlflow:***@db/mlflow"),
    ("https://token123@mlflow.example.com", "https://***@mlflow.example.com"),
    ("sqlite:////abs/path/mlflow.db", "sqlite:////abs/path/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_store_uris_are_shown_without_passwords(uri, shown):
    assert tracking.display_uri(uri) == shown
