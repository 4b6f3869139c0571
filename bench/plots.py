"""PNG plots of a bench run (matplotlib, imported lazily: without it the plots are skipped, once,
with a message). Every figure carries the device, the date and the command in its footer.

* `time-<kind>.png`: time vs context length, one panel per pattern, one line per implementation;
* `speedup-vs-density.png`: speed-up over the fastest SDPA backend vs the fraction of the causal
  (query, key) pairs a pattern visits, one panel per pattern family (the `sparsity` sweep);
* `linear-decode.png`: decode time per token of linear attention vs softmax decode.
"""
from __future__ import annotations

import os
import sys

_WARNED = False


def _pyplot():
    global _WARNED
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        if not _WARNED:
            print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
            _WARNED = True
        return None


def footer(env: dict) -> str:
    return f"{env.get('device_name', '?')} | {env.get('date', '?')} | {env.get('command', '?')}"


def _ok(rows, **eq):
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in eq.items())]


def _fmt_len(n: float) -> str:
    n = int(n)
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K" if n >= 1024 and n % 1024 == 0 else str(n)


STYLE = {"sparse_attn": dict(lw=2.2, marker="o"), "sdpa": dict(lw=1.2, ls="--", marker="s"),
         "flex": dict(lw=1.2, ls=":", marker="^"), "external": dict(lw=1.2, ls="-.", marker="x")}


_COLOR: dict = {}


def _color(impl: str):
    """One colour per implementation across every panel and figure of a run."""
    if impl not in _COLOR:
        _COLOR[impl] = f"C{len(_COLOR) % 10}"
    return _COLOR[impl]


def _plain_axes(ax, plt, x_percent=False):
    """Tick labels as plain numbers (no 10^x, no crowded minor labels on log axes)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}".lstrip("0.")[:1] in "25" else ""))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    if x_percent:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def _lines(ax, rows, x_key, y_fn):
    """One line per (implementation, dtype) over x_key; sparse_attn backends that only repeat the
    auto choice are drawn once (the auto line)."""
    by = {}
    for r in rows:
        if r.get("note", "").startswith("same kernel as"):
            continue
        by.setdefault((r["impl"], r["dtype"]), []).append(r)
    dtypes = {d for _, d in by}
    for (impl, dt), rs in sorted(by.items()):
        rs = sorted(rs, key=lambda r: r[x_key])
        group = rs[0]["group"]
        label = impl + (f" {dt}" if len(dtypes) > 1 else "")
        ax.plot([r[x_key] for r in rs], [y_fn(r) for r in rs], label=label, ms=4, color=_color(impl.split(" (")[0]),
                **STYLE.get(group, {}))


def _save(fig, env, path, plt):
    import textwrap
    fig.text(0.01, 0.005, textwrap.fill(footer(env), int(fig.get_figwidth() * 17)), fontsize=7, color="0.35",
             ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_time_vs_length(data, kind, path, plt):
    rows = [r for r in _ok(data["rows"], kind=kind) if "length" in r.get("sweeps", [])]
    labels = sorted({(r["family"], r["param"]) for r in rows}, key=lambda t: (t[0], t[1] or 0))
    if not rows or not labels:
        return None
    n = len(labels)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5.2 * cols, 3.9 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, (fam, param) in zip(axes.flat, labels):
        sub = [r for r in rows if r["family"] == fam and r["param"] == param]
        _lines(ax, sub, "Sk", lambda r: r["ms"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs = sorted({r["Sk"] for r in sub})
        ax.set_xticks(xs, [_fmt_len(x) for x in xs])
        _plain_axes(ax, plt)
        ax.set_title(f"{kind}: {sub[0]['case'].split('/')[1]}", fontsize=10)
        ax.set_xlabel("context length (keys)")
        ax.set_ylabel("ms per call" + (" (forward + backward)" if kind == "train" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(fig, data["environment"], path, plt)


def plot_speedup_vs_density(data, path, plt):
    rows = [r for r in _ok(data["rows"], kind="prefill") if "sparsity" in r.get("sweeps", [])
            and r["family"] in ("topk", "window", "blocksparse") and "speedup_vs_sdpa" in r and r["group"] != "sdpa"]
    fams = sorted({r["family"] for r in rows})
    if not fams:
        return None
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4.2), squeeze=False)
    for ax, fam in zip(axes.flat, fams):
        sub = [r for r in rows if r["family"] == fam]
        _lines(ax, sub, "density", lambda r: r["speedup_vs_sdpa"])
        d = sorted({r["density"] for r in sub})
        d = [x / 100 for x in range(max(1, int(100 * d[0]) - 1), 101)]
        ax.plot(d, [1 / x for x in d], color="0.6", lw=1, ls="--", label="1 / density (ideal)")
        ax.axhline(1.0, color="0.3", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlim(0, 1.05)
        _plain_axes(ax, plt, x_percent=True)
        knob = {"topk": "topk", "window": "window", "blocksparse": "layout density"}[fam]
        ax.set_title(f"prefill S={_fmt_len(sub[0]['Sk'])}: {fam} ({knob} varied)", fontsize=10)
        ax.set_xlabel("visited fraction of the causal (query, key) pairs")
        ax.set_ylabel("speed-up vs fastest SDPA (dense causal)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, data["environment"], path, plt)


def plot_linear_decode(data, path, plt):
    lin = _ok(data["rows"], kind="linear-decode")
    if not lin:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    _lines(ax, [dict(r, impl=r["impl"] + (" (softmax, dense)" if r["group"] == "sdpa" else " (linear)"))
                for r in lin], "Sk", lambda r: r["ms"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    xs = sorted({r["Sk"] for r in lin})
    ax.set_xticks(xs, [_fmt_len(x) for x in xs])
    _plain_axes(ax, plt)
    ax.set_title("decode: cost of one token vs context length", fontsize=10)
    ax.set_xlabel("tokens already in context")
    ax.set_ylabel("ms per decoded token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, data["environment"], path, plt)


def make_plots(data: dict, outdir: str) -> list[str]:
    """Draws every plot the rows allow into `outdir`; returns the paths written."""
    plt = _pyplot()
    if plt is None:
        return []
    os.makedirs(outdir, exist_ok=True)
    out = []
    for kind in ("prefill", "decode", "train", "linear-prefill"):
        out.append(plot_time_vs_length(data, kind, os.path.join(outdir, f"time-{kind}.png"), plt))
    out.append(plot_speedup_vs_density(data, os.path.join(outdir, "speedup-vs-density.png"), plt))
    out.append(plot_linear_decode(data, os.path.join(outdir, "linear-decode.png"), plt))
    return [p for p in out if p]
