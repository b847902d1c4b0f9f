"""What a reader of the report and figures sees (issue 18, cases 12-18 and 20): models named by label and
architecture, one Jaccard colour scale, ties, the skip term, unconverged integrated gradients, error bars and value
labels that do not collide, and no text clipped at a figure's edge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.text import Text

from analysis.stage import FactResult, ModelResult, Options
from editing import stage as editing
from facts import Fact
from models.demo import INFO_FILE
from report import attention_figures, figures, findings
from report.markdown import demo_caveat


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw, kept instead of only written."""
    kept = []
    save = figures.save

    def keep(fig, path):
        kept.append(fig)
        return save(fig, path)

    for module in (figures, attention_figures, editing):
        monkeypatch.setattr(module, "save", keep)
    return kept


def _texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _all_text(fig) -> str:
    return "\n".join(t.get_text() for t in _texts(fig))


def assert_nothing_clipped(fig) -> None:
    """Everything drawn (titles, labels, tick labels, legends, colour bars) lies inside the figure as saved."""
    fig.canvas.draw()  # runs the constrained layout
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches, of what is drawn
    w, h = fig.get_size_inches()
    assert box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= w + 0.01 and box.y1 <= h + 0.01, (box, (w, h))


def _result(neurons: dict[str, list[tuple[int, int]]], architecture: str = "gpt2", relation=lambda fid: "r",
            delta: float = 0.0) -> ModelResult:
    """4 layers x 8 neurons whose refined neurons are `neurons` (two prompts a fact, scores 1 on them, so the
    change of P a layer's scores should sum to is their sum minus `delta`)."""
    facts = []
    for fact_id, chosen in neurons.items():
        scores = torch.zeros(2, 4, 8)
        for layer, i in chosen:
            scores[:, layer, i] = 1.0
        fact = Fact(fact_id, relation(fact_id), "S", "A", ("S is", "S was"))
        facts.append(FactResult.of(fact, scores, torch.full((2, 4), delta), [torch.tensor([0.5])] * 2, [[1], [2]], [3],
                                    Options(steps=4)))
    return ModelResult("folder", architecture, "site", 4, 8, Options(steps=4), facts)


def test_demo_caveat_names_label_and_architecture(tmp_path):  # cases 12 and 13
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / INFO_FILE).write_text("{}")
    caveat = demo_caveat({"gpt2": str(demo), "mamba": str(demo), "c": str(demo)},
                         {"gpt2": "mamba", "mamba": "gpt2", "c": "gpt_neox"})
    assert caveat == "gpt2 (Mamba), mamba (GPT-2) and c (GPT-NeoX): tiny demo models trained on these very facts, " \
                     "not the real checkpoints"


def test_hidden_attention_figure_of_mamba2_names_the_model_and_its_heads(tiny_mamba2, tmp_path, drawn):  # case 13
    model, tok = tiny_mamba2
    attention_figures.plot_hidden_attention(model, tok, "The capital of France is", [0, 2], tmp_path / "m.png",
                                            subject="France", caveat="a caveat", name="ssm2 (Mamba-2)")
    text = _all_text(drawn[0])
    assert "ssm2 (Mamba-2): hidden attention" in text and "over heads" in text and "channels" not in text
    assert "Mamba hidden" not in text
    assert_nothing_clipped(drawn[0])


def _flow_analysis() -> dict:
    shares = {"subject": 0.2, "last": 0.7, "other": 0.1}
    return {"by_layer": [{"layer": k, "flow": {"absolute": shares}, "hidden_attention": shares} for k in range(3)],
            "overall": {"n": 5, "absolute": shares}}


def test_subject_flow_titles_name_both_models(tmp_path, drawn):  # cases 13 and 16
    beside = {"n_layers": 3, "n_prompts": 4, "mean": {g: [0.3, 0.3, 0.3] for g in ("subject", "last", "other")}}
    attention_figures.plot_subject_flow(_flow_analysis(), tmp_path / "f.png", beside, "caveat",
                                        name="m2 (Mamba-2)", beside_name="pythia (GPT-NeoX)", unit="heads")
    fig = drawn[0]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("m2 (Mamba-2) knowledge neurons") and titles[1].startswith("m2 (Mamba-2) hidden")
    assert titles[2].startswith("pythia (GPT-NeoX) attention") and "GPT-2" not in _all_text(fig)
    assert "over heads" in fig.axes[1].get_ylabel()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "last (incl. skip term D·x)" in legend  # case 16: the skip term is said where the share is shown
    assert_nothing_clipped(fig)


def test_skip_term_is_said_in_the_report_sentence():  # case 16
    entry = {"hidden_attention": _flow_analysis(), "token_mixing": {"mean": {"subject": [0.2, 0.3]}}}
    assert "70 % from the last token (its own position, including the scan's skip term D·x, which is not " \
           "attention)" in findings.attention("mamba", entry)[0]


