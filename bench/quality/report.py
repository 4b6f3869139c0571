"""docs/quality.md's measured sections and its plot, from a `python -m bench.quality` results.json.

    python -m bench.quality.report bench/results/quality/results.json

The plot is written as SVG by hand (no matplotlib needed): accuracy against the context length,
one line per pattern, zero-shot beside after fine-tuning.
"""
from __future__ import annotations

import json
import sys

DOC, PLOT = "docs/quality.md", "docs/images/quality-accuracy.svg"
BEGIN, END = "<!-- quality:begin (written by python -m bench.quality.report) -->", "<!-- quality:end -->"


def _k(n) -> str:
    n = int(n)
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def accuracy_table(result) -> list[str]:
    lengths = list(result["zero_shot"])
    names = list(result["zero_shot"][lengths[0]])
    head = "| pattern | " + " | ".join(f"{_k(n)} zero-shot" for n in lengths) + " | " + \
        " | ".join(f"{_k(n)} fine-tuned" for n in lengths) + " |"
    lines = [head, "|---" * (1 + 2 * len(lengths)) + "|"]
    acc = lambda key, n, name: (f"{result[key][n][name]['acc']:.3f}" if n in result.get(key, {}) else "not run")
    for name in names:
        zs = [acc("zero_shot", n, name) for n in lengths]
        ft = [acc("finetuned", n, name) for n in lengths]
        lines.append(f"| {name} | " + " | ".join(zs) + " | " + " | ".join(ft) + " |")
    n_ans = result["zero_shot"][lengths[0]][names[0]]["answers"]
    lines.append("")
    lines.append(f"Accuracy over {n_ans} answers per length (the same sequences for every pattern and both models); "
                 f"chance {result['chance']:.3f}.")
    return lines


def head_table(res_len: dict) -> list[str]:
    """Per pattern and layer: per head, dense mass inside the visited keys (answer rows / spread
    rows) and the output error against dense (answer rows / all rows)."""
    lines = ["| pattern | layer | mass at answer rows, per head | mass at spread rows | "
             "output error at answer rows | output error, all rows |", "|---|---|---|---|---|---|"]
    fmt = lambda xs, pct: " ".join((f"{100 * x:.0f}%" if pct else f"{x:.2f}") for x in xs)
    for name, r in res_len.items():
        if name == "dense":
            continue
        for i, layer in enumerate(r["layers"]):
            ma = fmt(layer["mass_answer"], True) if "mass_answer" in layer else "n/a (linear)"
            ms = fmt(layer["mass_spread"], True) if "mass_spread" in layer else "n/a"
            lines.append(f"| {name} | {i} | {ma} | {ms} | {fmt(layer['err_answer'], False)} | "
                         f"{fmt(layer['err_all'], False)} |")
    return lines


