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


def plot_plane_3d(result, path, quantity="loss", eval_set="test", model_name=None):
    """The plane's `quantity` of `eval_set` as a 3-D surface (as Kaddour et al.'s Figure 9)."""
    import numpy as np

    coords = result["coords"]
    n = len(coords)
    values = np.full((n, n), np.nan)
    for g in result["grid"]:
        values[coords.index(g["beta"]), coords.index(g["alpha"])] = g[eval_set][quantity]
    x, y = np.meshgrid(coords, coords)
    fig = plt.figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(x, y, values, cmap="viridis", linewidth=0, antialiased=True)
    centre = values[coords.index(min(coords, key=abs)), coords.index(min(coords, key=abs))]
    ax.scatter([0], [0], [centre], color="red", s=20, label="model")
    ax.set_xlabel("alpha (direction 1)")
    ax.set_ylabel("beta (direction 2)")
    ax.set_zlabel(f"{eval_set} {quantity}")
    if model_name:
        ax.set_title(f"{model_name}: {eval_set} {quantity}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_connect(found, path, names=("model A", "model B")):
    """Loss (left) and metric (right, when there is one) along the fitted curve (solid) and the
    straight line (dashed), for the training and the test data, against t."""
    sets = [k for k in found["curve"][0] if k != "t"]
    has_metric = all("metric" in found["curve"][0][s] for s in sets)
    fig, axes = plt.subplots(1, 2 if has_metric else 1, figsize=(11 if has_metric else 6, 4), squeeze=False)
    for ax, quantity in zip(axes[0], ("loss", "metric")):
        for s, color in zip(sets, ("tab:blue", "tab:orange", "tab:green")):
            for path_name, style in (("curve", "-"), ("line", "--")):
                rows = found[path_name]
                ax.plot([r["t"] for r in rows], [r[s][quantity] for r in rows], style, color=color,
                        label=f"{s}, {'curve' if path_name == 'curve' else 'straight line'}")
        ax.set_xlabel("t  (0: model A, 1: model B)")
        ax.set_ylabel("accuracy" if quantity == "metric" else "loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title(f"{found['kind']} curve vs straight line\nA: {names[0]}\nB: {names[1]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
