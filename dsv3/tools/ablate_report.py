"""The ablation report: ``DIR/report.md`` (a table per variant as mean ± std over seeds, comparisons
with the baseline under a 2σ rule) and PNG plots (matplotlib, headless Agg), all recomputed from the
runs' metrics.jsonl. ``python -m dsv3.tools.ablate --report DIR`` calls ``write_report``.

Table columns: final validation loss; MaxVio averaged over the last 10% of steps, as the mean over MoE
layers and as the worst layer (``maxvio_mean`` / ``maxvio_max`` of each step); median tokens/s.
"""
from __future__ import annotations

import math
import os
from dsv3.training.balance_metrics import compare, last_fraction, mean_std, read_metrics, summarize_run
from dsv3.tools.plots import moving_average

PLOTS = ("maxvio.png", "val_loss.png", "load_best.png", "load_worst.png", "bias.png")
COLUMNS = ("val_loss", "maxvio_mean", "maxvio_max", "tokens_per_s")
DIGITS = dict(val_loss=4, maxvio_mean=3, maxvio_max=3, tokens_per_s=0)


def _runs(out: str, variant: str, seeds: int) -> list[tuple[int, str]]:
    """(seed, metrics.jsonl) of the finished runs of a variant."""
    found = []
    for s in range(seeds):
        d = os.path.join(out, "runs", variant, f"seed{s}")
        if os.path.isfile(os.path.join(d, "result.json")):
            found.append((s, os.path.join(d, "metrics.jsonl")))
    return found


def collect(out: str, spec: dict, variants) -> dict:
    """{variant: {"seeds": [...], column: [value per seed]}} for variants with at least one finished run."""
    table = {}
    for v in variants:
        runs = _runs(out, v.name, spec["seeds"])
        if not runs:
            continue
        rows = [summarize_run(path) for _, path in runs]
        table[v.name] = dict(seeds=[s for s, _ in runs], paths=[p for _, p in runs],
                             **{c: [r[c] for r in rows] for c in COLUMNS})
    return table


def fmt(xs: list[float], digits: int) -> str:
    m, s = mean_std(xs)
    return f"{m:.{digits}f} ± {'n/a' if math.isnan(s) else f'{s:.{digits}f}'}"


def verdict(name: str, base: str, a: list[float], b: list[float], digits: int, what: str,
            paired: bool = False) -> str:
    delta, sigma, resolved = compare(a, b, paired=paired)
    if math.isnan(sigma):
        return (f"- {name} vs {base}, {what}: Δ = {delta:+.{digits}f}; not resolved at this scale "
                f"(fewer than 2 seeds, no σ)")
    if resolved:
        return (f"- {name} vs {base}, {what}: Δ = {delta:+.{digits}f} (2σ = {2 * sigma:.{digits}f}): "
                f"{'lower' if delta < 0 else 'higher'}, a difference beyond 2σ")
    return (f"- {name} vs {base}, {what}: Δ = {delta:+.{digits}f} (2σ = {2 * sigma:.{digits}f}): "
            f"not resolved at this scale")


# ------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plt_locator():
    from matplotlib.ticker import MaxNLocator
    return MaxNLocator(integer=True)


def _series(path: str, key: str) -> tuple[list[int], list[float]]:
    steps, _ = read_metrics(path)
    xs = sorted(steps)
    return xs, [steps[s][key] for s in xs]


