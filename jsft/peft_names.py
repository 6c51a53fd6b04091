"""PEFT's module names for jsft's Llama: which projections `lora_target_modules` selects and which modules
`lora_modules_to_save` trains whole, by PEFT's own matching rules on transformers' module names. Pure Python, so
config checks use it without JAX; the model side (jsft.model.lora, jsft.build) calls it with the model's sizes.

    lora_target_modules  "all-linear"  every projection of the decoder layers (PEFT: all linear layers but lm_head)
                         a str         a regex, re.fullmatch'ed against each full module name
                                       ("model.layers.0.self_attn.q_proj"), as peft.tuners.tuners_utils does
                         a list        a name matches when it equals an entry or ends with "." + entry
    lora_modules_to_save a list        a name matches when it ends with an entry (plain str.endswith, PEFT's rule:
                                       "norm" selects model.norm and every layer's *_layernorm)

jsft's decoder layers are stacked (one scanned layer), so a projection takes LoRA in every layer or none: a pattern
that selects a projection in some layers only is refused, as is one that selects what jsft cannot adapt.
"""

from __future__ import annotations

import re

from jsft.errors import ConfigError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# modules lora_modules_to_save can train whole (jsft attribute name = transformers' module name)
SAVABLE = ("embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm", "q_norm", "k_norm")
ALL_LINEAR = "all-linear"


def hf_module_names(num_layers: int, qk_norm: bool = False) -> list[str]:
    """transformers' named_modules() of a Llama-family causal LM (the root "" left out)."""
    names = ["model", "model.embed_tokens", "model.layers"]
    for i in range(num_layers):
        layer = f"model.layers.{i}"
        attention = [f"{layer}.self_attn.{p}" for p in ATTENTION_PROJECTIONS]
        norms = [f"{layer}.self_attn.q_norm", f"{layer}.self_attn.k_norm"] if qk_norm else []
        mlp = [f"{layer}.mlp.{p}" for p in MLP_PROJECTIONS]
        names += [layer, f"{layer}.self_attn", *attention, *norms, f"{layer}.mlp", *mlp, f"{layer}.mlp.act_fn",
                  f"{layer}.input_layernorm", f"{layer}.post_attention_layernorm"]
    return names + ["model.norm", "model.rotary_emb", "lm_head"]


def is_all_linear(target_modules) -> bool:
    return target_modules == ALL_LINEAR or target_modules == [ALL_LINEAR]