def test_jaccard_figures_share_one_colour_scale_and_fit(tmp_path, drawn):  # case 14
    relation = lambda fid: fid[0]  # noqa: E731
    a = _result({"a1": [(0, 0), (1, 1)], "a2": [(0, 0)], "b1": [(2, 2)], "b2": [(2, 2), (3, 3)]}, relation=relation)
    b = _result({"a1": [(0, 0), (1, 1), (2, 5)], "a2": [(0, 0), (3, 7)], "b1": [(2, 2)], "b2": [(3, 3)]},
                architecture="mamba", relation=relation)
    scale = figures.jaccard_scale([a, b])
    assert scale == pytest.approx(0.5)  # a1 / a2 and b1 / b2 of the first model; the second's largest is 1/4
    caveat = ("pythia (GPT-NeoX), mamba (Mamba) and m2 (Mamba-2): tiny demo models trained on these very facts, not "
              "the real checkpoints")  # once clipped at both edges
    for label, result in (("first", a), ("second", b)):
        figures.plot_jaccard_matrix(result, label, tmp_path / f"{label}.png", caveat, vmax=scale)
    for fig, name in zip(drawn, ("first (GPT-2)", "second (Mamba)"), strict=True):
        assert fig.axes[0].get_images()[0].get_clim() == (0, scale)
        text = _all_text(fig)
        assert name in text and "colour scale 0 to 0.5 (the same for every model)" in text
        assert_nothing_clipped(fig)


def test_layer_figure_shows_a_share_on_one_axis(tmp_path, drawn):  # case 18
    a = _result({"x": [(0, 0), (0, 1)], "y": [(0, 2)]})
    b = _result({"x": [(1, 0)], "y": []}, architecture="mamba")
    figures.plot_layer_distribution({"small": a, "other": b}, tmp_path / "l.png", "caveat")
    fig = drawn[0]
    share_axes = [ax for ax in fig.axes if "share" in ax.get_title()]
    assert len(share_axes) == 2 and share_axes[0].get_ylim() == share_axes[1].get_ylim()
    heights = [p.get_height() for p in share_axes[0].patches]
    assert heights == pytest.approx([100 * 3 / (2 * 8), 0, 0, 0])  # 3 neurons over 2 facts of 8 neurons a layer
    assert "small (GPT-2)" in _all_text(fig) and "other (Mamba)" in _all_text(fig)
    assert_nothing_clipped(fig)


def test_value_labels_sit_past_the_whiskers(tmp_path, drawn):  # case 18
    summary = {op: {c: {"relative_change_mean": v, "relative_change_sem": 0.1, "flip_rate": 0.5, "flip_rate_sem": 0.2}
                    for c, v in (("knowledge_neurons", -0.5), ("random_neurons", -0.002), ("same_relation_facts", 0.1),
                                 ("other_relation_facts", 0.0))}
               for op in ("suppress", "amplify")}
    figures.plot_interventions({"gpt2": summary}, tmp_path / "i.png", "caveat")
    fig = drawn[0]
    labels = {a.get_text(): a.xy for a in fig.axes[0].texts}
    assert labels["-50"][1] == pytest.approx(100 * (-0.5 - 0.1))  # below the lower whisker of a negative bar
    assert labels["10"][1] == pytest.approx(100 * (0.1 + 0.1))  # above the upper whisker of a positive bar
    assert_nothing_clipped(fig)


def _editing_doc(values: list[float]) -> dict:
    rows = [{"fact": f"f{k}", **{c: {m: v * (c == "knowledge_neurons") for m in
                                     ("reliability", "generalization", "locality", "perplexity_ratio")}
                                  for c in ("knowledge_neurons", "random_neurons")}} for k, v in enumerate(values)]
    erase = [{"relation": "r", **{c: {m: -0.002 for m in ("relation_p_change", "other_relations_p_change",
                                                          "perplexity_ratio")} for c in ("knowledge_neurons",
                                                                                         "random_neurons")}}]
    return {"update": {"per_fact": [*rows, {"fact": "skipped", "skipped": "no neurons"}]},
            "erase": {"per_relation": erase}}


def test_editing_figure_has_error_bars_n_and_values(tmp_path, drawn):  # case 18
    values = [0.2, 0.5, 0.9]
    doc = _editing_doc(values)
    mean, sem, n = editing.mean_sem(doc, "update", "knowledge_neurons", "reliability")
    assert (mean, n) == (pytest.approx(np.mean(values)), 3)
    assert sem == pytest.approx(np.std(values, ddof=1) / np.sqrt(3))
    editing.plot_editing({"gpt2": doc, "mamba": doc}, tmp_path / "e.png", demo=True)
    fig = drawn[0]
    text = _all_text(fig)
    assert "n = 3 facts" in text and "n = 1 relations" in text and "standard error" in text
    erase_panel = fig.axes[4]
    assert "-0.2" in [t.get_text() for t in erase_panel.texts]  # a -0.2 % bar too small to see shows its value
    assert erase_panel.containers and any(c.has_yerr for c in erase_panel.containers)
    assert_nothing_clipped(fig)


def test_tied_peak_layers_are_all_named():  # case 15
    result = _result({"a": [(0, 0), (3, 1)], "b": [(0, 2), (3, 3)], "c": [(1, 0)]})
    assert "Layers 0 and 3 of 0-3 hold the most, 2 each (40 % each)" in findings.knowledge_neurons("m", result)


def test_unconverged_integrated_gradients_are_warned_about():  # case 17
    # scores sum to 1 per layer of fact a; delta 1.5 means P changed by -0.5 while the scores claim +1
    assert findings.completeness("m", _result({"a": [(k, 0) for k in range(4)]}, delta=0.01)) is None
    warning = findings.completeness("m", _result({"a": [(k, 0) for k in range(4)]}, delta=1.5))
    assert warning.startswith("m: integrated gradients have not converged at 4 steps: a completeness delta of 1.5 "
                              "against a change of P(answer) of 0.5")
    assert "more --steps (e.g. 20)" in warning
