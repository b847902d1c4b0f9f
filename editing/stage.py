"""The editing stage of `python main.py edit` (and of `comprehensive`): edits after the knowledge stage, the
`<label>_knowledge_editing.json` files, the console table, the figure, the report section and `--save-edited`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.outputs import table, versions, write_json, write_text
from editing.edits import EditOptions, first_token, restored, update
from editing.evaluation import ERASE_KEYS, UPDATE_KEYS, run_editing
from models.demo import INFO_FILE
from report.figures import new_figure, save, title, value_labels

log = logging.getLogger(__name__)

# (operation, metric, panel title, y-axis label, scale, reference line)
METRICS = [
    ("update", "reliability", "update: reliability", "share of the fact's prompts", 1, None),
    ("update", "generalization", "update: generalization", "share of held-out prompts", 1, None),
    ("update", "locality", "update: locality", "share of other facts' prompts unchanged", 1, None),
    ("update", "perplexity_ratio", "update: perplexity, neutral text", "perplexity after / before", 1, 1.0),
    ("erase", "relation_p_change", "erase: P(answer), erased relation", "mean relative change (%)", 100, 0.0),
    ("erase", "other_relations_p_change", "erase: P(answer), other relations", "mean relative change (%)", 100, 0.0),
    ("erase", "perplexity_ratio", "erase: perplexity, neutral text", "perplexity after / before", 1, 1.0),
]


@dataclass
class Editing:
    """The stage's results: the JSON document of each model (by label), the files written (relative to --out)."""

    docs: dict[str, dict]
    files: dict[str, str]
    figure: str
    demo: bool


def edit_options_from(args: argparse.Namespace) -> EditOptions:
    return EditOptions(rule=args.edit_rule, norm_lambda1=args.edit_lambdas[0], norm_lambda2=args.edit_lambdas[1],
                       erase_top=args.erase_top, random_draws=args.random_draws, seed=args.seed,
                       edit_facts=args.edit_facts, locality_prompts=args.locality_prompts)


def is_demo_model(name: str) -> bool:
    """A model folder written by models/demo.py (it holds demo_info.json)."""
    return (Path(name) / INFO_FILE).is_file()


def editing_stage(args: argparse.Namespace, done: Mapping, arguments: dict, notes: dict | None = None) -> Editing:
    """Edit every model of the knowledge stage (`done`: label -> pipeline.Analysed); writes
    `<label>_knowledge_editing.json` per model and `figures/knowledge_editing.png` to --out. `notes`: the
    preflight warnings (pipeline.notes), stored in each JSON.

    With --save-edited, a model none of whose facts could be edited (no fact with knowledge neurons and a new
    answer) is not saved: its JSON is written all the same, says why in `save_edited_skipped`, and a warning
    says so."""
    options = edit_options_from(args)
    out = Path(args.out)
    docs, files = {}, {}
    for label, d in done.items():
        result, kn = d.result, d.kn
        doc = {
            "model": result.name, "label": label, "architecture": result.architecture,
            "demo_model": is_demo_model(result.name), "neuron_site": result.neuron_site,
            "options": {**dataclasses.asdict(result.options), "editing": dataclasses.asdict(options)},
            "arguments": arguments, **(notes or {}), "seed": args.seed, "versions": versions(),
            **run_editing(kn, result, options, progress=not args.quiet, label=label),
            "saved_edited_model": None,
        }
        if args.save_edited:
            doc["saved_edited_model"] = save_edited(kn, result, doc, options, Path(args.save_edited) / label)
            if doc["saved_edited_model"] is None:
                doc["save_edited_skipped"] = NOTHING_TO_SAVE
                log.warning("warning: --save-edited: nothing saved for %s: %s", label, NOTHING_TO_SAVE)
        files[label] = f"{label}_knowledge_editing.json"
        write_json(out / files[label], doc)
        log.info("wrote %s", out / files[label])
        docs[label] = doc
    demo = all(doc["demo_model"] for doc in docs.values())
    figure = plot_editing(docs, out / "figures" / "knowledge_editing.png", demo)
    return Editing(docs, files, str(figure.relative_to(out)), demo)


NOTHING_TO_SAVE = "no fact could be edited (none has both knowledge neurons and a new answer)"


def save_edited(kn, result, doc: dict, options: EditOptions, folder: Path) -> dict | None:
    """`save_pretrained` the model with the first edited fact updated through its knowledge neurons (the same
    edit the JSON reports), with its tokenizer and an edit_info.json saying what it holds. The loaded model
    itself is restored afterwards. None (nothing saved) when no fact could be edited."""
    row = next((r for r in doc["update"]["per_fact"] if "skipped" not in r), None)
    if row is None:
        return None
    fact = next(r.fact for r in result.facts if r.fact.id == row["fact"])
    tok = kn.tokenizer
    slots = [tuple(s) for s in row["neurons"]]
    info = {"source_model": doc["model"], "fact": fact.id, "prompts": list(fact.prompts), "answer": fact.answer,
            "new_answer": row["new_answer"], "neurons": row["neurons"], "editing": dataclasses.asdict(options),
            "what": "the source model with this one fact updated through its refined knowledge neurons"}
    with restored(kn.adapter, slots):
        update(kn.adapter, slots, first_token(tok, fact, fact.answer), first_token(tok, fact, row["new_answer"]),
               options)
        kn.model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_text(folder / "edit_info.json", json.dumps(info, indent=2) + "\n")
    log.info("saved the edited model (%s: %s -> %s) to %s", fact.id, fact.answer, row["new_answer"], folder)
    return {"folder": str(folder), **info}


