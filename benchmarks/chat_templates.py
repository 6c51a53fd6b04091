"""Assistant-only masks on real chat templates: how many conversations are trained, refused, or silently wrong.

    python benchmarks/chat_templates.py [--tag NAME]

Every template TRL ships in trl/chat_templates (originals and their `_training` variants with {% generation %}
markers) renders several conversation shapes: one turn, multi-turn, a system prompt, reasoning in
`reasoning_content`, reasoning as `<think>...</think>` inside content.
Each goes through jsft's one row -> example path (assistant_only_loss, split_conversations="auto") with the fixture
tokenizer (the templates' control tokens become plain text: masks are compared as text). Per conversation:

- not renderable: the template itself raises on it (e.g. no system role), or leaves out text given as a string
  (VLM templates render only content parts) -- not counted against jsft;
- refused: jsft raises ChatTemplateError / BadRowError (the message is recorded: it must name the problem and a
  fix; `refusals_without_a_fix` counts those that do not);
- wrong: trained, but the mask fails a check that does not use jsft's inference: every trained run must lie inside
  one assistant turn's rendering as the last turn (the text after the generation prompt) and together they must hold
  each assistant message's answer text; no user or system text may be trained; where the template has a `_training`
  variant rendering the same text and jsft did not split the conversation, the trained runs must equal the
  variant's {% generation %} runs up to whitespace at a turn's edge (and the end of the generation prompt, which
  TRL's variants mark too);
- trained: the rest. Reasoning is counted as trained where the trained text holds it.

Writes benchmarks/results/chat_templates-<date>[-<tag>].json (never over an existing file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

from common import git_commit  # benchmarks/common.py (this script's folder is on sys.path)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def shapes() -> dict[str, list[dict]]:
    """Conversation shapes; every text is unique so a trained run can be traced to its message."""
    def user(k):
        return {"role": "user", "content": f"question U{k}"}

    def answer(k, **extra):
        return {"role": "assistant", "content": f"answer A{k}", **extra}

    return {
        "single": [user(1), answer(1)],
        "multi_turn": [user(1), answer(1), user(2), answer(2), user(3), answer(3)],
        "system": [{"role": "system", "content": "system S1"}, user(1), answer(1), user(2), answer(2)],
        "reasoning_field": [user(1), answer(1, reasoning_content="reason R1"), user(2),
                            answer(2, reasoning_content="reason R2")],
        "reasoning_single": [user(1), answer(1, reasoning_content="reason R1")],
        "think_in_content": [
            user(1), {"role": "assistant", "content": "<think>\nreason R1\n</think>\n\nanswer A1"},
            user(2), {"role": "assistant", "content": "<think>\nreason R2\n</think>\n\nanswer A2"}],
        "system_reasoning": [{"role": "system", "content": "system S1"}, user(1),
                             answer(1, reasoning_content="reason R1"), user(2),
                             answer(2, reasoning_content="reason R2")],
    }


def runs(ids, mask, tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    out, start = [], None
    for k, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = k
        elif not m and start is not None:
            out.append(tokenizer.decode([int(t) for t in ids[start:k]]))
            start = None
    return out


def documents(example):
    import numpy as np

    ends = np.cumsum(example.get("document_lengths", [len(example["input_ids"])]))
    return [(example["input_ids"][a:b], example["loss_mask"][a:b]) for a, b in zip(np.r_[0, ends[:-1]], ends)]


def as_last_turns(tokenizer, messages) -> list[str] | None:
    """Per assistant turn, what the template renders after the generation prompt when that turn is the last one
    (None where the generation prompt is not a prefix: then only the answer-text checks apply)."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not upto.startswith(before):
            return None
        out.append(upto[len(before):])
    return out


def check(tokenizer, messages, example, variant_runs, markers: bool, opening: str | None) -> str | None:
    """Why the mask is wrong, or None (module doc)."""
    trained = [r for ids, mask in documents(example) for r in runs(ids, mask, tokenizer)]
    text = "".join(trained)
    for m in messages:
        if m["role"] in ("user", "system") and m["content"] in text:
            return f"trains {m['role']} text {m['content']!r}"
    for m in messages:
        if m["role"] == "assistant":
            answer = m["content"].split("</think>")[-1].strip()
            if answer not in text:
                return f"does not train the answer {answer!r}"
    last = None if markers else as_last_turns(tokenizer, messages)  # markers: the template's own spans (TRL's)
    if last is not None:
        for r in trained:
            if not any(r.strip() in turn for turn in last):
                return f"trained run {r!r} is in no turn's rendering as the last turn"
    split = "document_lengths" in example  # then trained as at inference, not as the full rendering marks it
    if variant_runs is not None and not split and not same_runs(trained, variant_runs, opening):
        return f"trained {trained!r} where the _training variant trains {variant_runs!r}"
    return None


