"""HF safetensors <-> jsft parameters: load a checkpoint, save a full / merged model, save a PEFT adapter.

One table (RULES) maps HF tensor names to jsft parameter paths and is read in both directions. HF linear
weights are [out, in]; jsft kernels are [in, out], hence `transpose`:

    model.layers.3.self_attn.q_proj.weight  [Hq*D, H]   <->  layers.3.self_attn.q_proj.kernel  [H, Hq*D]

The model holds its decoder layers stacked (jsft.model.llama: layers.mlp.up_proj.kernel [N, H, F]); RULES name
one layer's slice, layers.{i}.mlp.up_proj.kernel, which `layer_slices` turns into (stacked path, i):

    model.layers.3.mlp.up_proj.weight  [F, H]  <->  layers.3.mlp.up_proj.kernel  =  layers.mlp.up_proj.kernel[3]

Loading reads one tensor at a time (safetensors safe_open, numpy + ml_dtypes for bf16) into an abstractly
initialised model, so host memory never holds two copies of the weights. With `shardings`, each device reads only
its own slice (jax.make_array_from_callback over safetensors slices).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jsft import hub
from jsft.errors import CheckpointError
from jsft.model.params import STACKED, base_params, layer_slices, layer_values, path_str, stacked_path  # noqa: F401
from jsft.hub import check_local_or_hub, hub_unreachable, one_line
from jsft.model import quant
from jsft.model.llama import ARCHITECTURES, Llama, LlamaConfig
from jsft.peft_names import resolve_modules_to_save

# (HF tensor name, jsft parameter path, transpose). {i}: layer index; {proj}/{norm}: the module name.
RULES = (
    ("model.embed_tokens.weight", "embed_tokens.embedding", False),
    ("model.layers.{i}.self_attn.{proj}.weight", "layers.{i}.self_attn.{proj}.kernel", True),
    ("model.layers.{i}.self_attn.{proj}.bias", "layers.{i}.self_attn.{proj}.bias", False),
    ("model.layers.{i}.self_attn.{norm}.weight", "layers.{i}.self_attn.{norm}.scale", False),
    ("model.layers.{i}.mlp.{proj}.weight", "layers.{i}.mlp.{proj}.kernel", True),
    ("model.layers.{i}.mlp.{proj}.bias", "layers.{i}.mlp.{proj}.bias", False),
    ("model.layers.{i}.{norm}.weight", "layers.{i}.{norm}.scale", False),
    ("model.norm.weight", "norm.scale", False),
    ("lm_head.weight", "lm_head.kernel", True),
)
_FIELDS = {"i": r"\d+", "proj": r"[a-z]+_proj", "norm": r"[a-z_]*norm"}
# Tensors some checkpoints carry that the model recomputes or shares: skipped on load.
IGNORED = (r".*rotary_emb\.inv_freq",)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, rx in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{rx})")
    return re.compile(pattern + "$")


_HF_TO_JSFT = [(_regex(hf), jsft, t) for hf, jsft, t in RULES]
_JSFT_TO_HF = [(_regex(jsft), hf, t) for hf, jsft, t in RULES]


def hf_to_jsft(name: str) -> tuple[str, bool] | None:
    """'model.layers.0.mlp.up_proj.weight' -> ('layers.0.mlp.up_proj.kernel', True); None if no rule matches."""
    for rx, template, transpose in _HF_TO_JSFT:
        if m := rx.match(name):
            return template.format(**m.groupdict()), transpose
    return None


def jsft_to_hf(path: str) -> tuple[str, bool]:
    """'layers.0.mlp.up_proj.kernel' -> ('model.layers.0.mlp.up_proj.weight', True)."""
    for rx, template, transpose in _JSFT_TO_HF:
        if m := rx.match(path):
            return template.format(**m.groupdict()), transpose
    raise KeyError(f"jsft parameter {path!r} has no HF name in jsft.hf.RULES")


# ----------------------------------------------------------------------------------------------- loading

def resolve_model_dir(path, field: str = "model.model_name_or_path") -> Path:
    """The local directory of a checkpoint: `path` itself, or a hub name's config and safetensors downloaded (from
    the local HF cache only when the hub does not answer: jsft.hub)."""
    if check_local_or_hub(path, field):
        return Path(path)
    from huggingface_hub import snapshot_download

    unreachable = None if hub.offline() else hub.unreachable_reason()
    try:
        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"],
                                      local_files_only=unreachable is not None))
    except Exception as e:  # noqa: BLE001 (huggingface_hub's offline, not-found, connection and proxy errors)
        raise hub_unreachable(path, field, unreachable or e) from e


def read_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.exists() and (Path(path) / "adapter_config.json").exists():
        raise CheckpointError(f"{path} is a PEFT adapter (adapter_config.json), not a whole model. Fix: load the "
                              "merged export (export/ next to it; `python -m jsft.export --format merged` writes one), "
                              "or the base model with the adapter in peft")
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json; expected an HF checkpoint directory")
    return _read_json(config_file)


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({one_line(e)}): truncated or damaged? Fix: download or "
                              "copy the checkpoint's files again") from e


def _tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or an index of shards)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index)["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json found "
                              "(only safetensors checkpoints are supported)")
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def open_safetensors(file: Path):
    """safe_open(file, "np"), with a CheckpointError naming the file when it is missing, truncated or damaged."""
    try:
        return safe_open(file, "np")
    except FileNotFoundError as e:
        raise CheckpointError(f"{file} is missing (model.safetensors.index.json lists it). Fix: download or copy "
                              "every shard of the checkpoint") from e
    except Exception as e:  # noqa: BLE001 (safetensors raises SafetensorError: incomplete metadata, bad header, ...)
        raise CheckpointError(f"{file} is not a readable safetensors file ({one_line(e)}): truncated or damaged, e.g. "
                              "by an interrupted download or copy. Fix: download or copy it again") from e


def check_finite(block: np.ndarray, name: str, file) -> None:
    """CheckpointError when tensor `name` read from `file` holds NaN or inf (a damaged file, or a diverged run's
    save): training from it gives NaN from the first step. One float32 sum over the block (NaN and inf propagate),
    and a count of the bad values only when the sum is not finite (finite weights whose sum overflows pass)."""
    if not np.issubdtype(block.dtype, np.floating) and block.dtype != jnp.bfloat16:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(block, dtype=np.float32)):
            return
    bad = block.size - int(np.count_nonzero(np.isfinite(block)))
    if bad:
        raise CheckpointError(f"{file}: tensor {name!r} holds {bad:,} non-finite value(s) (NaN or inf) of {block.size:,}"
                              ": the file is damaged, or was saved from a diverged run. Fix: download or copy it again, "
                              "or load an earlier checkpoint")


def untie_if_head_differs(cfg: LlamaConfig, files: dict[str, Path], path) -> LlamaConfig:
    """config.json ties lm_head to the embedding, yet the files hold an lm_head.weight: transformers ties the two
    only when their values are equal, and otherwise loads the file's head with a warning. jsft does the same (and
    exports the model untied): dropping a trained head would change every logit."""
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if not (cfg.tie_word_embeddings and head in files and embed in files) or _equal_tensors(files, head, embed):
        return cfg
    warnings.warn(f"{path}: config.json has tie_word_embeddings=true but the files hold an {head} that differs from "
                  f"{embed}; loading both, untied, as transformers does (an export writes tie_word_embeddings=false). "
                  "Fix: set tie_word_embeddings to false in config.json, or remove lm_head.weight if the head was "
                  "meant to be the embedding", UserWarning, stacklevel=3)
    return dataclasses.replace(cfg, tie_word_embeddings=False, hf_config=dict(cfg.hf_config, tie_word_embeddings=False))


def _equal_tensors(files: dict[str, Path], a: str, b: str, rows: int = 4096) -> bool:
    """Tensors a and b of the checkpoint hold equal values (compared a block of rows at a time)."""
    with open_safetensors(files[a]) as fa, open_safetensors(files[b]) as fb:
        sa, sb = fa.get_slice(a), fb.get_slice(b)
        shape = tuple(sa.get_shape())
        if shape != tuple(sb.get_shape()) or sa.get_dtype() != sb.get_dtype():
            return False
        n = shape[0] if shape else 0
        return all(np.array_equal(sa[i:min(i + rows, n)], sb[i:min(i + rows, n)]) for i in range(0, n, rows))


def load_model(path, dtype=jnp.bfloat16, compute_dtype=None, attention_impl="auto", remat_policy="none",
               shardings=None, field: str = "model.model_name_or_path",
               quantization: dict | None = None) -> tuple[Llama, LlamaConfig]:
    """Read an HF checkpoint directory (or hub name, downloaded) into a jsft Llama; returns (model, cfg).

    dtype: parameter dtype (a jnp dtype or "bfloat16"/"float32"); compute_dtype defaults to dtype.
    shardings: None (plain device arrays), or a function (path str, abstract nnx.Variable) -> jax.sharding.Sharding,
    or a dict {path str: Sharding}; with one, each device reads only its slice of each tensor.
    field: what set `path`, for the error when it names no directory (e.g. "--model").
    quantization: None, or {"quant_type": "nf4" | "fp4" | "int8", "nested": bool} (jsft.config.quantization): the
    q/k/v/o/gate/up/down kernels are quantized as each is read (jsft.model.quant); the rest stays in dtype.
    """
    path = resolve_model_dir(path, field)
    dtype = DTYPES.get(dtype, dtype)
    compute_dtype = DTYPES.get(compute_dtype, compute_dtype) or dtype
    cfg = LlamaConfig.from_hf(read_config(path))
    generation = path / "generation_config.json"
    if generation.exists():
        cfg = dataclasses.replace(cfg, generation_config=_read_json(generation))
    files = _tensor_files(path)
    cfg = untie_if_head_differs(cfg, files, path)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, compute_dtype=compute_dtype,
                                         attention_impl=attention_impl, remat_policy=remat_policy))
    quantized = {} if quantization is None else quant.abstract_quantized(model, **quantization)
    targets = {**base_params(model), **quantized}
    slices = {name: (p, i) for p in targets for name, i in layer_slices(p, cfg.num_layers)}

    wanted = {}  # RULES path (one layer's slice) -> (hf name, transpose)
    for name in sorted(files):
        mapped = hf_to_jsft(name)
        if mapped is None or mapped[0] not in slices:
            if any(re.fullmatch(rx, name) for rx in IGNORED) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            raise CheckpointError(f"{path}: unexpected tensor {name!r}: the {cfg.model_type} model built from "
                                  "config.json has no parameter for it (does config.json match the weights?)")
        wanted[mapped[0]] = (name, mapped[1])
    for p in slices:
        if p not in wanted:
            raise CheckpointError(f"{path}: missing tensor {jsft_to_hf(p)[0]!r} (jsft parameter {p})")

    sharding_for = _sharding_lookup(shardings)
    handles = {}

    def source(name):  # (safetensors handle, tensor name, file) of one HF tensor
        if files[name] not in handles:
            handles[files[name]] = open_safetensors(files[name])
        return handles[files[name]], name, files[name]

    try:
        for p, var in targets.items():
            parts = [wanted[name] for name, _ in layer_slices(p, cfg.num_layers)]
            sources = [source(name) for name, _ in parts]
            stack = p.startswith(STACKED)
            if p in quantized:
                _read_quantized(sources if stack else sources[0], p, var, sharding_for)
            else:
                var.set_value(_read(sources if stack else sources[0], parts[0][1], var, dtype, sharding_for(p, var)))
    finally:
        handles.clear()
    for p, var in nnx.to_flat_state(nnx.state(model)):  # nothing abstract may survive the load
        if isinstance(var.get_value(), jax.ShapeDtypeStruct):
            raise RuntimeError(f"load_model left {path_str(p)} unset: jsft.hf.RULES does not cover that variable")
    return model, cfg


def _sharding_lookup(shardings):
    """shardings: None | a function (path, abstract Variable) -> Sharding | a {path: Sharding} dict | an nnx.State
    of Variables holding Shardings (what jsft.sharding.model_shardings returns) -> a function (path, var)."""
    if shardings is None:
        return lambda p, var: None
    if isinstance(shardings, nnx.State):
        shardings = {path_str(k): v.get_value() for k, v in nnx.to_flat_state(shardings)}
    if isinstance(shardings, dict):
        return lambda p, var: shardings[p]
    return shardings


def _read(source, transpose, var, dtype, sharding):
    """One parameter from the files, transposed/cast to the jsft layout; only the device's slices when sharded.

    source: (handle, HF name, file) of one tensor, or a list of them, one per layer, for a stacked parameter
    [N, ...]: each HF tensor is read into its layer's slice of the block, one tensor at a time (the host holds one
    parameter's block, never the model twice). Each block read is checked for NaN/inf (check_finite)."""
    shape = tuple(var.shape)
    layers = source if isinstance(source, list) else None
    one_shape = shape[1:] if layers else shape
    expected = one_shape[::-1] if transpose else one_shape
    hf_slices = []
    for handle, name, file in layers or [source]:
        hf_slice = handle.get_slice(name)
        hf_shape = tuple(hf_slice.get_shape())
        if hf_shape != expected:
            raise CheckpointError(f"tensor {name!r} has shape {list(hf_shape)} in the checkpoint but the model "
                                  f"expects {list(expected)} (jsft parameter shape {list(shape)})")
        hf_slices.append((hf_slice, name, file))

    def read_one(k, index):
        hf_slice, name, file = hf_slices[k]
        block = hf_slice[index[::-1] if transpose else index]
        block = np.ascontiguousarray((block.T if transpose else block).astype(dtype))
        check_finite(block, name, file)
        return block

    def read(index):
        index = tuple(index) if index else tuple(slice(None) for _ in shape)
        if not layers:
            return read_one(0, index)
        first, *rest = index
        picked = range(len(layers))[first]
        block = None
        for j, k in enumerate(picked):
            one = read_one(k, tuple(rest))
            if block is None:
                block = np.empty((len(picked), *one.shape), one.dtype)
            block[j] = one
        return block

    if sharding is None:
        return jnp.asarray(read(None))
    return jax.make_array_from_callback(shape, sharding, read)


