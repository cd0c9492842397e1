"""PNG plots of the analysis results (matplotlib, no display needed)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_interpolation(rows, path, metric_name="accuracy", names=("model A", "model B")):
    """Loss (solid) and metric (dashed) of every data set along alpha; `names` label the two models."""
    alphas = [r["alpha"] for r in rows]
    sets = [k for k in rows[0] if k != "alpha"]
    fig, loss_ax = plt.subplots(figsize=(6, 4))
    metric_ax = loss_ax.twinx()
    for name in sets:
        loss_ax.plot(alphas, [r[name]["loss"] for r in rows], label=f"{name} loss")
        if "metric" in rows[0][name]:
            metric_ax.plot(alphas, [r[name]["metric"] for r in rows], linestyle="--", label=f"{name} {metric_name}")
    loss_ax.set_title(f"A: {names[0]}\nB: {names[1]}", fontsize=8)
    loss_ax.set_xlabel("alpha  (0: model A, 1: model B)")
    loss_ax.set_ylabel("loss")
    metric_ax.set_ylabel(metric_name)
    for x in (0, 1):
        loss_ax.axvline(x, color="grey", linewidth=0.5)
    lines = loss_ax.get_legend_handles_labels()[0] + metric_ax.get_legend_handles_labels()[0]
    loss_ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_point(grid, eval_set) -> tuple[dict | None, str]:
    """The grid point with the best `eval_set` metric (the lowest loss when there is no metric; of
    equal points, the one nearest the model), and what it is: "best test metric", "lowest train loss"."""
    if not grid:
        return None, ""

    def distance(g):
        return g["alpha"] ** 2 + g["beta"] ** 2

    if all("metric" in g[eval_set] for g in grid):
        return min(grid, key=lambda g: (-g[eval_set]["metric"], distance(g))), f"best {eval_set} metric"
    return min(grid, key=lambda g: (g[eval_set]["loss"], distance(g))), f"lowest {eval_set} loss"


def plot_plane(result, path, quantity="loss", eval_set="test", best=None, model_name=None, best_label=None):
    """Contour plot of `quantity` ("loss" or "metric") of `eval_set` over the plane; `best` marks
    a point (alpha, beta) (`best_label` says what it is); `model_name` goes in the title."""
    coords = result["coords"]
    n = len(coords)
    values = [[None] * n for _ in range(n)]
    for g in result["grid"]:
        values[coords.index(g["beta"])][coords.index(g["alpha"])] = g[eval_set][quantity]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    contour = ax.contourf(coords, coords, values, levels=20, cmap="viridis")
    fig.colorbar(contour, ax=ax, label=f"{eval_set} {quantity}")
    ax.plot([0], [0], "w+", markersize=10, label="model")
    if best is not None:
        ax.plot([best[0]], [best[1]], "r*", markersize=12, label=best_label or f"best {eval_set} metric")
    if model_name:
        ax.set_title(f"{model_name}: {eval_set} {quantity}", fontsize=8)
    ax.set_xlabel("alpha (direction 1)")
    ax.set_ylabel("beta (direction 2)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
