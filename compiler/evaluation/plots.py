"""Pictures of hetmap results: a sweep's energy-accuracy frontier, and a plan's placement and
floorplan. Each ``plot_*`` function writes one PNG (matplotlib, Agg) and returns the data it
drew, so tests and scripts check a picture's content without reading pixels.

Rules:

1. ``pareto.png``: perplexity against energy per token, one line per policy (error bars over
   seeds), one panel per noise scale, the all-digital model as a reference point. A point is
   Pareto-optimal when no other point of its panel (any policy, or all-digital) has lower or
   equal energy and perplexity with one strictly lower; those are ringed and joined.
2. ``placement.png``: layers x experts, read from plan.json. Left: digital (blue) or analog
   (orange), shaded by routing density; right: the score the placing policy ranked by (the
   policy is read from each expert's ``reason``), divided by the largest score of its
   placement group; where the plan keeps no score (``random``), ``(n - rank + 1) / n`` of the
   expert's rank among ``n``. Digital experts are outlined; cell values are written when the
   grid is small (at most 16 x 16).
3. ``floorplan.png``: the analog tiles on chips x arrays, from each matrix's ``slots`` and
   ``offsets`` and ``summary.allocation.layout``. With at most ``detail_limit`` used arrays each
   array is drawn to scale with every tile a rectangle at its offset (packed tiles side by
   side), coloured by layer and labelled ``L<layer> E<expert> <role>``, with the array's
   utilization; larger plans are aggregated: one row per used chip, one column per array,
   coloured by the layer of the array's first tile, beside each array's utilization (tiers of
   a site summed).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from hetmap.common.errors import OutputError

#: plan.json field of the score each built-in policy ranks by
SCORE_FIELDS = {"max-norm": "score", "activation-frequency": "density",
                "activation-weight": "mean_routing_weight", "router-norm": "router_norm",
                "expected-impact": "expected_impact", "measured": "sensitivity"}
_RANKED = re.compile(r"^(?P<policy>\S+) rank (?P<rank>\d+) of (?P<of>\d+) (?P<where>in layer|across)")
_FIXED = re.compile(r"^policy (?P<policy>\S+):")
DIGITAL_COLOR, ANALOG_COLOR = "#1f5fb4", "#e8761c"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- the energy-accuracy frontier ------------------------------------------------------------

def pareto_mask(energy: ArrayLike, ppl: ArrayLike) -> NDArray[np.bool_]:
    """True where no other point has energy and perplexity both <=, one of them < (rule 1)."""
    e = np.asarray(energy, dtype=float)
    p = np.asarray(ppl, dtype=float)
    no_worse = (e[None, :] <= e[:, None]) & (p[None, :] <= p[:, None])
    better = (e[None, :] < e[:, None]) | (p[None, :] < p[:, None])
    return np.asarray(~(no_worse & better).any(axis=1))


def pareto_rows(summary: list[dict[str, Any]], digital_ppl: float | None,
                digital_energy: float | None) -> list[dict[str, Any]]:
    """Sweep summary rows with energy, plus the all-digital reference per noise scale, each with
    ``pareto`` set within its noise scale."""
    rows: list[dict[str, Any]] = []
    for scale in sorted({r["noise_scale"] for r in summary}):
        panel = [dict(r) for r in summary
                 if r["noise_scale"] == scale and r.get("energy_per_token_j") is not None]
        if digital_ppl is not None and digital_energy is not None:
            panel.append({"policy": "all digital", "budget": 1.0, "noise_scale": scale,
                          "energy_per_token_j": digital_energy, "ppl_mean": digital_ppl,
                          "ppl_std": 0.0})
        if panel:
            mask = pareto_mask([r["energy_per_token_j"] for r in panel], [r["ppl_mean"] for r in panel])
            for row, optimal in zip(panel, mask, strict=True):
                row["pareto"] = bool(optimal)
        rows.extend(panel)
    return rows


def plot_pareto(path: Path, summary: list[dict[str, Any]], digital_ppl: float | None,
                digital_energy: float | None) -> list[dict[str, Any]]:
    """Write ``pareto.png`` (rule 1); returns the rows drawn, each with its ``pareto`` flag."""
    plt = _pyplot()
    rows = pareto_rows(summary, digital_ppl, digital_energy)
    scales = sorted({r["noise_scale"] for r in rows}) or [None]
    fig, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4), squeeze=False)
    for ax, scale in zip(axes[0], scales, strict=True):
        panel = [r for r in rows if r["noise_scale"] == scale]
        for policy in sorted({r["policy"] for r in panel} - {"all digital"}):
            line = sorted((r for r in panel if r["policy"] == policy),
                          key=lambda r: r["energy_per_token_j"])
            ax.errorbar([r["energy_per_token_j"] for r in line], [r["ppl_mean"] for r in line],
                        yerr=[r["ppl_std"] for r in line], marker="o", markersize=4, capsize=2,
                        linewidth=1, label=policy)
        for r in panel:
            if r["policy"] == "all digital":
                ax.plot(r["energy_per_token_j"], r["ppl_mean"], "k*", markersize=10,
                        label="all digital")
        front = sorted((r for r in panel if r.get("pareto")), key=lambda r: r["energy_per_token_j"])
        if front:
            ax.step([r["energy_per_token_j"] for r in front], [r["ppl_mean"] for r in front],
                    where="post", color="0.4", linestyle=":", linewidth=1)
            ax.scatter([r["energy_per_token_j"] for r in front], [r["ppl_mean"] for r in front],
                       s=120, facecolors="none", edgecolors="black", linewidths=1.2,
                       label="Pareto-optimal", zorder=5)
        ax.set_xlabel("energy per token (J, cost model)")
        ax.set_ylabel("perplexity")
        noise = f", noise scale c = {scale}" if scale is not None else ""
        ax.set_title(f"energy-accuracy frontier{noise}")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return rows


# -- placement ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PlacementGrid:
    """Layers x experts of a plan (NaN where a layer has fewer experts)."""

    layers: list[int]
    digital: NDArray[np.float64]  # 1.0 digital, 0.0 analog
    density: NDArray[np.float64]
    score: NDArray[np.float64]  # divided by the largest of its placement group
    policy: str
    score_name: str


def placement_grid(plan: dict[str, Any]) -> PlacementGrid:
    """The layer x expert grid of ``plan`` (a plan.json dict) with the score its policy used."""
    experts = [n for n in plan["nodes"] if n.get("kind") == "expert" and "layer" in n
               and "expert" in n and "placement" in n]
    if not experts:
        raise OutputError("the plan has no placed routed experts to draw")
    layers = sorted({n["layer"] for n in experts})
    shape = (len(layers), max(n["expert"] for n in experts) + 1)
    digital, density, score, rank = (np.full(shape, np.nan) for _ in range(4))
    policy, scope = _policy_of(experts, plan)
    field = SCORE_FIELDS.get(policy)
    has_score = field is not None and all(field in n for n in experts)
    for n in experts:
        cell = (layers.index(n["layer"]), n["expert"])
        digital[cell] = float(n["placement"] == "digital")
        density[cell] = n.get("density", np.nan)
        match = _RANKED.match(n.get("reason", ""))
        # rank 1 of n is the most deserving: (n - rank + 1) / n, in (0, 1]
        rank[cell] = (int(match["of"]) - int(match["rank"]) + 1) / int(match["of"]) if match else np.nan
        if has_score:
            score[cell] = float(n[field])
    if not has_score:
        score = rank
    groups = [slice(None)] if scope == "global" else [slice(i, i + 1) for i in range(shape[0])]
    for group in groups:
        top = np.nanmax(np.abs(score[group])) if np.isfinite(score[group]).any() else 0.0
        if top > 0:
            score[group] = score[group] / top
    name = field if has_score and field else "(n - rank + 1) / n"
    return PlacementGrid(layers, digital, density, score, policy, name)


def _policy_of(experts: list[dict[str, Any]], plan: dict[str, Any]) -> tuple[str, str]:
    for n in experts:
        match = _RANKED.match(n.get("reason", ""))
        if match:
            return match["policy"], "global" if match["where"] == "across" else "layer"
        fixed = _FIXED.match(n.get("reason", ""))
        if fixed:
            return fixed["policy"], "layer"
    return str(plan.get("options", {}).get("policy", "unknown")), "layer"


def plot_placement(path: Path, plan: dict[str, Any]) -> PlacementGrid:
    """Write ``placement.png`` (rule 2); returns the grid drawn."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch, Rectangle

    plt = _pyplot()
    grid = placement_grid(plan)
    n_layers, n_experts = grid.digital.shape
    small = n_layers <= 16 and n_experts <= 16
    shade = np.nan_to_num(grid.density / max(np.nanmax(grid.density), 1e-12), nan=0.0)
    blues, oranges = colormaps["Blues"], colormaps["Oranges"]
    rgb = np.ones((n_layers, n_experts, 4))
    for cell in np.ndindex(n_layers, n_experts):
        if np.isfinite(grid.digital[cell]):
            cmap = blues if grid.digital[cell] else oranges
            rgb[cell] = cmap(0.25 + 0.75 * shade[cell])
    width = min(max(n_experts * (0.55 if small else 0.12), 4.0), 13.0)
    height = min(max(n_layers * (0.45 if small else 0.18), 2.2), 9.0) + 1.2
    fig, axes = plt.subplots(1, 2, figsize=(2 * width + 1.5, height), squeeze=False)
    left, right = axes[0]
    left.imshow(rgb, aspect="auto", interpolation="nearest")
    left.set_title(f"placement ({int(np.nansum(grid.digital))} of "
                   f"{int(np.isfinite(grid.digital).sum())} experts digital), shade: routing density",
                   fontsize=9)
    image = right.imshow(np.ma.masked_invalid(grid.score), aspect="auto", cmap="viridis",
                         interpolation="nearest", vmin=0, vmax=1)
    right.set_title(f"{grid.policy} score ({grid.score_name}, / group max); digital outlined",
                    fontsize=9)
    fig.colorbar(image, ax=right, fraction=0.04, pad=0.02)
    for (row, col) in zip(*np.nonzero(grid.digital == 1), strict=True):
        right.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red",
                                  linewidth=1.5 if small else 0.6))
    for ax in (left, right):
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ticks = range(n_layers) if n_layers <= 24 else range(0, n_layers, max(1, n_layers // 12))
        ax.set_yticks(list(ticks), [str(grid.layers[i]) for i in ticks])
        if small:
            ax.set_xticks(range(n_experts))
    if small:
        for row, col in np.ndindex(n_layers, n_experts):
            if np.isfinite(grid.density[row, col]):
                left.text(col, row, f"{grid.density[row, col]:.2f}", ha="center", va="center",
                          fontsize=6, color="white" if shade[row, col] > 0.5 else "black")
                right.text(col, row, f"{grid.score[row, col]:.2f}", ha="center", va="center",
                           fontsize=6, color="white" if grid.score[row, col] < 0.5 else "black")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles=[Patch(color=blues(0.8), label="digital"),
                        Patch(color=oranges(0.8), label="analog (aimc-tile)")],
               loc="lower left", ncol=2, fontsize=8, frameon=False)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return grid


# -- floorplan ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Floorplan:
    """Every analog tile: its array slot, offset and extent in the array, and its owner."""

    rows: int
    cols: int
    chips: int
    arrays_per_chip: int
    tiers: int
    slot: NDArray[np.int64]
    row_offset: NDArray[np.int64]
    col_offset: NDArray[np.int64]
    height: NDArray[np.int64]  # crossbar rows the tile uses (its inputs)
    width: NDArray[np.int64]  # crossbar columns the tile uses (its outputs)
    owner: NDArray[np.int64]  # index into labels / layers
    labels: list[str]
    layers: list[int]  # -1 for matrices outside a layer

    @property
    def n_sites(self) -> int:
        return self.chips * self.arrays_per_chip

    def slots_used(self) -> NDArray[np.int64]:
        return np.unique(self.slot)

    def utilization(self) -> dict[int, float]:
        """Array slot -> stored weights / its cells."""
        used = np.bincount(self.slot, weights=self.height * self.width)
        return {int(s): float(used[s]) / (self.rows * self.cols) for s in self.slots_used()}

    def place(self, slot: int) -> tuple[int, int, int]:
        """(chip, array in chip, tier) of an array slot (the layout rule of plan.json)."""
        site, tier = slot % self.n_sites, slot // self.n_sites
        return site // self.arrays_per_chip, site % self.arrays_per_chip, tier

    def site_grid(self) -> tuple[list[int], NDArray[np.float64], NDArray[np.float64]]:
        """Used chips, and per (used chip, array) the layer of its first tile (NaN if empty)
        and its utilization over all tiers."""
        site = self.slot % self.n_sites
        chips = sorted({int(c) for c in np.unique(site // self.arrays_per_chip)})
        index = {c: i for i, c in enumerate(chips)}
        layer = np.full((len(chips), self.arrays_per_chip), np.nan)
        cells = np.zeros((len(chips), self.arrays_per_chip))
        layers = np.asarray(self.layers)[self.owner]
        for i in np.argsort(self.slot, kind="stable")[::-1]:  # the first tile is written last
            chip, array = divmod(int(site[i]), self.arrays_per_chip)
            layer[index[chip], array] = layers[i]
        rows = np.array([index[int(c)] for c in site // self.arrays_per_chip], dtype=np.int64)
        np.add.at(cells, (rows, site % self.arrays_per_chip), self.height * self.width)
        return chips, layer, cells / (self.rows * self.cols * self.tiers)


def floorplan(plan: dict[str, Any]) -> Floorplan:
    """The tiles of ``plan`` (a plan.json dict of a pipeline that ran ``allocate``)."""
    layout = plan.get("summary", {}).get("allocation", {}).get("layout")
    if layout is None:
        raise OutputError("the plan has no allocation (its pipeline stops before 'allocate'): "
                          "no floorplan to draw")
    rows, cols = int(layout["rows"]), int(layout["cols"])
    parts: dict[str, list[NDArray[np.int64]]] = {k: [] for k in
                                                 ("slot", "row", "col", "height", "width", "owner")}
    labels: list[str] = []
    layers: list[int] = []
    for node in plan["nodes"]:
        if node.get("placement") != "aimc-tile":
            continue
        for matrix in node.get("matrices", []):
            if "slots" not in matrix:
                continue
            slot = np.concatenate([np.arange(first, first + n) for first, n in matrix["slots"]])
            out_features, in_features = matrix["shape"]
            tile = np.arange(slot.size)
            n_col_tiles = int(matrix.get("tile_grid", [1, 1])[1])
            row_offset = np.zeros(slot.size, dtype=np.int64)
            col_offset = np.zeros(slot.size, dtype=np.int64)
            for index, row, col in matrix.get("offsets", []):
                row_offset[index], col_offset[index] = row, col
            parts["slot"].append(slot)
            parts["row"].append(row_offset)
            parts["col"].append(col_offset)
            parts["height"].append(np.minimum(rows, in_features - (tile // n_col_tiles) * rows))
            parts["width"].append(np.minimum(cols, out_features - (tile % n_col_tiles) * cols))
            parts["owner"].append(np.full(slot.size, len(labels), dtype=np.int64))
            labels.append(_label(node, matrix["role"]))
            layers.append(int(node["layer"]) if node.get("layer") is not None else -1)

    def joined(key: str) -> NDArray[np.int64]:
        return (np.concatenate(parts[key]) if parts[key] else np.zeros(0)).astype(np.int64)

    return Floorplan(rows, cols, int(layout["chips"]), int(layout["arrays_per_chip"]),
                     int(layout.get("tiers", 1)), joined("slot"), joined("row"), joined("col"),
                     joined("height"), joined("width"), joined("owner"), labels, layers)


def _label(node: dict[str, Any], role: str) -> str:
    if node.get("kind") == "expert" and node.get("expert") is not None:
        return f"L{node.get('layer')} E{node['expert']} {role}"
    short = ".".join(str(node["name"]).split(".")[-2:])
    return f"{short} {role}"


def plot_floorplan(path: Path, plan: dict[str, Any], *, detail_limit: int = 48) -> Floorplan:
    """Write ``floorplan.png`` (rule 3); returns the tiles drawn."""
    plt = _pyplot()
    plan_tiles = floorplan(plan)
    used = plan_tiles.slots_used()
    if used.size == 0:
        raise OutputError("the plan has no analog tiles (every matrix is digital): no floorplan "
                          "to draw")
    if used.size <= detail_limit:
        fig = _detailed(plt, plan_tiles, used)
    else:
        fig = _aggregated(plt, plan_tiles, used)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return plan_tiles


def _layer_colors(plan_tiles: Floorplan) -> dict[int, Any]:
    from matplotlib import colormaps

    layers = sorted(set(plan_tiles.layers))
    cmap = colormaps["tab10" if len(layers) <= 10 else "tab20"]
    return {layer: (cmap(i % cmap.N) if layer >= 0 else (0.6, 0.6, 0.6, 1.0))
            for i, layer in enumerate(layers)}


def _detailed(plt: Any, plan_tiles: Floorplan, used: NDArray[np.int64]) -> Any:
    from matplotlib.patches import Patch, Rectangle

    utilization = plan_tiles.utilization()
    colors = _layer_colors(plan_tiles)
    per_row = max(1, min(used.size, math.ceil(math.sqrt(used.size * 1.6))))
    n_rows = max(1, math.ceil(used.size / per_row))
    fig, ax = plt.subplots(figsize=(1.9 * per_row + 0.6, 1.9 * n_rows + 1.0))
    gap = 0.18
    position = {int(s): divmod(i, per_row) for i, s in enumerate(used)}
    for slot, (grid_row, grid_col) in position.items():
        x0 = grid_col * (1 + gap) * plan_tiles.cols
        y0 = grid_row * (1 + gap) * plan_tiles.rows
        ax.add_patch(Rectangle((x0, y0), plan_tiles.cols, plan_tiles.rows, facecolor="0.95",
                               edgecolor="black", linewidth=0.8))
        chip, array, tier = plan_tiles.place(slot)
        where = f"chip {chip} array {array}" + (f" tier {tier}" if plan_tiles.tiers > 1 else "")
        ax.text(x0, y0 - 0.03 * plan_tiles.rows, f"{where}: {utilization[slot]:.0%}",
                fontsize=6, va="bottom")
    for i in range(plan_tiles.slot.size):
        grid_row, grid_col = position[int(plan_tiles.slot[i])]
        x = grid_col * (1 + gap) * plan_tiles.cols + plan_tiles.col_offset[i]
        y = grid_row * (1 + gap) * plan_tiles.rows + plan_tiles.row_offset[i]
        owner = int(plan_tiles.owner[i])
        ax.add_patch(Rectangle((x, y), plan_tiles.width[i], plan_tiles.height[i],
                               facecolor=colors[plan_tiles.layers[owner]], edgecolor="white",
                               linewidth=0.6))
        if plan_tiles.width[i] >= plan_tiles.cols / 5 and plan_tiles.height[i] >= plan_tiles.rows / 6:
            ax.text(x + plan_tiles.width[i] / 2, y + plan_tiles.height[i] / 2,
                    plan_tiles.labels[owner].replace(" ", "\n", 2), ha="center", va="center",
                    fontsize=4.5, color="white")
    ax.set_xlim(-0.05 * plan_tiles.cols, per_row * (1 + gap) * plan_tiles.cols)
    ax.set_ylim(n_rows * (1 + gap) * plan_tiles.rows, -0.25 * plan_tiles.rows)
    ax.set_aspect("equal")
    ax.axis("off")
    total = plan_tiles.rows * plan_tiles.cols * max(used.size, 1)
    stored = float(np.dot(plan_tiles.height, plan_tiles.width))
    ax.set_title(f"floorplan: {plan_tiles.slot.size} tiles on {used.size} arrays of "
                 f"{plan_tiles.rows}x{plan_tiles.cols} (utilization {stored / total:.1%}); "
                 "rows = inputs, columns = outputs", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=f"layer {k}" if k >= 0 else "other")
                       for k, c in colors.items()], loc="upper center",
              bbox_to_anchor=(0.5, 0.0), ncol=min(len(colors), 8), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def _aggregated(plt: Any, plan_tiles: Floorplan, used: NDArray[np.int64]) -> Any:
    from matplotlib.colors import ListedColormap

    chips, layer, utilization = plan_tiles.site_grid()
    colors = _layer_colors(plan_tiles)
    keys = sorted(colors)
    cmap = ListedColormap([colors[k] for k in keys])
    index = np.full(layer.shape, np.nan)
    for i, key in enumerate(keys):
        index[layer == key] = i
    height = min(max(len(chips) * 0.05, 1.2), 6.0)
    fig, axes = plt.subplots(2, 1, figsize=(11, 2 * height + 2.2), squeeze=False)
    top, bottom = axes[:, 0]
    top.imshow(np.ma.masked_invalid(index), aspect="auto", interpolation="nearest", cmap=cmap,
               vmin=-0.5, vmax=len(keys) - 0.5)
    top.set_title(f"floorplan: {plan_tiles.slot.size:,} tiles on {used.size:,} arrays of "
                  f"{len(chips)} chip(s) x {plan_tiles.arrays_per_chip} arrays; colour = layer "
                  "of the array's first tile", fontsize=9)
    image = bottom.imshow(np.ma.masked_where(np.isnan(layer), utilization), aspect="auto",
                          interpolation="nearest", cmap="magma", vmin=0, vmax=1)
    bottom.set_title("array utilization (stored weights / cells, tiers summed)", fontsize=9)
    fig.colorbar(image, ax=bottom, fraction=0.03, pad=0.01)
    step = max(1, len(chips) // 10)
    for ax in (top, bottom):
        ax.set_xlabel("array in chip")
        ax.set_ylabel("chip")
        ax.set_yticks(range(0, len(chips), step), [str(c) for c in chips[::step]])
    shown = keys if len(keys) <= 16 else keys[:: max(1, len(keys) // 16)]
    from matplotlib.patches import Patch

    top.legend(handles=[Patch(color=colors[k], label=f"L{k}" if k >= 0 else "other")
                        for k in shown], loc="upper left", bbox_to_anchor=(1.0, 1.0),
               fontsize=6, frameon=False)
    fig.tight_layout()
    return fig


def write_plan_pictures(out_dir: Path, plan: dict[str, Any]) -> tuple[list[Path], list[str]]:
    """``placement.png`` and ``floorplan.png`` of a plan into ``out_dir``, each written to a
    temporary name first and renamed into place. Returns the files written and, for a picture
    the plan cannot give (no experts, no allocation), why it was skipped."""
    written: list[Path] = []
    skipped: list[str] = []
    for name, draw in (("placement.png", plot_placement), ("floorplan.png", plot_floorplan)):
        target = Path(out_dir) / name
        staging = target.with_name(f".{name}.tmp.png")
        try:
            draw(staging, plan)
            os.replace(staging, target)
        except OutputError as exc:
            skipped.append(f"no {name}: {exc}")
            continue
        except OSError as exc:
            raise OutputError(f"cannot write {target}: {exc.strerror}") from exc
        finally:
            staging.unlink(missing_ok=True)
        written.append(target)
    return written, skipped