def svg_plot(result, path: str) -> None:
    lengths = [int(n) for n in result["zero_shot"]]
    names = list(result["zero_shot"][str(lengths[0])])
    colors = ["#000000", "#1f77b4", "#2ca02c", "#17becf", "#d62728", "#ff7f0e", "#9467bd", "#8c564b"]
    W, H, pad, gap = 420, 300, 50, 30
    import math
    span = math.log2(lengths[-1] / lengths[0])
    xs = {n: pad + (W - 2 * pad) * ((math.log2(n / lengths[0]) / span) if span > 0 else 0.5) for n in lengths}
    y = lambda a: H - pad - (H - 2 * pad) * a
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W + gap + 160}" height="{H + 20}" '
           'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for p, (key, title) in enumerate((("zero_shot", "zero-shot (trained dense)"),
                                      ("finetuned", f"after fine-tuning with {result.get('finetune_pattern', '?')}"))):
        ox = p * (W + gap)
        out.append(f'<g transform="translate({ox},0)">')
        out.append(f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="12">{title}</text>')
        out.append(f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>')
        out.append(f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>')
        for a in (0, 0.25, 0.5, 0.75, 1.0):
            out.append(f'<line x1="{pad}" y1="{y(a)}" x2="{W - pad}" y2="{y(a)}" stroke="#ddd"/>')
            out.append(f'<text x="{pad - 5}" y="{y(a) + 4}" text-anchor="end">{a:g}</text>')
        for n in lengths:
            out.append(f'<text x="{xs[n]}" y="{H - pad + 15}" text-anchor="middle">{_k(n)}</text>')
        out.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">context length (tokens)</text>')
        out.append(f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">accuracy</text>')
        ch = y(result["chance"])
        out.append(f'<line x1="{pad}" y1="{ch}" x2="{W - pad}" y2="{ch}" stroke="#999" stroke-dasharray="2,3"/>')
        have = [n for n in lengths if str(n) in result.get(key, {})]
        for c, name in enumerate(names):
            pts = " ".join(f"{xs[n]:.1f},{y(result[key][str(n)][name]['acc']):.1f}" for n in have)
            col = colors[c % len(colors)]
            out.append(f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-width="{2.5 if name == "dense" else 1.5}"/>')
            for n in have:
                out.append(f'<circle cx="{xs[n]:.1f}" cy="{y(result[key][str(n)][name]["acc"]):.1f}" r="2.5" fill="{col}"/>')
        out.append("</g>")
    lx = 2 * W + gap
    for c, name in enumerate(names):
        out.append(f'<line x1="{lx}" y1="{pad + 16 * c}" x2="{lx + 20}" y2="{pad + 16 * c}" '
                   f'stroke="{colors[c % len(colors)]}" stroke-width="2"/>')
        out.append(f'<text x="{lx + 25}" y="{pad + 16 * c + 4}">{name}</text>')
    out.append(f'<text x="{lx}" y="{pad + 16 * len(names) + 4}" fill="#666">dotted: chance</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def measured_section(result, spec_lengths) -> str:
    lengths = list(result["zero_shot"])
    first, last = lengths[0], lengths[-1]
    cfg = result["config"]
    lines = [BEGIN, "",
             f"Model: {cfg['layers']} layers, d_model {cfg['d_model']}, {cfg['heads']} heads, RoPE, attention only "
             f"(mlp={cfg['mlp']}); seed {result['seed']}; {result['torch_threads']} torch thread(s). "
             f"Training {result.get('train_s', 0) / 60:.1f} min, fine-tuning {result.get('finetune_s', 0) / 60:.1f} min, "
             f"the process that wrote these numbers {result['total_s'] / 60:.1f} min wall for {result['cpu_s'] / 60:.1f} min of CPU time "
             f"(load average {result['load_average_start'][0]:.1f} at the start, "
             f"{result['load_average_end'][0]:.1f} at the end, on 2 cores shared with other work).", "",
             "### Task accuracy", "", f"![accuracy against length]({PLOT.removeprefix('docs/')})", ""]
    lines += accuracy_table(result)
    for key, label in (("zero_shot", "zero-shot (the dense-trained model)"),
                       ("finetuned", f"after fine-tuning with {result.get('finetune_pattern')}")):
        for n in dict.fromkeys((first, last)):
            if n not in result.get(key, {}):
                continue
            lines += ["", f"### Per layer and head at {_k(n)} tokens, {label}", ""]
            lines += head_table(result[key][n])
    lines += ["", END]
    return "\n".join(lines)


def write_docs(result, spec=None, doc: str = DOC, plot: str = PLOT) -> None:
    """Replace the measured section of docs/quality.md (between the markers) and rewrite the plot."""
    import os
    os.makedirs(os.path.dirname(plot), exist_ok=True)
    svg_plot(result, plot)
    section = measured_section(result, None)
    try:
        text = open(doc).read()
    except FileNotFoundError:
        text = "# Quality against dense attention\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text += "\n" + section + "\n"
    with open(doc, "w") as f:
        f.write(text)
    print(f"wrote {doc} and {plot}", file=sys.stderr)


if __name__ == "__main__":
    write_docs(json.load(open(sys.argv[1])))
