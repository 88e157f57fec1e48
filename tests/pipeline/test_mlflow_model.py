"""The registered pyfunc model: loads once, samples with per-call settings, matches DiffusionSR;
takes arrays, batches and encoded files; is served by a real `mlflow models serve` as the README says."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from idm.config import DiffusionConfig, ModelConfig, SampleConfig, TrainConfig
from idm.inference.upscaler import DiffusionSR
from idm.train import fit
from pipeline import tracking
from pipeline.mlflow_model import SAMPLE, BadInput, log_and_register
from tests.helpers import photo

ROOT = Path(__file__).resolve().parents[2]

TINY = ModelConfig(encoder_blocks=1, encoder_channels=8, base_channels=8, channel_mults=(1, 2), res_blocks=1,
                   attention_levels=(), norm_groups=4, implicit_hidden=16, modulation_hidden=8, dropout=0.0,
                   prediction="x0")


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    ckpt = tmp_path_factory.mktemp("pyfunc") / "model.pt"
    fit(TINY, DiffusionConfig(timesteps=100), TrainConfig(steps=2, batch_size=2, patch_size=16, target="refine",
                                                         condition_loss=1.0, checkpoint_every=0),
        [photo(24, 24, 1)], device="cpu", ckpt_path=ckpt, progress=False)
    experiment = tracking.setup()  # experiment `idm`, artifacts beside the test store, not in ./mlruns
    with mlflow.start_run(experiment_id=experiment):
        version = log_and_register(ckpt)
    return ckpt, version


def test_pyfunc_predicts_what_diffusion_sr_gives(registered, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, version = registered
    model = mlflow.pyfunc.load_model(f"models:/idm/{version}")
    lr = photo(10, 12, 3)
    loads = []
    original = DiffusionSR.from_checkpoint.__func__
    monkeypatch.setattr(DiffusionSR, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))
    out = model.predict(lr, params={"scale": 2.5, "steps": 3, "seed": 4, "temperature": 1.0})
    again = model.predict(lr, params={"scale": 2.5, "steps": 3, "seed": 4, "temperature": 1.0})
    other_seed = model.predict(lr, params={"scale": 2.5, "steps": 3, "seed": 5, "temperature": 1.0})
    assert loads == []  # the model was loaded once, in load_context
    method = model.unwrap_python_model().method  # params.yaml's memory bound and tiling
    assert (method.sample.max_bytes, method.sample.tile_overlap, method.sample.tile_context,
            method.sample.tile_norm) == (SAMPLE.max_bytes, SAMPLE.tile_overlap, SAMPLE.tile_context, SAMPLE.tile_norm)
    assert out.shape == (25, 30, 3) and out.dtype == np.uint8
    monkeypatch.undo()
    reference = DiffusionSR.from_checkpoint(ckpt, SampleConfig(steps=3, seed=4, temperature=1.0))(lr, (25, 30))
    np.testing.assert_array_equal(out, reference)
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other_seed)
    with pytest.raises(BadInput, match="temperature must be a number in"):
        model.predict(lr, params={"scale": 2.0, "temperature": 2.0})


def test_the_served_default_is_the_cli_default_and_presets_apply(registered) -> None:
    """No sampling params: the model's default (here the regression output), as `idm upscale` gives."""
    ckpt, version = registered
    model = mlflow.pyfunc.load_model(f"models:/idm/{version}")
    lr = photo(10, 12, 3)
    default = model.predict(lr, params={"scale": 2.0})
    np.testing.assert_array_equal(default, DiffusionSR.from_checkpoint(ckpt).use_default_sample()(lr, (20, 24)))
    np.testing.assert_array_equal(default, model.predict(lr, params={"scale": 2.0, "preset": "fidelity"}))
    balanced = model.predict(lr, params={"scale": 2.0, "preset": "balanced"})
    want = DiffusionSR.from_checkpoint(ckpt, SampleConfig(sampler="ddim", steps=2, temperature=0.0))(lr, (20, 24))
    np.testing.assert_array_equal(balanced, want)
    with pytest.raises(BadInput, match="preset must be one of"):
        model.predict(lr, params={"scale": 2.0, "preset": "sharp"})


def test_a_request_above_the_work_bound_is_refused_before_any_work(registered, monkeypatch) -> None:
    model = mlflow.pyfunc.load_model(f"models:/idm/{registered[1]}")
    wrapper = model.unwrap_python_model()
    monkeypatch.setattr(wrapper, "max_work_mpx", 0.001)  # 1,000 output pixels x passes
    calls = []
    monkeypatch.setattr(type(wrapper.method), "__call__", lambda *a: calls.append(a))
    with pytest.raises(BadInput, match=r"asks for 0\.0 output Mpx x passes, above the server's 0\.001"):
        model.predict(photo(20, 20, 1), params={"scale": 2.0, "steps": 3})  # 1,600 px x 3 passes
    assert calls == []