def _read_quantized(source, path, kernel, sharding_for):
    """One projection's HF weights, quantized into `kernel`'s arrays, each placed like its Variable's logical axes
    say (every process quantizes the same tensors: the same values).

    source: (handle, HF name, file) of one weight [out, in], or a list of them, one per layer, for a stacked kernel
    [N, in, out]: layer j's weight is read whole (one tensor at a time), checked for NaN/inf and quantized into
    slice j of the host arrays (quant.shapes with the leading N), so the host holds one layer's weight in bf16 and
    one projection's quantized arrays, never the model twice."""
    layers = source if isinstance(source, list) else None
    hf_shape = tuple(kernel.shape[:-2]) + tuple(kernel.shape[-2:][::-1])
    one_shape = hf_shape[1:] if layers else hf_shape
    arrays = {key: np.empty(shape, dtype) for key, (shape, dtype, _) in
              quant.shapes(hf_shape, kernel.quant_type, kernel.nested).items()}
    for j, (handle, name, file) in enumerate(layers or [source]):
        hf_slice = handle.get_slice(name)
        if tuple(hf_slice.get_shape()) != one_shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(hf_slice.get_shape())} in the checkpoint but the "
                                  f"model expects {list(one_shape)} (jsft parameter shape {list(kernel.shape)})")
        block = hf_slice[:]
        check_finite(block, name, file)
        for key, value in quant.quantize(block, kernel.quant_type, kernel.nested, name).items():
            if layers:
                arrays[key][j] = value
            else:
                arrays[key] = value
    for key, value in arrays.items():
        var = getattr(kernel, key)
        sharding = sharding_for(f"{path}.{key}", var)
        if sharding is None:
            var.set_value(jnp.asarray(value))
        else:
            var.set_value(jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index]))