def same_runs(ours: list[str], theirs: list[str], opening: str | None) -> bool:
    """The same trained runs up to whitespace at their edges; a marked run may also hold the end of the generation
    prompt (TRL's variants mark `<think>\\n` that the original's generation prompt already writes)."""
    ours, theirs = sorted(r.strip() for r in ours), sorted(r.strip() for r in theirs)
    if ours == theirs:
        return True
    tail = (opening or "").strip()
    if len(ours) != len(theirs):
        return False
    for a, b in zip(sorted(ours, key=len), sorted(theirs, key=len)):
        if a != b and not (b.endswith(a) and tail.endswith(b[: len(b) - len(a)].strip())):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    import trl
    from transformers import AutoTokenizer

    from jsft import fixtures
    from jsft.config import DataConfig
    from jsft.data import BadRowError, prepare_example
    from jsft.data.chat import ChatTemplateError, generation_prompt, has_generation_markers

    folder = Path(trl.__file__).parent / "chat_templates"
    templates = {p.stem: p.read_text() for p in sorted(folder.glob("*.jinja"))}
    work = Path(tempfile.mkdtemp(prefix="jsft-templates-"))
    base = AutoTokenizer.from_pretrained(fixtures.build_tokenizer(work / "tokenizer"))
    config = DataConfig(assistant_only_loss=True, max_length=None)
    totals = {"conversations": 0, "not_renderable": 0, "renderable": 0, "trained": 0, "refused": 0, "wrong": 0,
              "split": 0, "reasoning_rendered": 0, "reasoning_trained": 0}
    per_template, refusals, wrong = {}, {}, []
    for name, template in templates.items():
        tok = base  # one tokenizer, its template swapped (the masks depend on nothing else)
        counts = dict.fromkeys(("renderable", "trained", "refused", "wrong", "split"), 0)
        for shape, messages in shapes().items():
            totals["conversations"] += 1
            tok.chat_template = template
            try:
                rendered = tok.apply_chat_template(messages, tokenize=False)
            except Exception:  # noqa: BLE001 (the template refuses this shape: not jsft's to train)
                totals["not_renderable"] += 1
                continue
            if not all(m["content"].split("</think>")[-1].strip() in rendered for m in messages):
                totals["not_renderable"] += 1  # it drops text given as a string (VLM templates want content parts)
                continue
            counts["renderable"] += 1
            variant_text = None
            variant = templates.get(f"{name}_training")
            if variant is not None:
                tok.chat_template = variant
                try:
                    out = tok.apply_chat_template(messages, tokenize=False, return_dict=False)
                    if out == rendered:
                        marked = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
                        variant_text = runs(marked["input_ids"], marked["assistant_masks"], tok)
                except Exception:  # noqa: BLE001
                    variant_text = None
                tok.chat_template = template
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    example = prepare_example({"messages": messages}, tok, config, row_index=0)
            except (ChatTemplateError, BadRowError) as e:
                counts["refused"] += 1
                refusals.setdefault(name, []).append({"shape": shape, "error": str(e)[:1500]})
                continue
            problem = check(tok, messages, example, variant_text, has_generation_markers(template),
                            generation_prompt(tok))
            if problem is not None:
                counts["wrong"] += 1
                wrong.append({"template": name, "shape": shape, "problem": problem[:400]})
                continue
            counts["trained"] += 1
            counts["split"] += "document_lengths" in example
            reasons = [m.get("reasoning_content") or (m["content"].split("</think>")[0].split("<think>")[-1].strip()
                       if "</think>" in m["content"] else None) for m in messages if m["role"] == "assistant"]
            for reason in filter(None, reasons):
                if reason in rendered or any(reason in tok.decode(ids.tolist()) for ids, _ in documents(example)):
                    totals["reasoning_rendered"] += 1
                    trained_text = "".join(r for ids, mask in documents(example) for r in runs(ids, mask, tok))
                    totals["reasoning_trained"] += reason in trained_text
        per_template[name] = counts
        for k in ("renderable", "trained", "refused", "wrong", "split"):
            totals[k] += counts[k]
    totals["refused_share_of_renderable"] = totals["refused"] / max(1, totals["renderable"])
    totals["refusals_without_a_fix"] = sum("Fix:" not in r["error"] for rs in refusals.values() for r in rs)
    result = {
        "benchmark": "chat_templates", "date": datetime.date.today().isoformat(), "commit": git_commit(),
        "templates": len(templates), "shapes": list(shapes()), "totals": totals, "per_template": per_template,
        "refusals": refusals, "wrong": wrong,
    }
    out_dir = Path(__file__).parent / "results"
    stem = f"chat_templates-{result['date']}" + (f"-{args.tag}" if args.tag else "")
    path, n = out_dir / f"{stem}.json", 2
    while path.exists():
        path, n = out_dir / f"{stem}-{n}.json", n + 1
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(totals, indent=1))
    for name, items in refusals.items():
        print(f"refused {name}: {[i['shape'] for i in items]}: {items[0]['error'][:300]}")
    for item in wrong:
        print(f"WRONG {item}")
    print(f"wrote {path}")
    sys.exit(1 if wrong or totals["refusals_without_a_fix"] else 0)


if __name__ == "__main__":
    main()