def test_a_missing_alias_says_which_aliases_the_pipeline_sets(registered, tmp_path: Path) -> None:
    from pipeline.mlflow_model import checkpoint_from_uri

    with pytest.raises(ValueError, match=r"alias no-such-alias not found; .* try models:/idm@candidate"):
        checkpoint_from_uri("models:/idm@no-such-alias", tmp_path / "dl")


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_pyfunc_takes_batches_grey_rgba_and_encoded_files(registered) -> None:
    ckpt, version = registered
    model = mlflow.pyfunc.load_model(f"models:/idm/{version}")
    settings = {"scale": 2.0, "steps": 2}
    one, other = photo(10, 12, 3), photo(10, 12, 4)
    single = model.predict(one, params=settings)
    batch = model.predict(np.stack([one, other]).astype(np.int64), params=settings)  # JSON gives int64
    assert batch.shape == (2, 20, 24, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], single)

    grey = model.predict(one[..., 0], params=settings)
    assert grey.shape == (20, 24) and grey.dtype == np.uint8
    rgba = np.dstack([one, np.full((10, 12), 128, np.uint8)])
    out = model.predict(rgba, params=settings)
    np.testing.assert_array_equal(out[..., :3], single)  # colour by the model, alpha beside it
    assert out.shape == (20, 24, 4) and np.all(out[..., 3] == 128)

    files = pd.DataFrame({"image": [png_b64(rgba), png_b64(photo(8, 6, 1)[..., 0])]})
    answer = model.predict(files, params=settings)
    first, second = decoded(answer.image[0]), decoded(answer.image[1])
    assert (first.mode, first.size, second.mode, second.size) == ("RGBA", (24, 20), "RGB", (12, 16))
    np.testing.assert_array_equal(np.asarray(first), out)


@pytest.mark.parametrize("model_input, params, reason", [
    ("photo", {"scale": 0.5}, "scale must be a finite number > 1, got 0.5"),
    ("photo", {"scale": 2.0, "steps": 10**6}, "steps must be an integer in [0, 100]"),
    (np.full((4, 4, 3), 300), {}, "pixel values must be integers in [0, 255], got values in [300, 300]"),
    (np.zeros((2, 2, 2, 2, 3)), {}, "expected an (h, w), (h, w, 3), (h, w, 4) or (n, h, w, c) image array"),
    (pd.DataFrame({"image": ["not base64!"]}), {}, "image[0] is not base64"),
    (pd.DataFrame({"image": [base64.b64encode(b"GIF89a broken").decode()]}), {}, "image[0]: not a readable image"),
    (pd.DataFrame({"picture": ["x"]}), {}, "expected a column 'image' of base64-encoded image files"),
])
def test_bad_input_is_one_line_that_names_the_problem(registered, model_input, params, reason) -> None:
    model = mlflow.pyfunc.load_model(f"models:/idm/{registered[1]}")
    model_input = photo(6, 6, 0) if isinstance(model_input, str) else model_input
    with pytest.raises(BadInput) as caught:
        model.predict(model_input, params=params)
    assert caught.value.message.startswith(reason) and "\n" not in caught.value.message
    caught.value.message = f"Failed to predict data '{model_input}'. Error: ..."  # what the server does
    assert caught.value.message.startswith(reason)  # ... and the reason stays alone


