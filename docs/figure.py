"""Draws docs/flythinker.png and docs/flythinker.svg (the README picture): `python docs/figure.py`."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
T = 5  # response positions drawn


def box(ax, x, y, w, h, text, color, fs=9, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="0.3",
                                lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs, weight=weight)


def arrow(ax, x0, y0, x1, y1, color="0.25", style="-|>", lw=1.2, ls="-"):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=10, color=color, lw=lw,
                                 linestyle=ls))


def draw():
    fig, ax = plt.subplots(figsize=(11, 5.2))
    ax.set_xlim(-0.2, 11)
    ax.set_ylim(-0.6, 5.6)
    ax.axis("off")
    # prompts
    box(ax, -0.1, 3.75, 2.2, 1.0, "reasoner view\npersona + history\n+ query (long)", "#dbe9f6", 8.5)
    box(ax, -0.1, 0.35, 2.2, 0.9, "generator view\nquery (short)", "#fde2cf", 8.5)
    # models
    box(ax, 2.5, 3.55, 8.2, 1.4, "", "#eef5fb")
    ax.text(2.65, 4.78, "Reasoner R (small LM): reads context + response so far; one forward pass in training",
            fontsize=8.5, va="center", color="#1f4e79")
    box(ax, 2.5, 0.15, 8.2, 1.4, "", "#fff3ea")
    ax.text(2.65, 0.3, "Generator G (LM): writes the reply; its input at t = E[x_t] + λ·(c/‖h‖)·P(h_{t-1})",
            fontsize=8.5, va="center", color="#8a3b00")
    xs = [3.0 + 1.5 * i for i in range(T)]
    toks = ["⟨bos-reply⟩", "I", "hear", "you", "—"]
    for i, x in enumerate(xs):
        box(ax, x, 3.85, 1.0, 0.55, f"h{'₀₁₂₃₄'[i]}", "#9ecae1", 9, "bold")
        box(ax, x, 0.75, 1.0, 0.55, f"e{'₀₁₂₃₄'[i]}", "#fdae6b", 9, "bold")
        ax.text(x + 0.5, -0.25, f"x{'₀₁₂₃₄'[i]} = {toks[i]}", ha="center", fontsize=8)
        arrow(ax, x + 0.5, -0.1, x + 0.5, 0.72)  # token into G
        # token into R (both consume the same response tokens)
        arrow(ax, x + 0.15, -0.1, x + 0.15, 3.82, color="0.7", lw=0.8, ls=":")
        if i + 1 < T:  # latent h_t feeds G at t+1: the one-position lag that lets both run at once
            arrow(ax, x + 0.8, 3.83, xs[i + 1] + 0.3, 1.32, color="#2171b5", lw=1.6)
    ax.text(xs[1] + 0.75, 2.45, "latent thought h_t\n(final hidden state,\nrescaled, λ-weighted)\nfused one step later",
            fontsize=8, color="#2171b5", ha="left", va="center",
            bbox=dict(fc="white", ec="#2171b5", lw=0.6, boxstyle="round,pad=0.3"))
    arrow(ax, 2.1, 4.25, 2.95, 4.15)
    arrow(ax, 2.1, 0.8, 2.95, 1.0)
    ax.text(5.6, 5.35, "Think while generating: at decode step t, R computes h_t while G consumes h_{t-1}, "
            "so the two run in parallel", ha="center", fontsize=9.5, weight="bold")
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(HERE / f"flythinker.{ext}", dpi=110)


if __name__ == "__main__":
    draw()