def target_matches(target_modules, key: str) -> bool:
    """PEFT's check_target_module_exists: a str is a regex full-matched, a list matches equal names or suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return key in target_modules or any(key.endswith(f".{t}") for t in target_modules)


def check_target_syntax(target_modules, field: str = "lora.lora_target_modules") -> None:
    """What can be checked without the model: a regex compiles, list entries name a projection (their last part)."""
    if is_all_linear(target_modules):
        return
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ConfigError(f"{field}={target_modules!r} is a regex (PEFT's rule for a string) that does not "
                              f"compile: {e}. Fix the pattern, or give a list of module names") from None
        return
    entries = list(target_modules or [])
    unknown = [t for t in entries if not isinstance(t, str) or t.rsplit(".", 1)[-1] not in LINEAR_NAMES]
    if unknown or not entries:
        raise ConfigError(f"{field}={target_modules!r}: use 'all-linear', a regex string, or a list of "
                          f"{', '.join(LINEAR_NAMES)}" + (f" ({', '.join(map(repr, unknown))} is not one)"
                                                          if unknown else ""))


def resolve_targets(target_modules, num_layers: int, qk_norm: bool = False,
                    field: str = "lora.lora_target_modules") -> tuple[str, ...]:
    """The projections (from LINEAR_NAMES, in that order) that `target_modules` selects in every layer.

    resolve_targets(r".*\\.(q|v)_proj", 2) -> ("q_proj", "v_proj");  resolve_targets(["self_attn.o_proj"], 2) ->
    ("o_proj",);  resolve_targets("q_proj", 2) -> ConfigError (a string is a regex; it matches no full name)."""
    if is_all_linear(target_modules):
        return LINEAR_NAMES
    check_target_syntax(target_modules, field)
    names = hf_module_names(num_layers, qk_norm)
    matched = [k for k in names if target_matches(target_modules, k)]
    rule = ("a string is a regex full-matched against each full module name" if isinstance(target_modules, str)
            else "a list entry matches a module name equal to it or ending in '.' + entry")
    if not matched:
        hint = f"; did you mean [{target_modules!r}] or r'.*\\.{target_modules}'?" if (
            isinstance(target_modules, str) and target_modules in LINEAR_NAMES) else ""
        raise ConfigError(f"{field}={target_modules!r} matches no module of the model (PEFT's rule: {rule}); its "
                          f"modules are {_summary(names)}{hint}")
    not_linear = [k for k in matched if k.rsplit(".", 1)[-1] not in LINEAR_NAMES]
    if not_linear:
        raise ConfigError(f"{field}={target_modules!r} matches {_summary(not_linear)}: jsft puts LoRA on the "
                          f"projections {', '.join(LINEAR_NAMES)} only (train lm_head / embed_tokens / norms whole "
                          "with lora_modules_to_save)")
    _check_every_layer(matched, num_layers, field, target_modules)
    found = {k.rsplit(".", 1)[-1] for k in matched}
    return tuple(p for p in LINEAR_NAMES if p in found)


def resolve_modules_to_save(modules_to_save, num_layers: int, qk_norm: bool = False, tied: bool = False,
                            field: str = "lora.lora_modules_to_save") -> tuple[str, ...]:
    """The jsft modules (from SAVABLE) that `modules_to_save` trains whole, by PEFT's str.endswith rule.

    resolve_modules_to_save(["lm_head", "embed_tokens"], 2) -> ("embed_tokens", "lm_head")
    resolve_modules_to_save(["norm"], 2) -> ("norm", "input_layernorm", "post_attention_layernorm")"""
    if not modules_to_save:
        return ()
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    names = [k for k in hf_module_names(num_layers, qk_norm) if k != "model.rotary_emb"]
    matched = []
    for entry in modules_to_save:
        hits = [k for k in names if k.endswith(entry)]
        if not hits:
            raise ConfigError(f"{field}: {entry!r} matches no module of the model (PEFT's rule: a module name "
                              f"ending with it); its modules are {_summary(names)}")
        matched += hits
    if tied and {"model.embed_tokens", "lm_head"} & set(matched):
        raise ConfigError(f"{field}={list(modules_to_save)!r} on a model with tie_word_embeddings=true: jsft holds one "
                          "matrix for the embedding and the head, while PEFT's modules_to_save trains a separate "
                          "copy of the module named; not supported. Fix: drop embed_tokens / lm_head from it, or "
                          "untie the checkpoint (tie_word_embeddings=false with lm_head.weight in its files)")
    unsupported = sorted({k for k in matched if k.rsplit(".", 1)[-1] not in SAVABLE})
    if unsupported:
        raise ConfigError(f"{field}={list(modules_to_save)!r} matches {_summary(unsupported)}: jsft trains whole only "
                          f"{', '.join(SAVABLE)} (LoRA goes on the projections)")
    _check_every_layer(matched, num_layers, field, modules_to_save)
    found = {k.rsplit(".", 1)[-1] for k in matched}
    return tuple(m for m in SAVABLE if m in found)


def _check_every_layer(matched: list[str], num_layers: int, field: str, value) -> None:
    layers_of: dict[str, set[int]] = {}
    for key in matched:
        if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key):
            layers_of.setdefault(m.group(2), set()).add(int(m.group(1)))
    partial = {name: sorted(layers) for name, layers in layers_of.items() if len(layers) != num_layers}
    if partial:
        name, layers = next(iter(partial.items()))
        raise ConfigError(f"{field}={value!r} selects {name} in layers {', '.join(map(str, layers))} only, of "
                          f"{num_layers}: jsft's decoder layers are stacked (one scanned layer), so a module is "
                          f"adapted or trained in every layer or in none. Fix: match every layer (e.g. "
                          f"r'.*\\.{name.rsplit('.', 1)[-1]}')")


def _summary(names: list[str]) -> str:
    """Module names with layer indices folded: model.layers.<i>.self_attn.q_proj, ... (each once)."""
    folded = list(dict.fromkeys(re.sub(r"^model\.layers\.\d+\.", "model.layers.<i>.", k) for k in names))
    return ", ".join(folded)