def readme_serving_example() -> tuple[str, str]:
    """The README's `mlflow models serve` + `curl` block: (the server's lines, the client's)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- serving-example")[1].split("```bash\n", 1)[1].split("```", 1)[0]
    server, client = block.split("# wait until", 1)
    return server, client.split("\n", 1)[1]


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group `pgid` (the server and its workers)."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            pid = int(status.parent.name)
            if os.getpgid(pid) != pgid:
                continue
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        except (OSError, ValueError):
            continue
    return total


def hostile_burst_leaves_the_server_up(url: str, pgid: int, small: np.ndarray) -> None:
    """50 hostile requests at once: each refused with a one-line 400, the server's memory grows by
    less than 1 GiB, and a normal request is answered afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.reliability.test_cli_inputs import _huge_png

    hostile = [
        {"dataframe_records": [{"image": base64.b64encode(_huge_png(13000, 13000)).decode()}]},  # 169 Mpx declared
        {"dataframe_records": [{"image": png_b64(small)}], "params": {"scale": 400, "steps": 5}},  # far over the work bound
        {"dataframe_records": [{"image": "not base64!" * 1000}]},
        {"inputs": np.full((64, 64, 3), 999).tolist()},
        {"dataframe_records": [{"image": png_b64(small)}], "params": {"seed": 2**70}},
    ]
    before = group_rss(pgid)
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda i: post(url, hostile[i % len(hostile)]), range(50)))
    assert {status for status, _ in answers} == {400}, [a for a in answers if a[0] != 400][:2]
    assert all("\n" not in body["message"] and "stack_trace" not in body for _, body in answers)
    assert group_rss(pgid) - before < 2**30
    status, body = post(url, {"inputs": small.tolist(), "params": {"scale": 2}})
    assert status == 200 and np.asarray(body["predictions"]).shape == (32, 40, 3)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_readme_serving_example_runs_against_mlflow_models_serve(registered, tmp_path: Path) -> None:
    from pipeline.servers import free_port

    port, version = free_port(), registered[1]
    server, client = readme_serving_example()

    def adapt(lines: str) -> str:  # this test's store, model, port and venv
        lines = lines.replace("sqlite:///$PWD/mlflow.db", os.environ["MLFLOW_TRACKING_URI"])
        return lines.replace("models:/idm@candidate", f"models:/idm/{version}").replace(
            "5002", str(port)).replace("$PWD/.venv/bin", str(Path(sys.executable).parent))

    lr = np.random.default_rng(0).integers(0, 256, (600, 700, 3), dtype=np.uint8)  # noise: a PNG above 1 MB
    Image.fromarray(lr).save(tmp_path / "photo.png")
    assert (tmp_path / "photo.png").stat().st_size > 2**20
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(["bash", "-c", adapt(server) + "\nwait"], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve never answered /ping"
            time.sleep(1)
        done = subprocess.run(["bash", "-c", adapt(client)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        served = np.asarray(Image.open(tmp_path / "photo_x2.5.png"))
        assert served.shape == (1500, 1750, 3)
        model = mlflow.pyfunc.load_model(f"models:/idm/{version}")
        here = model.predict(lr, params={"scale": 2.5})
        assert np.abs(served.astype(int) - here).max() <= 1  # same model and seed; float order may differ

        url = f"http://127.0.0.1:{port}/invocations"
        small = lr[:16, :20]
        status, body = post(url, {"inputs": np.stack([small, small]).tolist(), "params": {"scale": 2, "steps": 1}})
        assert status == 200 and np.asarray(body["predictions"]).shape == (2, 32, 40, 3)
        for request, reason in [
            ({"dataframe_records": [{"image": png_b64(lr)}], "params": {"scale": 0.5}},
             "scale must be a finite number > 1, got 0.5"),
            ({"inputs": np.full((8, 8, 3), 300).tolist()}, "pixel values must be integers in [0, 255]"),
            ({"dataframe_records": [{"image": base64.b64encode(b"no image").decode()}]},
             "image[0]: not a readable image"),
            ({"dataframe_records": [{"image": png_b64(lr)}], "params": {"scale": 4, "steps": 5}},
             "this request asks for 33.6 output Mpx x passes, above the server's 4"),
        ]:
            status, body = post(url, request)
            assert status == 400 and body["message"].startswith(reason), body
            assert "\n" not in body["message"] and len(body["message"]) < 300
        hostile_burst_leaves_the_server_up(url, proc.pid, lr[:16, :20])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_a_file_too_large_for_the_work_bound_is_refused_from_its_header(registered) -> None:
    from tests.reliability.test_cli_inputs import _huge_png

    model = mlflow.pyfunc.load_model(f"models:/idm/{registered[1]}")
    files = pd.DataFrame({"image": [base64.b64encode(_huge_png(13000, 13000)).decode()]})  # 169 Mpx declared
    with pytest.raises(BadInput, match=r"image\[0\]: .*13000"):
        model.predict(files, params={"scale": 2.0})


def test_requests_beyond_the_concurrency_limit_wait_then_are_refused_as_busy(registered, monkeypatch) -> None:
    import threading

    model = mlflow.pyfunc.load_model(f"models:/idm/{registered[1]}")
    wrapper = model.unwrap_python_model()
    monkeypatch.setattr(wrapper, "slots", threading.BoundedSemaphore(1))
    monkeypatch.setattr(wrapper, "queue_seconds", 0.05)
    wrapper.slots.acquire()  # another request is computing
    with pytest.raises(BadInput, match=r"the server is busy with 1 request\(s\)"):
        model.predict(photo(8, 8, 1), params={"scale": 2.0})
    wrapper.slots.release()
    assert model.predict(photo(8, 8, 1), params={"scale": 2.0}).shape == (16, 16, 3)  # the slot was given back


def test_a_failure_inside_the_model_is_one_line_without_a_stack_trace(registered, monkeypatch) -> None:
    from pipeline.mlflow_model import ModelFailure

    model = mlflow.pyfunc.load_model(f"models:/idm/{registered[1]}")
    wrapper = model.unwrap_python_model()

    def broken(*args):
        raise RuntimeError("CUDA out of memory at /srv/models/secret/path.py:12\nmore lines")

    monkeypatch.setattr(type(wrapper.method), "__call__", broken)
    with pytest.raises(ModelFailure) as caught:
        model.predict(photo(8, 8, 1), params={"scale": 2.0})
    assert caught.value.message == ("the model failed on this request: RuntimeError: CUDA out of memory at "
                                    "/srv/models/secret/path.py:12")
    assert caught.value.get_http_status_code() == 500 and "stack_trace" not in caught.value.serialize_as_json()
    with pytest.raises(BadInput, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        model.predict(photo(8, 8, 1), params={"scale": 2.0, "seed": 2**70})