def plot_maxvio(table: dict, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, row in table.items():
        curves = [_series(p, "maxvio_mean") for p in row["paths"]]
        n = min(len(c[1]) for c in curves)
        xs = curves[0][0][:n]
        window = max(1, n // 20)
        per_seed = [moving_average(c[1][:n], window) for c in curves]
        mean = [sum(col) / len(col) for col in zip(*per_seed)]
        line, = ax.plot(xs, mean, label=name)
        if len(per_seed) > 1:
            std = [mean_std(list(col))[1] for col in zip(*per_seed)]
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("batch MaxVio (mean over MoE layers)")
    ax.set_title("MaxVio per step (moving average; band: ±1 std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_val_loss(table: dict, path: str) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = list(table)
    for name in names:
        evals = [read_metrics(p)[1] for p in table[name]["paths"]]
        n = min(len(e) for e in evals)
        xs = [r["step"] for r in evals[0][:n]]
        ax1.plot(xs, [sum(e[i]["val_loss"] for e in evals) / len(evals) for i in range(n)], marker="o", label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("validation loss (nats/token, mean over seeds)")
    ax1.legend(fontsize=8)
    means = [mean_std(table[n]["val_loss"])[0] for n in names]
    stds = [mean_std(table[n]["val_loss"])[1] for n in names]
    ax2.bar(range(len(names)), means, yerr=[0 if math.isnan(s) else s for s in stds], capsize=4)
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    lo, hi = min(means), max(means)
    pad = max(hi - lo, max([s for s in stds if not math.isnan(s)], default=0), 1e-3)
    ax2.set_ylim(lo - 2 * pad, hi + 2 * pad)
    ax2.set_ylabel("final validation loss (± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tail_loads(path: str) -> list[list[float]]:
    """Tokens per expert per layer summed over the last 10% of steps."""
    steps, _ = read_metrics(path)
    order = [steps[s] for s in sorted(steps)]
    tail = order[-last_fraction(len(order)):]
    layers = [[0.0] * len(l) for l in tail[0]["tokens_per_expert"]]
    for r in tail:
        for acc, l in zip(layers, r["tokens_per_expert"]):
            for i, x in enumerate(l):
                acc[i] += x
    return layers


def _relative(rows: list[list[float]]) -> list[list[float]]:
    """Each row divided by its mean: 1 = the balanced load (DeepSeek-V3 Figure 9's colour scale)."""
    out = []
    for r in rows:
        m = sum(r) / len(r)
        out.append([x / m if m > 0 else 0.0 for x in r])
    return out


LOAD_VMAX = 2.0   # colour scale 0…2 × the balanced load, as the report's Figure 9
LOAD_LABEL = "expert load / balanced load (1 = balanced)"


def clip_note(rows: list[list[float]], vmax: float = LOAD_VMAX) -> str:
    """What a colour scale capped at vmax hides: '' when nothing is above it."""
    above = [x for r in rows for x in r if x > vmax]
    if not above:
        return ""
    n = sum(len(r) for r in rows)
    return f"{len(above)} of {n} cells above {vmax:g} drawn as {vmax:g} (largest {max(above):.2f})"


def load_colorbar(fig, im, ax, rows: list[list[float]], **kw) -> str:
    """The labelled colour bar of a load map, its top an arrow when values are clipped at LOAD_VMAX;
    returns the clipping note ('' if none) for the caller's title."""
    note = clip_note(rows)
    cbar = fig.colorbar(im, ax=ax, extend="max" if note else "neither", **kw)
    cbar.set_label(LOAD_LABEL, fontsize=8)
    return note


def plot_load_heatmap(name: str, row: dict, path: str, label: str) -> None:
    plt = _plt()
    rel = _relative(_tail_loads(row["paths"][0]))
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rel[0]) + 2), 0.5 * len(rel) + 2), layout="constrained")
    im = ax.imshow(rel, cmap="RdBu_r", vmin=0, vmax=LOAD_VMAX, aspect="auto")
    ax.set_xlabel("expert")
    ax.xaxis.set_major_locator(_plt_locator())
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(rel)))
    note = load_colorbar(fig, im, ax, rel)
    ax.set_title(f"{label}: {name} (seed {row['seeds'][0]}), load / mean load over the last 10% of steps"
                 + (f"\n{note}" if note else ""), fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _main_moe_layers(metrics_path: str, n_layers: int) -> int:
    """MoE layers of the main model (the MTP modules' come after them), from the run's config.yaml."""
    import yaml
    try:
        with open(os.path.join(os.path.dirname(metrics_path), "config.yaml")) as f:
            m = yaml.safe_load(f)["model"]
        return m["n_layers"] - m["n_dense_layers"]
    except (OSError, KeyError, TypeError):
        return n_layers


def plot_domain_loads(name: str, row: dict, path: str) -> bool:
    """Figure 9 style: per MoE layer, domains × experts, load relative to the balanced load."""
    _, evals = read_metrics(row["paths"][0])
    loads = evals[-1].get("domain_loads") if evals else None
    if not loads:
        return False
    plt = _plt()
    domains = sorted(loads)
    n_layers = len(loads[domains[0]])
    n_main = _main_moe_layers(row["paths"][0], n_layers)
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers + 2.5, 0.3 * len(domains) + 2.2), squeeze=False,
                             layout="constrained")
    im, every = None, []
    for layer, ax in enumerate(axes[0]):
        rel = _relative([loads[d][layer] for d in domains])
        every += rel
        im = ax.imshow(rel, cmap="RdBu_r", vmin=0, vmax=LOAD_VMAX, aspect="auto")
        ax.set_title(f"MoE layer {layer}" + (" (MTP)" if layer >= n_main else ""), fontsize=9)
        ax.set_xlabel("expert")
        ax.xaxis.set_major_locator(_plt_locator())
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains if layer == 0 else [], fontsize=7)
    note = load_colorbar(fig, im, list(axes[0]), every, shrink=0.9)
    fig.suptitle(f"{name} (seed {row['seeds'][0]}): per-domain expert load / balanced load, validation split"
                 + (f"\n{note}" if note else ""), fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_bias(table: dict, path: str, max_layers: int = 4) -> None:
    plt = _plt()
    rows = []
    for name, row in table.items():
        steps, _ = read_metrics(row["paths"][0])
        order = [steps[s] for s in sorted(steps)]
        if any(any(b != 0 for layer in r["bias"] for b in layer) for r in order[-1:]):
            rows.append((name, order))
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no variant updates the routing bias", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    n_layers = len(rows[0][1][0]["bias"])
    pick = sorted({round(i * (n_layers - 1) / max(1, min(max_layers, n_layers) - 1))
                   for i in range(min(max_layers, n_layers))})
    fig, axes = plt.subplots(len(rows), len(pick), figsize=(3.2 * len(pick) + 1, 2.2 * len(rows) + 0.8),
                             squeeze=False, sharex=True, layout="constrained")
    for r, (name, order) in enumerate(rows):
        xs = [rec["step"] for rec in order]
        for c, layer in enumerate(pick):
            ax = axes[r][c]
            n_exp = len(order[0]["bias"][layer])
            for e in range(n_exp):
                ax.plot(xs, [rec["bias"][layer][e] for rec in order], lw=0.7)
            ax.set_title(f"{name}, MoE layer {layer}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.supxlabel("step")
    fig.supylabel("routing bias b_i (first seed)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ report
def write_report(out: str, spec: dict, variants) -> str:
    table = collect(out, spec, variants)
    lines = ["# Load-balancing ablation", "",
             f"Config `{os.path.relpath(spec['config'])}`, {spec['steps']} steps per run, seeds 0–{spec['seeds'] - 1}"
             f" (the same data order for every variant of a seed); common overrides: "
             f"`{' '.join(spec['overrides']) or 'none'}`.", ""]
    missing = [f"{v.name} seed {s}" for v in variants for s in range(spec["seeds"])
               if s not in table.get(v.name, {}).get("seeds", [])]
    if missing:
        lines += [f"Not finished (left out of the table): {', '.join(missing)}.", ""]
    if not table:
        lines.append("No finished runs yet.")
        path = os.path.join(out, "report.md")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path
    lines += ["Mean ± std over seeds (sample std; n/a with one seed). MaxVio: max_i load_i / mean load − 1 per "
              "training batch, averaged over the last 10% of steps, as the mean over MoE layers and the worst "
              "layer. tokens/s: median over steps.", "",
              "| variant | seeds | val loss | MaxVio mean (last 10%) | MaxVio max (last 10%) | tokens/s | settings |",
              "|---|---|---|---|---|---|---|"]
    notes = {v.name: (v.note or " ".join(v.overrides)) for v in variants}
    for name, row in table.items():
        cells = [fmt(row[c], DIGITS[c]) for c in COLUMNS]
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + f" | {notes[name]} |")
    base = spec.get("baseline") if spec.get("baseline") in table else next(iter(table))
    best = min(table, key=lambda n: mean_std(table[n]["maxvio_mean"])[0])
    worst = max(table, key=lambda n: mean_std(table[n]["maxvio_mean"])[0])
    lines += ["", f"## Differences from `{base}`", "",
              "A difference is called one only when |Δ| > 2σ. Variants that ran the same seeds are compared "
              "paired by seed (same initialisation and data order): Δ = mean of the per-seed differences, "
              "σ = their std / √n; otherwise σ = √(s_a²/n_a + s_b²/n_b).", ""]
    for name, row in table.items():
        if name == base:
            continue
        paired = row["seeds"] == table[base]["seeds"]
        for col, digits, what in (("val_loss", 4, "validation loss"), ("maxvio_mean", 3, "MaxVio mean")):
            lines.append(verdict(name, base, row[col], table[base][col], digits, what, paired))
    plot_maxvio(table, os.path.join(out, "maxvio.png"))
    plot_val_loss(table, os.path.join(out, "val_loss.png"))
    plot_load_heatmap(best, table[best], os.path.join(out, "load_best.png"), "best balanced")
    plot_load_heatmap(worst, table[worst], os.path.join(out, "load_worst.png"), "worst balanced")
    plot_bias(table, os.path.join(out, "bias.png"))
    domain_plots = [f"domain_loads_{n}.png" for n, row in table.items()
                    if plot_domain_loads(n, row, os.path.join(out, f"domain_loads_{n}.png"))]
    lines += ["", "## Plots", "",
              "- `maxvio.png`: batch MaxVio over steps per variant.",
              "- `val_loss.png`: validation loss over steps and at the end per variant.",
              f"- `load_best.png` / `load_worst.png`: expert load (layer × expert) of the best and worst balanced "
              f"variants by MaxVio mean: `{best}` and `{worst}`.",
              "- `bias.png`: routing-bias trajectories of the variants that update the bias.",
              f"- per-domain expert loads on the validation split (DeepSeek-V3 Figure 9 style): "
              f"{', '.join(f'`{p}`' for p in domain_plots) or 'none recorded'}.", ""]
    lines += [f"![MaxVio](maxvio.png)", "", f"![validation loss](val_loss.png)", ""]
    path = os.path.join(out, "report.md")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path

