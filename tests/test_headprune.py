"""`prune-heads` (plugins/headprune.py): attention heads and feed-forward width cut from a brought transformer,
then distilled label-free toward its fp32 self on a separate training set (`--train`).

The tiny 2-layer, 4-head BERT factory (tests/helpers/own_models.py) loses half its heads and half its
feed-forward width; its quality (cosine to fp32) is measured on the held-out rows of `--inputs`, through
its ONNX export, before and after distillation, and once through a whole run (Ray, the local device).
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from orchestrator.config.profile import load_profile
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.models.outputs import onnx_outputs
from orchestrator.models.ownmodel import OwnModelTask
from orchestrator.run import RunOptions, execute_run
from orchestrator.search.pipeline import build_candidate
from plugins.headprune import PruneHeads
from tests.helpers.own_models import tiny_bert, token_samples

ROOT = Path(__file__).resolve().parent.parent
BERT = "tests.helpers.own_models:tiny_bert"
X86 = ROOT / "device_profiles" / "x86-host.yaml"


def _ctx(*tensors: torch.Tensor):
    """The little of a TechniqueContext `apply` reads at 0 epochs: calibration rows, single-row batches."""
    names = [f"input{i}" for i in range(len(tensors))]
    task = types.SimpleNamespace(
        feeds=lambda rows: rows,
        input_specs=lambda: [types.SimpleNamespace(name=n, dtype=str(t.numpy().dtype)) for n, t in zip(names, tensors)])
    return types.SimpleNamespace(task=task, calibration_batches=lambda n: [{k: t[i:i + 1].numpy() for k, t in zip(names, tensors)}
                                                                    for i in range(min(n, len(tensors[0])))])


def _prune(model, *inputs, **params):
    technique = PruneHeads()
    return technique.apply(model, technique.check_params({"epochs": 0, **params}), _ctx(*inputs))


def _tokens(rows=6, seed=0):
    ids = torch.from_numpy(np.random.default_rng(seed).integers(1, 300, size=(rows, 24)))
    mask = torch.ones_like(ids)
    mask[::2, 16:] = 0
    return ids, mask


def test_whole_heads_go_exactly_as_if_masked_and_the_outputs_keep_their_shape():
    ids, mask = _tokens()
    teacher = tiny_bert()
    student = _prune(teacher, ids, mask, heads=0.5, ffn=1.0)
    for old, new in zip(teacher.bert.encoder.layer, student.bert.encoder.layer):
        attention = new.attention.self
        assert attention.num_attention_heads == 2 and attention.all_head_size == 32 and attention.attention_head_size == 16
        assert tuple(attention.query.weight.shape) == (32, 64) and tuple(new.attention.output.dense.weight.shape) == (64, 32)
        assert tuple(new.intermediate.dense.weight.shape) == (128, 64)  # ffn=1: untouched
        # which heads were kept: the teacher's query rows, 16 per head, found again in the student
        rows = old.attention.self.query.weight.view(4, 16, 64)
        kept = [h for h in range(4) if any(torch.equal(rows[h], part) for part in attention.query.weight.view(2, 16, 64))]
        assert len(kept) == 2
        for h in set(range(4)) - set(kept):  # mask the others in the teacher: a head whose values are zero adds nothing
            with torch.no_grad():
                old.attention.self.value.weight[h * 16:(h + 1) * 16] = 0
                old.attention.self.value.bias[h * 16:(h + 1) * 16] = 0
    with torch.no_grad():
        assert torch.allclose(student(ids, mask), teacher(ids, mask), atol=1e-5)  # the key/value/output cuts line up


def test_the_feed_forward_narrows_and_generic_torch_transformers_are_handled_or_refused_in_one_line():
    ids, mask = _tokens()
    bert = _prune(tiny_bert(), ids, mask, heads=0.75, ffn=0.5)
    assert all(layer.intermediate.dense.out_features == 64 and layer.output.dense.in_features == 64
               and layer.attention.self.num_attention_heads == 3 for layer in bert.bert.encoder.layer)
    assert bert(ids, mask).shape == (6, 64)

    torch.manual_seed(0)
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 128, batch_first=True), 2).eval()
    x = torch.randn(3, 10, 32)
    narrow = _prune(encoder, x, heads=1.0, ffn=0.5)  # torch's own layer: its feed-forward can narrow
    assert [(layer.linear1.out_features, layer.linear2.in_features) for layer in narrow.layers] == [(64, 64)] * 2
    assert narrow(x).shape == encoder(x).shape
    with pytest.raises(ValueError, match=r"^prune-heads: layers.0.self_attn is a torch.nn.MultiheadAttention: .*"
                                         r"use heads=1 \(feed-forward width only\)$"):
        _prune(encoder, x, heads=0.5, ffn=1.0)

    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=300, bos_token_id=0, eos_token_id=0)).eval()
    with pytest.raises(ValueError, match=r"^prune-heads: h.0.attn.c_attn \(GPT2Attention\) computes query, key and "
                                         r"value in one layer \(fused\)"):
        _prune(gpt2, ids, heads=0.5, ffn=1.0)
    with pytest.raises(ValueError) as refused:
        _prune(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)), torch.randn(2, 8),
               heads=0.5, ffn=0.5)
    assert "found no attention with separate query/key/value Linear layers" in str(refused.value)
    assert "\n" not in str(refused.value)
    # nothing at all to prune (no attention, no list of blocks): NotApplicable, so the search rules the technique
    # out at this first failure; a transformer without prunable attention above kept its feed-forward (ValueError)
    from orchestrator import NotApplicable

    assert isinstance(refused.value, NotApplicable)


def test_parameters_are_checked_before_the_search():
    technique = PruneHeads()
    assert technique.invalid({"heads": 1.0, "ffn": 1.0, "epochs": 0, "round_to": 8, "score_rows": 64}) == \
        "heads=1 and ffn=1 keep everything: nothing to prune"
    assert len(technique.param_grid()) == 24  # 3 x 3 shares less (1, 1), x 3 budgets
    for config in technique.recommended(None):
        assert technique.check_params(config)["heads"] < 1


def _build(task, data, params):
    model_bytes, info = build_candidate(get_plugin_manager(), task, task.build(),
                                        [{"technique": "prune-heads", "params": params}] if params else [],
                                        {"data": data, "profile": load_profile(X86).profile, "seed": 0})
    outputs = onnx_outputs(model_bytes, task, data["eval"])
    return onnx.load_from_string(model_bytes), outputs, task.score(outputs, data["eval"].labels), info


def _weights(model) -> int:
    """Float weights in an ONNX graph: its initializers and its Constant nodes' tensors (the export makes some so)."""
    tensors = [*model.graph.initializer, *(a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                                           if a.name == "value")]
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type == onnx.TensorProto.FLOAT)