def _cells(docs: Mapping[str, dict]) -> list[tuple[str, str, str]]:
    return [(label, c, f"{label} {'KN' if c == 'knowledge_neurons' else 'random'}")
            for label in docs for c in ("knowledge_neurons", "random_neurons")]


def editing_table(docs: Mapping[str, dict]) -> str:
    """Every summary metric, knowledge neurons vs random slots, one column per model and control."""
    cells = _cells(docs)
    rows = [[f"{op}: {metric}"] + [docs[label]["summary"][op][c][metric] for label, c, _ in cells]
            for op, keys in (("update", UPDATE_KEYS), ("erase", ERASE_KEYS)) for metric in keys]
    counts = ", ".join(f"{k} {d['details']['facts_edited']}/{d['details']['facts']} facts updated, "
                       f"{d['details']['relations_erased']}/{d['details']['relations']} relations erased"
                       for k, d in docs.items())
    rule = next(iter(docs.values()))["options"]["editing"]
    return (f"Knowledge editing ({rule['rule']} rule; {counts}; random: {rule['random_draws']} draws of as many "
            "slots from the same layers)\n\n" + table(["metric", *(name for _, _, name in cells)], rows))


def _rows(doc: dict, op: str) -> list[dict]:
    """The edited facts (update) or erased relations (erase) of a model's editing JSON."""
    rows = doc["update"]["per_fact"] if op == "update" else doc["erase"]["per_relation"]
    return [r for r in rows if "skipped" not in r]


def mean_sem(doc: dict, op: str, control: str, metric: str) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n) of a metric over the edited facts / erased relations; NaN where
    undefined (the mean is the JSON summary's)."""
    values = np.array([r[control][metric] for r in _rows(doc, op) if r[control][metric] is not None], dtype=float)
    if not len(values):
        return np.nan, np.nan, 0
    sem = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
    return float(values.mean()), float(sem), len(values)


def plot_editing(docs: Mapping[str, dict], path: Path, demo: bool) -> Path:
    """One panel per summary metric: knowledge neurons vs random slots, bars grouped by model (label), with
    ±1 standard error over facts (update) or relations (erase), n under each model and every bar's value."""
    fig = new_figure(16, 8)
    axes = fig.subplots(2, 4).flatten()
    x = np.arange(len(docs))
    for ax, (op, metric, heading, ylabel, scale, ref) in zip(axes, METRICS, strict=False):
        counts = []
        for k, (control, name, color) in enumerate((("knowledge_neurons", "knowledge neurons", "tab:red"),
                                                    ("random_neurons", "random neurons", "tab:gray"))):
            cells = [mean_sem(doc, op, control, metric) for doc in docs.values()]
            heights, errors = (np.array([scale * c[i] for c in cells]) for i in (0, 1))
            where = x + (k - 0.5) * 0.38
            ax.bar(where, heights, 0.38, yerr=errors, capsize=2, color=color, label=name)
            value_labels(ax, where, heights, errors)
            counts = counts or [c[2] for c in cells]
        if ref is not None:
            ax.axhline(ref, color="black", lw=0.8)
            ax.margins(y=0.25)
        else:  # a share of prompts
            ax.set_ylim(0, 1.3)
        unit = "facts" if op == "update" else "relations"
        ax.set_xticks(x, [f"{label}\nn = {n} {unit}" for label, n in zip(docs, counts, strict=True)], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(heading, fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left")
    axes[-1].axis("off")
    title(fig, "Knowledge editing through knowledge neurons vs as many random neurons from the same layers"
          + (" (demo models)" if demo else "") + "\nerror bars: ±1 standard error of the mean over the edited "
          "facts (update) or erased relations (erase); n under each model")
    return save(fig, path)


def _sampling(label: str, s: dict) -> str:
    return (f"{label}: {s['facts_updated']} of {s['facts']} facts updated (--edit-facts {s['edit_facts']}), "
            f"locality on {s['locality_prompts_measured']} of {s['prompts']} prompts (--locality-prompts "
            f"{s['locality_prompts']}), seed {s['seed']}")


def editing_report(editing: Editing) -> str:
    """The Markdown section `comprehensive` appends to report.md."""
    first = next(iter(editing.docs.values()))
    o = first["options"]["editing"]
    rule = (f"v <- v - {o['norm_lambda1']:g} ||v||/||e(old)|| e(old) + {o['norm_lambda2']:g} ||v||/||e(new)|| e(new)"
            if o["rule"] == "dai" else "v <- v - 2 e(old) + 2 e(new)")
    lines = [
        "",
        "## Knowledge editing",
        "",
        f"Each fact is updated through the value slots of its refined knowledge neurons ({o['rule']} rule: {rule}; "
        "e = output-embedding row of the first answer token), and each relation is erased by zeroing the slots "
        f"of its {o['erase_top']} most frequent knowledge neurons, against {o['random_draws']} seeded draws of as "
        "many random neurons from the same layers. The weights are restored bit for bit after every edit. "
        "Definitions are in the `definition` field of "
        + ", ".join(f"`{f}`" for f in editing.files.values())
        + (". Demo models: tiny models trained only on the fact table, so their perplexity on the neutral text "
           "is very high to begin with." if editing.demo else "."),
        "",
        "Sampled: " + "; ".join(_sampling(k, d["sampling"]) for k, d in editing.docs.items()) + ".",
        "",
        f"![knowledge editing]({editing.figure})",
        "",
        f"```\n{editing_table(editing.docs)}\n```",
        "",
    ]
    return "\n".join(lines)
