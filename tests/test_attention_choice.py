"""Which attention runs: auto probes each candidate (a tiny packed forward+backward that must compile, run and match
float32) and falls back past every one that fails; an explicit impl that fails its probe stops with the probe's
error. On a CPU nothing real can fail, so failing kernels are stand-ins put into jsft.model.kernels.KERNELS."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft.model import attention, kernels
from jsft.model.attention import AttentionUnavailable, Choice, packed_attention

SHAPES = dict(q_heads=4, kv_heads=2, max_segments=3)


def broken(q, k, v, segment_ids, scale, **options):
    """A kernel that does not build on this device."""
    raise RuntimeError("no kernel image is available for execution on the device")


def wrong(q, k, v, segment_ids, scale, **options):
    """A kernel that compiles and runs, and is 10 % off."""
    return kernels.xla_attention(q, k, v, segment_ids, scale) * 1.1


def leaky(q, k, v, segment_ids, scale, **options):
    """Right on real tokens, garbage on padding."""
    out = kernels.xla_attention(q, k, v, segment_ids, scale)
    return out + (segment_ids == 0)[:, :, None, None].astype(out.dtype)


def nan(q, k, v, segment_ids, scale, **options):
    return kernels.xla_attention(q, k, v, segment_ids, scale) * jnp.nan


CALLS = []


def good(q, k, v, segment_ids, scale, **options):
    """A working kernel (the xla path under another name); counts its traces."""
    CALLS.append(q.shape)
    return kernels.xla_attention(q, k, v, segment_ids, scale)


@pytest.fixture
def stand_ins(monkeypatch, small_probe):
    for name, kernel in dict(broken=broken, wrong=wrong, leaky=leaky, nan=nan, good=good).items():
        monkeypatch.setitem(kernels.KERNELS, name, kernel)
    CALLS.clear()
    return monkeypatch


def rows(batch=2, length=32, hq=4, hkv=2, head_dim=16, dtype=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, length, h, head_dim), np.float32), dtype)
               for h in (hq, hkv, hkv))
    seg = jnp.asarray([[1] * 10 + [2] * 15 + [0] * 7, [1] * 32][:batch], jnp.int32)
    return q, k, v, seg


def test_auto_uses_the_first_candidate_whose_probe_passes_and_says_why_the_others_did_not(stand_ins):
    stand_ins.setattr(attention, "auto_candidates", lambda dtype: ("broken", "wrong", "good"))
    choice = attention.resolve("auto", jnp.bfloat16, 32, 16, **SHAPES)
    assert choice.impl == "good" and choice.why.startswith("probe passed: max rel err")
    (first, reason_1), (second, reason_2) = choice.not_used
    assert (first, second) == ("broken", "wrong")
    assert reason_1 == "its probe failed: RuntimeError: no kernel image is available for execution on the device"
    assert re.match(r"its probe failed: (out|dq|dk|dv) rel err 1\.0e-01 vs float32 \(tolerance 2e-02\) in ", reason_2)
    line = choice.describe()
    assert line.startswith("good (probe passed: max rel err ")
    assert "; not broken: its probe failed: RuntimeError" in line
    assert "; not wrong: its probe failed: " in line and " rel err 1.0e-01 " in line


def test_auto_first_asked_inside_a_jitted_step_under_a_mesh_probes_eagerly_and_runs_the_survivor(stand_ins):
    """The model asks while its step is being traced (and jsft.train traces under jax.set_mesh): the probes still
    compile and run for real (in a thread of their own), once each, and the step runs the surviving kernel."""
    stand_ins.setattr(attention, "auto_candidates", lambda dtype: ("broken", "nan", "good"))
    seen = []
    real = attention._probe
    stand_ins.setattr(attention, "_probe", lambda *key: seen.append(key[0]) or real(*key))
    q, k, v, seg = rows()
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))

    def loss(q, k, v, impl):
        return (packed_attention(q, k, v, seg, impl=impl, max_segments=2).astype(jnp.float32) * w).sum()

    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, "auto")
    grads_ref = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, "xla")
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_ref, np.float32))
    assert seen == ["broken", "nan", "good"]  # each once, though the kernel is traced for the forward and backward
    assert CALLS.count(q.shape) == 1 and len(CALLS) == 2  # the step's trace, and the probe's (at the probe's shape)


def test_auto_falls_back_to_xla_when_every_probe_fails_and_lists_each_reason(stand_ins):
    stand_ins.setattr(attention, "auto_candidates", lambda dtype: ("broken", "wrong", "leaky", "nan"))
    choice = attention.resolve("auto", jnp.bfloat16, 32, 16, **SHAPES)
    assert choice == Choice("xla", "the XLA mask path, the fallback", choice.not_used)
    reasons = dict(choice.not_used)
    assert list(reasons) == ["broken", "wrong", "leaky", "nan"]
    assert reasons["leaky"].startswith("its probe failed: padding outputs or gradients are not zero")
    assert reasons["nan"].startswith("its probe failed: non-finite outputs or gradients")
    q, k, v, seg = rows()
    np.testing.assert_array_equal(packed_attention(q, k, v, seg), packed_attention(q, k, v, seg, impl="xla"))


def test_an_explicit_impl_whose_probe_fails_raises_the_probe_error_and_the_alternatives(stand_ins):
    q, k, v, seg = rows()
    with pytest.raises(AttentionUnavailable) as raised:
        jax.jit(lambda q, k, v: packed_attention(q, k, v, seg, impl="broken"))(q, k, v)
    assert str(raised.value) == (
        "attention impl='broken' cannot run: its probe failed: RuntimeError: no kernel image is available for "
        "execution on the device. Alternatives: model.attention_impl='auto' (probes cudnn, tokamax, pallas on this "
        "device and falls back to 'xla'), or 'xla' (runs everywhere).")
    from jsft import cli

    assert isinstance(raised.value, cli.user_errors())  # one line, exit 2, no traceback
    np.testing.assert_array_equal(packed_attention(q, k, v, seg, impl="good"),
                                  packed_attention(q, k, v, seg, impl="xla"))


def test_each_probe_runs_once_per_process_keyed_by_dtype_head_dim_heads_and_the_cudnn_bound(stand_ins):
    seen = []
    real = attention._probe
    stand_ins.setattr(attention, "_probe", lambda *key: seen.append(key) or real(*key))
    stand_ins.setattr(attention, "auto_candidates", lambda dtype: ("broken", "good"))
    for _ in range(3):
        assert attention.choose_impl(jnp.bfloat16, 32, 16, **SHAPES) == "good"
    assert seen == [("broken", "bfloat16", 16, 4, 2, None), ("good", "bfloat16", 16, 4, 2, None)]
    attention.choose_impl(jnp.bfloat16, 64, 16, q_heads=4, kv_heads=2, max_segments=9)  # L, bound: same probes
    attention.choose_impl(jnp.bfloat16, 32, 8, q_heads=8, kv_heads=2, max_segments=3)  # head dim, GQA: probed again
    assert [key[1:5] for key in seen[2:]] == [("bfloat16", 8, 8, 2)] * 2
    # cudnn's probe is keyed by its bound as well (the rounded one): 3 -> 4, 4 -> 4, 5 -> 8
    stand_ins.setitem(kernels.KERNELS, "cudnn", good)
    stand_ins.setattr(kernels, "cudnn_unavailable_reason", lambda dtype, head_dim: None)
    stand_ins.setattr(attention, "auto_candidates", lambda dtype: ("cudnn",))
    for bound in (3, 4, 5):
        assert attention.choose_impl(jnp.bfloat16, 32, 16, q_heads=4, kv_heads=2, max_segments=bound) == "cudnn"
    assert [key[5] for key in seen if key[0] == "cudnn"] == [4, 8]


def test_auto_static_rules_on_a_gpu(monkeypatch):
    """The GPU branch with the device faked and every probe passing: cudnn only with a documents-per-row bound,
    tokamax only on sm90/sm100 (a faked GPU has no compute capability), pallas when L fits its 128 blocks, else
    xla; float32 never tries a flash kernel. A static reason is listed like a failed probe."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(kernels, "cudnn_unavailable_reason", lambda dtype, head_dim: None)
    monkeypatch.setattr(attention, "probe", lambda impl, *key: attention.Probe(impl, True, "stand-in"))
    shapes = dict(q_heads=32, kv_heads=8)
    assert attention.choose_impl(jnp.bfloat16, 4096, 128, max_segments=64, **shapes) == "cudnn"
    choice = attention.resolve("auto", jnp.bfloat16, 4096, 128, **shapes)
    assert choice.impl == "pallas" and [name for name, _ in choice.not_used] == ["cudnn", "tokamax"]
    assert dict(choice.not_used)["cudnn"].startswith("it needs max_segments, the most documents one row holds")
    assert "its kernels are for sm90/sm100" in dict(choice.not_used)["tokamax"]
    assert attention.choose_impl(jnp.bfloat16, 4000, 128, **shapes) == "xla"
    assert attention.choose_impl(jnp.float32, 4096, 128, max_segments=64, **shapes) == "xla"
    assert attention.resolve("auto", jnp.float32, 4096, 128, **shapes).why == (
        "no flash kernel is tried on gpu with float32")
    monkeypatch.setattr(kernels, "cudnn_unavailable_reason", lambda dtype, head_dim: "an A100 is sm80")
    assert attention.choose_impl(jnp.bfloat16, 4096, 128, max_segments=64, **shapes) == "pallas"