def test_heads_and_ffn_pruned_then_distilled_label_free_on_a_separate_training_set(tmp_path):
    samples = token_samples(tmp_path / "samples.npz", rows=48, seed=0)
    train = token_samples(tmp_path / "train.npz", rows=512, seed=1)  # other rows than the samples
    task = OwnModelTask(BERT, str(samples), train=str(train), train_time_budget_s=600)  # seconds idle; over 60 s loaded
    data = task.load_data(0)
    base, base_out, _, _ = _build(task, data, None)
    pruned, pruned_out, before, info0 = _build(task, data, {"heads": 0.5, "ffn": 0.5, "epochs": 0})
    distilled, out, after, info = _build(task, data, {"heads": 0.5, "ffn": 0.5, "epochs": 3})
    assert [o.shape for o in out] == [o.shape for o in pruned_out] == [o.shape for o in base_out] == [(24, 64)]
    # per layer half of 4 x 64x64 attention and 2 x 64x128 feed-forward weights go (in torch 90,496 -> 57,408
    # parameters; the embeddings stay): the ONNX export holds 64% of the baseline's weights
    assert _weights(distilled) < 0.65 * _weights(base) and _weights(pruned) < 0.65 * _weights(base)
    assert "training" not in info0  # nothing trained at 0 epochs
    (record,) = info["training"]["prune-heads"]
    assert record["rows"] == 3 * 512 and record["epochs_done"] == 3 and "--train" in record["data"]
    # measured on the 24 held-out rows through onnxruntime (this machine: 0.99967 pruned, 0.999997 after)
    print(f"cosine to fp32 on the 24 held-out rows: {before:.6f} pruned, {after:.6f} after distillation; "
          f"weights {_weights(base)} -> {_weights(distilled)}")
    assert before < 0.9999
    assert (1 - after) < (1 - before) / 5


@pytest.mark.slow
def test_a_run_prunes_heads_of_a_brought_model_with_its_training_set(ray_local, tmp_path):
    import yaml

    samples = token_samples(tmp_path / "samples.npz", rows=32, seed=0)
    train = token_samples(tmp_path / "train.npz", rows=256, seed=1)
    data = yaml.safe_load(X86.read_text())
    data["search"].update(techniques=["prune-heads"], max_pipeline_length=1, trials=2, time_budget_s=None,
                          params={"prune-heads": {"heads": 0.5, "ffn": 0.5, "epochs": 1}})
    data["measurement"].update(runs=30, time_budget_s=2, final_rounds=3, final_time_budget_s=4, finalists=2)
    profile = tmp_path / "heads.yaml"
    profile.write_text(yaml.safe_dump(data))
    outcome = execute_run(load_profile(profile), get_plugin_manager(), RunOptions(
        model=BERT, inputs=str(samples), train=str(train), trials=2, num_cpus=2, out_dir=tmp_path / "runs"))
    results = outcome.results
    assert outcome.status == "finished", results["message"]
    (pruned,) = [c for c in results["candidates"] if c["pipeline"]]
    assert pruned["pipeline"][0]["technique"] == "prune-heads" and pruned["status"] == "ok", pruned
    assert pruned["metrics"]["accuracy"] > 0.999  # cosine to fp32 on the held-out rows
    assert pruned["metrics"]["size_bytes"] < results["baseline"]["metrics"]["size_bytes"]
    (record,) = pruned["training"]["prune-heads"]
    assert record["set_rows"] == 256 and "--train" in record["data"]