# ----------------------------------------------------------------------------------------------- saving


def _layer(value, i):
    return value if i is None else value[i]


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def save_model(model: Llama, out_dir, tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write an HF checkpoint transformers loads: config.json, generation_config.json, safetensors (+ index when
    sharded), tokenizer files. LoRA weights, if any, are merged into the kernels written (the model is unchanged).
    """
    from jsft.model.lora import merged_params

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for p, value in merged_params(model).items():
        name, transpose = jsft_to_hf(p)
        tensors[name] = (value, transpose)
    dtype = model.param_dtype
    _write_safetensors(out, tensors, max_shard_bytes, dtype)
    hf = dict(model.cfg.hf_config, vocab_size=model.cfg.vocab_size, dtype=_dtype_name(dtype))
    hf.pop("torch_dtype", None)
    hf["model_type"] = hf.get("model_type") or model.cfg.model_type  # a config written by hand may lack them
    hf["architectures"] = hf.get("architectures") or [a for a, t in ARCHITECTURES.items() if t == model.cfg.model_type]
    hf.setdefault("tie_word_embeddings", model.cfg.tie_word_embeddings)
    if jax.process_index() != 0:  # every process joined the gathers above; one writes the small files
        return out
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    generation = model.cfg.generation_config or {
        k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _to_host(x) -> np.ndarray:
    """A (possibly sharded) array -> numpy on this host; across processes, every process joins the gather."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _write_safetensors(out: Path, tensors: dict, max_shard_bytes: int, dtype, prefix="model"):
    """Group tensors into shards of at most max_shard_bytes (a tensor larger than that gets its own shard).

    tensors: {HF name: (array or a function returning it, transpose)}; host memory holds one shard at a time."""
    shards, current, size = [], [], 0
    for name in sorted(tensors):
        value = tensors[name][0]
        shape = jax.eval_shape(value).shape if callable(value) else np.shape(value)
        nbytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        file = f"{prefix}.safetensors" if len(shards) == 1 else f"{prefix}-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for name in names:
            value, transpose = tensors[name]
            arr = _to_host(value() if callable(value) else value).astype(dtype)
            arrays[name] = np.ascontiguousarray(arr.T if transpose else arr)
            weight_map[name] = file
            total += arrays[name].nbytes
        if jax.process_index() == 0:
            save_file(arrays, str(out / file), metadata={"format": "pt"})
    if len(shards) > 1 and jax.process_index() == 0:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_merged(model: Llama, out_dir, tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """The full HF model with every LoRA delta folded into its kernel (W + alpha/r * A @ B); the model is unchanged."""
    from jsft.model.lora import lora_modules

    if not lora_modules(model):
        raise ValueError("save_merged: the model has no LoRA layers; use save_model for a full fine-tune")
    return save_model(model, out_dir, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)


def save_peft_adapter(model: Llama, out_dir, base_model_name_or_path: str, r: int, alpha: float, dropout: float,
                      target_modules, added_token_ids=None, save_embeddings: bool = False,
                      use_rslora: bool = False, modules_to_save=None) -> Path:
    """adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained(base, out_dir)` loads.

    Keys follow PEFT: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight [r, in] and .lora_B.weight
    [out, r] (jsft's lora_a [in, r] / lora_b [r, out] transposed). Stored in float32, as PEFT keeps adapters.

    added_token_ids (tokens a cloned chat template added, trained as embedding rows): saved as TRL configures PEFT,
    `trainable_token_indices={"embed_tokens": ids}` (those rows' values) plus, when the head is untied,
    `modules_to_save=["lm_head"]` (the whole head). Loading then needs the base resized to the model's vocabulary
    first: `base.resize_token_embeddings(vocab_size)`, as for TRL's own adapters.

    save_embeddings=True (the whole embedding and head were trained): both go in whole, as
    `modules_to_save=["embed_tokens", "lm_head"]` (for a tied model the head is the embedding, saved untied so PEFT's
    copy of the embedding and the head agree). Use one of added_token_ids / save_embeddings, matching what trained.

    DoRA layers add ...q_proj.lora_magnitude_vector [out] (PEFT's file key, no ".weight") and use_dora=true.
    modules_to_save (lora_modules_to_save, PEFT's names, e.g. ["lm_head", "embed_tokens"]): those modules' whole
    weights under the base model's names (base_model.model.lm_head.weight), as PEFT's save_pretrained writes them
    (it drops the ".modules_to_save.default" of its live parameter names; from_pretrained puts it back).
    target_modules: a regex string is written as given (PEFT then selects the same projections), a list as the
    projection names the model's LoRA layers have.
    """
    from jsft.model.lora import lora_modules

    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_peft_adapter: the model has no LoRA layers (apply_lora was not called)")
    for path, module in modules.items():
        if module.r != r or module.alpha != alpha:
            raise ValueError(f"save_peft_adapter: {path} has r={module.r}, alpha={module.alpha} but r={r}, "
                             f"alpha={alpha} were given; pass the values apply_lora used")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, module in modules.items():
        for kernel, i in layer_slices(f"{path}.kernel", model.cfg.num_layers):
            prefix = "base_model.model." + jsft_to_hf(kernel)[0].removesuffix(".weight")
            tensors[f"{prefix}.lora_A.weight"] = (lambda m=module, i=i: _layer(m.lora_a.get_value(), i), True)
            tensors[f"{prefix}.lora_B.weight"] = (lambda m=module, i=i: _layer(m.lora_b.get_value(), i), True)
            if module.lora_magnitude is not None:
                tensors[f"{prefix}.lora_magnitude_vector"] = (
                    lambda m=module, i=i: _layer(m.lora_magnitude.get_value(), i), False)
    use_dora = any(m.lora_magnitude is not None for m in modules.values())
    trainable_tokens = None
    if save_embeddings and added_token_ids is not None:
        raise ValueError("save_peft_adapter: pass added_token_ids (only those rows trained) or save_embeddings=True "
                         "(the whole embedding and head trained), not both")
    saved = list(modules_to_save or [])
    cfg = model.cfg
    for name in resolve_modules_to_save(saved, cfg.num_layers, cfg.qk_norm, cfg.tie_word_embeddings):
        for path, var in base_params(model).items():
            if name in path.split("."):
                for slice_name, i in layer_slices(path, cfg.num_layers):
                    hf_name, transpose = jsft_to_hf(slice_name)
                    tensors[f"base_model.model.{hf_name}"] = (lambda v=var, i=i: _layer(v.get_value(), i), transpose)
    if save_embeddings:
        saved += [m for m in ("embed_tokens", "lm_head") if m not in saved]
        tensors["base_model.model.model.embed_tokens.weight"] = (model.embed_tokens.embedding[...], False)
        tensors["base_model.model.lm_head.weight"] = (model.lm_head_weight(), True)
    if added_token_ids is not None and len(added_token_ids):
        ids = sorted(int(i) for i in added_token_ids)
        if ids[0] < 0 or ids[-1] >= model.cfg.vocab_size:
            raise ValueError(f"save_peft_adapter: added_token_ids {ids[0]}..{ids[-1]} fall outside the model's "
                             f"vocabulary of {model.cfg.vocab_size} (was resize_vocab called?)")
        trainable_tokens = {"embed_tokens": ids}
        rows = model.embed_tokens.embedding[...][np.asarray(ids)]
        tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = (rows, False)
        if not model.cfg.tie_word_embeddings:
            saved += [] if "lm_head" in saved else ["lm_head"]
            tensors["base_model.model.lm_head.weight"] = (model.lm_head.kernel[...], True)
    _write_safetensors(out, tensors, max_shard_bytes=2**62, dtype=jnp.float32, prefix="adapter_model")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules if isinstance(target_modules, str) and target_modules != "all-linear"
        else sorted({path.rsplit(".", 1)[-1] for path in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": bool(use_rslora),
        "use_dora": use_dora,
        "modules_to_save": saved or None,
        "trainable_token_indices": trainable_tokens,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