def fake_gpu(monkeypatch, cudnn_version: int):
    device = types.SimpleNamespace(compute_capability="9.0", device_kind="NVIDIA H200")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    monkeypatch.setattr(jax._src.lib, "cuda_versions", types.SimpleNamespace(cudnn_get_version=lambda: cudnn_version))


def test_cudnn_9_13_and_9_14_are_refused_unless_command_buffers_leave_cudnn_out(monkeypatch):
    """cuDNN 9.13/9.14 inside CUDA graphs crash the process (an illegal memory access no probe survives), so jsft
    requires XLA_FLAGS=--xla_gpu_enable_command_buffer= (set before the process starts) for those versions."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    fake_gpu(monkeypatch, 91400)
    reason = kernels.cudnn_unavailable_reason(jnp.bfloat16, 128)
    assert reason.startswith("cuDNN 9.14 crashes the process inside CUDA graphs")
    assert reason.endswith("start the process with XLA_FLAGS=--xla_gpu_enable_command_buffer= to use it")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_gpu_enable_command_buffer=")
    assert kernels.cudnn_unavailable_reason(jnp.bfloat16, 128) is None
    monkeypatch.delenv("XLA_FLAGS")
    for version in (91200, 91500, 90600):
        fake_gpu(monkeypatch, version)
        assert kernels.cudnn_unavailable_reason(jnp.bfloat16, 128) is None
    fake_gpu(monkeypatch, 90500)
    assert kernels.cudnn_unavailable_reason(jnp.bfloat16, 128) == "packed layout needs cuDNN >= 9.6, found 90500"


def test_command_buffer_flag_parsing():
    assert kernels.command_buffers_exclude_cudnn("--xla_gpu_enable_command_buffer=")
    assert kernels.command_buffers_exclude_cudnn("--xla_gpu_enable_command_buffer=FUSION,CUBLAS")
    assert not kernels.command_buffers_exclude_cudnn("")
    assert not kernels.command_buffers_exclude_cudnn("--xla_gpu_enable_command_buffer=FUSION,CUDNN")
    assert not kernels.command_buffers_exclude_cudnn("--xla_gpu_enable_command_buffer=custom_call")
    # the last one wins, as in XLA's flag parser
    assert kernels.command_buffers_exclude_cudnn(
        "--xla_gpu_enable_command_buffer=CUDNN --xla_gpu_enable_command_buffer=")


def test_plan_report_warns_with_the_byte_count_when_cudnn_s_backward_may_take_over_a_tenth_of_the_device(
        monkeypatch):
    monkeypatch.setattr(attention, "resolve", lambda impl, *a, **k: Choice("cudnn", "probe passed: stand-in"))
    shapes = dict(q_heads=32, kv_heads=8, max_segments=20, rows_per_device=2, heads_per_device=32)
    need = 2 * 32 * 32 * 8192 * 128 * 4  # rows x bound (20 -> 32) x heads x L x head dim x float32: 8 GiB
    entries, lines = attention.plan_report("auto", jnp.bfloat16, 8192, 128, device_bytes=64 * 2**30, **shapes)
    assert entries == {"attention_impl": "cudnn", "attention_choice": "cudnn (probe passed: stand-in)",
                       "cudnn_bound": 32, "cudnn_backward_bytes": need}
    assert lines[0] == ("attention cudnn (probe passed: stand-in); model.attention_impl='auto', at most 20 documents "
                        "a row")
    assert lines[1].startswith(f"WARNING: cuDNN's packed backward may need {need:,} bytes (8.0 GiB, rows 2 x bound "
                               "32 x heads 32 x L 8192 x head dim 128 x 4) per call, more than 10% of the device's "
                               "64.0 GiB")
    _, lines = attention.plan_report("auto", jnp.bfloat16, 8192, 128, device_bytes=100 * 2**30, **shapes)
    assert len(lines) == 1  # 8 GiB < 10 GiB
    _, lines = attention.plan_report("auto", jnp.bfloat16, 8192, 128, device_bytes=None, **shapes)
    assert len(lines) == 1  # a CPU reports no device memory


def test_plan_report_on_cpu_and_an_explicit_impl_that_cannot_run():
    entries, lines = attention.plan_report("auto", jnp.bfloat16, 64, 16, q_heads=4, kv_heads=2, max_segments=3,
                                           rows_per_device=1, heads_per_device=4, device_bytes=None)
    assert entries == {"attention_impl": "xla", "attention_choice": "xla (no flash kernel is tried on cpu with "
                                                                    "bfloat16)"}
    with pytest.raises(AttentionUnavailable, match="impl='cudnn' cannot run: it needs an NVIDIA GPU"):
        attention.plan_report("cudnn", jnp.bfloat16, 64, 16, q_heads=4, kv_heads=2, max_segments=3,
                              rows_per_device=1, heads_per_device=4, device_bytes=None)


def test_auto_on_a_cpu_is_xla_and_probes_nothing(monkeypatch, small_probe):
    seen = []
    monkeypatch.setattr(attention, "_probe", lambda *key: seen.append(key))
    for dtype in (jnp.bfloat16, jnp.float32):
        choice = attention.resolve("auto", dtype, 4096, 128, q_heads=32, kv_heads=8, max_segments=8)
        assert choice.impl == "xla" and choice.not_used == ()
    assert seen == []
