"""What checkpoint manifests (jsft.manifest: every file's size and xxh3-128 hash) and the data fingerprint cost.

    python benchmarks/checkpoint_manifest.py [--hidden 1024 --layers 4]   # results/checkpoint_manifest-*.json

Saves a random Llama (fp32) with its Adam moments (after one step on random gradients) through jsft.checkpoint
(synchronously), with the manifest and with jsft.manifest.write replaced by a no-op, alternating; then times
manifest.check alone (page cache warm, so the hash is the whole cost: the larger it can be) and
checkpoint.data_fingerprint over 100M tokens.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit  # noqa: E402

from jsft import checkpoint, manifest, outdir  # noqa: E402
from jsft.model.llama import Llama, LlamaConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    H = args.hidden
    hf_config = dict(model_type="llama", vocab_size=32000, hidden_size=H, intermediate_size=int(H * 2.75),
                     num_hidden_layers=args.layers, num_attention_heads=H // 64, num_key_value_heads=H // 128,
                     max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = Llama(LlamaConfig.from_hf(hf_config), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape, dtype=np.float32), nnx.state(model, nnx.Param))
    optimizer.update(model, grads)  # Adam's moments as after a step: random bytes, as incompressible as real ones
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with_manifest, without = [], []
    real_write = manifest.write
    with tempfile.TemporaryDirectory(prefix="jsft-manifest-", dir=os.environ.get("BENCH_DIR")) as tmp:
        for repeat in range(args.repeats):
            for use in (True, False):
                out = Path(tmp) / f"run{repeat}{use}"
                manifest.write = real_write if use else (lambda directory: None)
                with checkpoint.make_manager(out, save_total_limit=None, async_save=False) as manager:
                    started = time.perf_counter()
                    checkpoint.save(manager, 1, model, optimizer, {"next_index": 0})
                    (with_manifest if use else without).append(time.perf_counter() - started)
                if use:
                    folder = out / "checkpoints" / "1"
                    size = outdir.tree_bytes(folder)
                    started = time.perf_counter()
                    assert manifest.check(folder) is None
                    check_s = time.perf_counter() - started
                shutil.rmtree(out)
        manifest.write = real_write
    tokens = np.random.default_rng(0).integers(0, 32000, 100_000_000, dtype=np.int32)
    examples = SimpleNamespace(tokens=tokens, loss_mask=tokens % 2 == 0, offsets=np.arange(0, len(tokens) + 1, 500))
    started = time.perf_counter()
    checkpoint.data_fingerprint(SimpleNamespace(examples=examples))
    fingerprint_s = time.perf_counter() - started
    results = dict(params=params, checkpoint_bytes=size, save_with_manifest_s=statistics.median(with_manifest),
                   save_without_manifest_s=statistics.median(without), runs_with_manifest_s=with_manifest,
                   runs_without_manifest_s=without, check_s=check_s, check_gib_per_s=size / 2**30 / check_s,
                   data_fingerprint_100m_tokens_s=fingerprint_s)
    results["save_overhead"] = results["save_with_manifest_s"] / results["save_without_manifest_s"] - 1
    print(f"{params / 1e6:.0f}M params, checkpoint {size / 2**30:.2f} GiB: save {results['save_with_manifest_s']:.2f} "
          f"s with the manifest, {results['save_without_manifest_s']:.2f} s without ({results['save_overhead']:+.1%}); "
          f"check {check_s:.2f} s ({results['check_gib_per_s']:.2f} GiB/s); data fingerprint of 100M tokens "
          f"{fingerprint_s:.2f} s")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = Path(__file__).parent / "results" / f"checkpoint_manifest-cpu-{date}.json"
    record = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), date=date, git_commit=git_commit(),
                  machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_average=os.getloadavg()),
                  hf_config=hf_config, results=results)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
