"""The hetmap analog tile model: a stack of matrices on AIMC crossbar tiles.

:class:`AnalogTileStack` holds ``E`` matrices ``[out, in]`` (``E`` experts, or 1 for a plain
linear layer), programmed once at construction. It computes rows ``x [S, in]`` sorted by matrix
(:class:`RowGroups`) with one grouped product per input-tile position. Per input tile it
follows aihwkit's ``AnalogMVM`` (one-pass forward of ``TorchInferenceTile`` in eval mode):

1. noise management: every row's input slice is divided by its abs-max (zero rows use 1);
2. the DAC rounds to steps of ``inp_res * 2 * inp_bound`` and clips to ``inp_bound``;
3. the crossbar product with the programmed (normalized) tile weights;
4. additive output noise ``out_noise``; the ADC rounds to steps of ``out_res * 2 * out_bound``
   (both in one step: :class:`~.fused.OutputNoise`);
5. bound management: if an output of a tile (one matrix, one column tile) exceeds
   ``out_bound`` for any row of the batch, that tile is recomputed with its inputs scaled down
   by 2, 4, ... (aihwkit's iterative rule and limit); outputs are clipped to ``out_bound``
   and multiplied back by the input scale;
6. the digital output scale (weight mapping factor times drift compensation) of the tile.

Partial sums of the input tiles are added digitally in tile order. The arithmetic keeps values
in DAC/ADC step units and folds the scalings together, so it matches aihwkit up to float
rounding, not bit for bit. Per-forward randomness (output noise) comes from a counter-based
generator seeded at construction (:mod:`.fused`): the same draws on every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hetmap.common.errors import SimulationError
from hetmap.common.grid import TileGrid

from .fused import OutputNoise, compiled, dac_levels
from .grouped import RowGroups, grouped_product
from .programming import chunk_cut, derive_seed, make_noise_model, program_in_chunks, seeded
from .settings import AnalogSettings

# Weights programmed per noise-model call: on a CPU few enough tiles that the temporaries
# stay in the cache; on a GPU enough to keep it busy.
_PROGRAM_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}
# Weights of one block programmed together in per-batch programming (settings rule 12): the
# tile memory such a simulation needs at once (float32: 16 MiB on a CPU, 64 MiB on a GPU,
# where larger groups keep it busy).
_PER_BATCH_GROUP_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}


@dataclass(frozen=True)
class StackView:
    """Matrices ``tensor[index]`` of a stored stack ``tensor [E, out, in]`` (all of them
    without ``index``), read a group at a time when needed: no copy of a subset is kept."""

    tensor: torch.Tensor
    index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        device = self.tensor.device
        if self.index is not None and self.index.device != device and device.type != "meta":
            # once here, not at every take (frozen: set through object.__setattr__)
            object.__setattr__(self, "index", self.index.to(device))

    @property
    def shape(self) -> tuple[int, int, int]:
        num = int(self.tensor.shape[0]) if self.index is None else int(self.index.numel())
        return (num, int(self.tensor.shape[1]), int(self.tensor.shape[2]))

    def take(self, first: int, last: int) -> torch.Tensor:
        """Matrices ``first .. last - 1`` of the view (a view of the store without index)."""
        if self.index is None:
            return self.tensor[first:last]
        return self.tensor[self.index[first:last].to(self.tensor.device)]  # no-op but on meta


def stack_views(weights: torch.Tensor | StackView | Sequence[torch.Tensor | StackView]
                ) -> list[StackView]:
    blocks = [weights] if isinstance(weights, (torch.Tensor, StackView)) else list(weights)
    return [b if isinstance(b, StackView) else StackView(b.detach()) for b in blocks]


@dataclass(frozen=True)
class _Tiles:
    """Programmed tiles of some matrices of a stack: what a forward computes with."""

    grid: TileGrid
    weight: torch.Tensor  # [E, out, in], normalized units
    out_scales: torch.Tensor  # [E, in_tiles, out]
    tile_scales: torch.Tensor  # out_scales per column tile where they share one, else out_scales
    column_tile: torch.Tensor  # [out]: column tile of each output
    tile_width: int  # width of every column tile if all equal and share one scale, else 0

    @classmethod
    def of(cls, grid: TileGrid, settings: AnalogSettings, weight: torch.Tensor,
           out_scales: torch.Tensor) -> _Tiles:
        column_tile = torch.as_tensor(grid.column_tile_index(), device=weight.device)
        width = _uniform_tile_width(grid, settings)
        # With equal-width column tiles and one scale per tile, step 6 scales [S, tiles]
        # views instead of gathering a [S, out] scale per row.
        tile_scales = out_scales[..., ::width].contiguous() if width else out_scales
        return cls(grid, weight, out_scales, tile_scales, column_tile, width)

    @property
    def num_matrices(self) -> int:
        return int(self.weight.shape[0])


class AnalogTileStack(nn.Module):
    """``E`` matrices ``[out, in]`` programmed onto crossbar tiles, computed grouped.

    ``settings.programming == "resident"``: programmed once, here. ``"per-batch"``: the given
    weights are kept (not copied: they must stay alive and unchanged) and programmed at every
    forward a group of matrices at a time (:meth:`_forward_per_batch`)."""

    weight: torch.Tensor
    out_scales: torch.Tensor
    tile_scales: torch.Tensor
    column_tile: torch.Tensor

    def __init__(
        self,
        weights: torch.Tensor | StackView | Sequence[torch.Tensor | StackView],
        settings: AnalogSettings,
        seed: int,
        out_splits: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        blocks = stack_views(weights)
        if any(len(b.shape) != 3 or b.shape[::2] != blocks[0].shape[::2] for b in blocks):
            raise SimulationError(
                "analog tile stack needs weights [E, out, in] (or blocks of them along out), "
                f"got {[tuple(b.shape) for b in blocks]}")
        out_features = sum(int(b.shape[1]) for b in blocks)
        in_features = int(blocks[0].shape[2])
        splits = tuple(out_splits) if out_splits is not None else (out_features,)
        if sum(splits) != out_features:
            raise SimulationError(f"out_splits {splits} do not add up to {out_features} outputs")
        if len(blocks) > 1 and tuple(int(b.shape[1]) for b in blocks) != splits:
            raise SimulationError(f"weight blocks of {[int(b.shape[1]) for b in blocks]} outputs "
                                  f"do not match out_splits {splits}")
        self.settings = settings
        self.grid = TileGrid.build(in_features, splits, settings.rows, settings.cols)
        self.seed = seed
        self._num = int(blocks[0].shape[0])
        self._noise: OutputNoise | None = None
        self.resident = settings.programming == "resident"
        self._sources: list[StackView] = [] if self.resident else blocks
        if not self.resident:
            return
        tile_weights, out_scales = self._program(blocks, seed)
        tiles = _Tiles.of(self.grid, settings, tile_weights, out_scales)
        self.register_buffer("weight", tile_weights)  # [E, out, in], normalized units
        self.register_buffer("out_scales", out_scales)  # [E, in_tiles, out]
        self.register_buffer("column_tile", tiles.column_tile, persistent=False)
        self.register_buffer("tile_scales", tiles.tile_scales, persistent=False)
        self._tile_width = tiles.tile_width

    @property
    def num_matrices(self) -> int:
        return self._num

    def _block(self, blocks: list[StackView], index: int, first: int, last: int
               ) -> torch.Tensor:
        """Matrices ``first .. last - 1`` of matrix block ``index`` (e.g. gate, up)."""
        if len(blocks) > 1:
            return blocks[index].take(first, last)
        start, size = self.grid.out_offsets()[index]
        return blocks[0].take(first, last)[:, start:start + size]

    def _program(self, blocks: list[StackView], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Program every matrix block (e.g. gate, up), a few tiles per noise-model call,
        straight into one float32 (at least) stack: no concatenated or converted copy of the
        weights is made. ``blocks``: the whole stack, or one view per block."""
        settings = self.settings
        device = blocks[0].tensor.device
        work = torch.promote_types(blocks[0].tensor.dtype, torch.float32)
        num, in_features = self._num, self.grid.in_features
        out_features = self.grid.out_features
        tile_weights = torch.empty(num, out_features, in_features, dtype=work, device=device)
        out_scales = torch.empty(num, -(-in_features // settings.rows), out_features,
                                 dtype=work, device=device)
        noise_model = None if settings.ideal else make_noise_model(settings)
        with seeded(seed, device):
            for index, (start, size) in enumerate(self.grid.out_offsets()):
                program_in_chunks(
                    self._block(blocks, index, 0, num), settings, noise_model,
                    _chunk_elements(device),
                    out=(tile_weights[:, start:start + size],
                         out_scales[..., start:start + size]))
        return tile_weights, out_scales

    def extra_repr(self) -> str:
        grid = self.grid
        return (
            f"matrices={self.num_matrices}, out={grid.out_features}, in={grid.in_features}, "
            f"tiles={self.num_matrices * grid.count} of {grid.rows}x{grid.cols}"
            + ("" if self.resident else ", programmed per batch")
        )

    def forward(self, inputs: torch.Tensor, groups: RowGroups | None = None) -> torch.Tensor:
        """Rows ``inputs [S, in]`` sorted by matrix (``groups``; omit for one matrix)."""
        if inputs.ndim != 2 or inputs.shape[1] != self.grid.in_features:
            raise SimulationError(
                f"analog tile stack expects rows [S, {self.grid.in_features}], "
                f"got {tuple(inputs.shape)}"
            )
        if groups is None:
            if self.num_matrices != 1:
                raise SimulationError("a stack of several matrices needs the rows' groups")
            groups = RowGroups.single(inputs.shape[0], inputs.device)
        if not self.resident:
            return self._forward_per_batch(inputs, groups)
        inputs = inputs.to(self.weight.dtype)
        tiles = _Tiles(self.grid, self.weight, self.out_scales, self.tile_scales,
                       self.column_tile, self._tile_width)
        return self._compute(tiles, inputs, groups)

    def _forward_per_batch(self, inputs: torch.Tensor, groups: RowGroups) -> torch.Tensor:
        """Rule 12 of the settings: program a group of matrices of one block (e.g. gate),
        compute its columns for the group's rows, drop it. Block by block, group by group:
        the order in which resident programming draws its noise (each group holds whole
        chunks of :func:`program_in_chunks`), so the tiles are the same."""
        settings, blocks = self.settings, self._sources
        device = blocks[0].tensor.device
        if inputs.device != device:
            raise SimulationError(
                f"tiles programmed per batch read the model's weights on {device}, but the "
                f"inputs are on {inputs.device}: move the model before simulating it")
        work = torch.promote_types(blocks[0].tensor.dtype, torch.float32)
        inputs = inputs.to(work)
        output = inputs.new_empty(inputs.shape[0], self.grid.out_features)
        noise_model = None if settings.ideal else make_noise_model(settings)
        chunk = _chunk_elements(device)
        ends = [0, *groups.ends.tolist()]
        step = _group_size(self.grid, settings, chunk, _group_elements(device))
        with seeded(self.seed, device):
            for index, (start, size) in enumerate(self.grid.out_offsets()):
                grid = TileGrid.build(self.grid.in_features, (size,), settings.rows,
                                      settings.cols)
                for first in range(0, self._num, step):
                    last = min(self._num, first + step)
                    low, high = ends[first], ends[last]
                    if low == high and not (settings.programs_noise or settings.drifts):
                        continue  # nothing to compute and no noise stream to keep in step
                    block = self._block(blocks, index, first, last)
                    weight, scales = program_in_chunks(block, settings, noise_model, chunk)
                    if low < high:
                        output[low:high, start:start + size] = self._compute(
                            _Tiles.of(grid, settings, weight, scales), inputs[low:high],
                            groups.subset(first, last))
        return output

    def _compute(self, tiles: _Tiles, inputs: torch.Tensor, groups: RowGroups) -> torch.Tensor:
        total: torch.Tensor | None = None
        for index, in_slice in enumerate(tiles.grid.in_slices()):
            tile_inputs = inputs[:, in_slice]
            if self.settings.ideal:
                partial = grouped_product(tile_inputs.contiguous(),
                                          tiles.weight[..., in_slice], groups)
                total = partial if total is None else total.add_(partial)
                continue
            partial, row_factor = self._tile_product(tiles, tile_inputs, in_slice, groups)
            total = self._accumulate(tiles, total, partial, row_factor, index, groups)
        assert total is not None
        return total

    def _accumulate(
        self,
        tiles: _Tiles,
        total: torch.Tensor | None,
        partial: torch.Tensor,
        row_factor: torch.Tensor | float,
        index: int,
        groups: RowGroups,
    ) -> torch.Tensor:
        """Step 6: ``total + partial * row_factor * out_scales`` of input tile ``index``."""
        single = tiles.num_matrices == 1
        if tiles.tile_width:  # one scale per column tile: scale [S, tiles, 1] views
            scales = tiles.tile_scales[:, index]
            factor = (scales if single else scales[groups.row_matrix]) * row_factor
            shape = (partial.shape[0], tiles.grid.n_col_tiles, tiles.tile_width)
            view, factor = partial.view(shape), factor.unsqueeze(-1)
            if total is None:
                return view.mul_(factor).view_as(partial)
            total.view(shape).addcmul_(view, factor)
            return total
        scales = tiles.out_scales[:, index]
        scales = scales if single else scales[groups.row_matrix]
        if isinstance(row_factor, torch.Tensor) or row_factor != 1.0:
            partial.mul_(row_factor)
        return partial.mul_(scales) if total is None else total.addcmul_(partial, scales)

    def _tile_product(
        self, tiles: _Tiles, tile_inputs: torch.Tensor, in_slice: slice, groups: RowGroups
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Steps 1-5 for one input-tile position, all matrices and column tiles. Returns the
        outputs and the per-row factor that still has to multiply them."""
        settings = self.settings
        tile_weight = tiles.weight[..., in_slice]
        input_scale: torch.Tensor | float = 1.0
        if settings.noise_management == "abs-max":
            abs_max = tile_inputs.abs().amax(dim=-1, keepdim=True)
            abs_max.masked_fill_(abs_max <= 0.0, 1.0)
            input_scale = 1.0 / abs_max
        reduction = 1.0
        result: torch.Tensor | None = None
        redo: torch.Tensor | None = None  # [E, column tiles]: tiles recomputed this round
        while True:
            scale = input_scale / reduction if reduction != 1.0 else input_scale
            outputs, unit, clipped = self._periphery_product(
                tiles, tile_inputs, tile_weight, groups, scale
            )
            if clipped is None and result is None:  # the common case: nothing clipped
                return outputs, unit / scale
            outputs.mul_(unit / scale)  # rounds differ in scale: merge in final units
            result = outputs if result is None else torch.where(
                redo[groups.row_matrix][:, tiles.column_tile], outputs, result)  # type: ignore[index]
            if clipped is None:
                return result, 1.0
            clipped = clipped if redo is None else clipped & redo
            if reduction > settings.max_bound_reduction or not bool(clipped.any()):
                return result, 1.0
            redo, reduction = clipped, reduction * 2.0

    def _periphery_product(
        self,
        tiles: _Tiles,
        tile_inputs: torch.Tensor,
        tile_weight: torch.Tensor,
        groups: RowGroups,
        scale: torch.Tensor | float,
    ) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """DAC, crossbar, output noise, ADC, clipping. Returns the outputs in units of the ADC
        step (``unit``, 1 without ADC; not yet multiplied back by ``1 / scale``) and, if
        bound management is on and an output clipped, which tiles (``[E, column tiles]``)."""
        settings = self.settings
        inp_unit = _step(settings.inp_res, settings.inp_bound) or 1.0
        unit = _step(settings.out_res, settings.out_bound) or 1.0
        if settings.kernels == "compiled":  # one kernel (hetmap.runtime.fused)
            levels = compiled(dac_levels)(
                tile_inputs, torch.as_tensor(scale, device=tile_inputs.device,
                                             dtype=tile_inputs.dtype),
                inp_unit, unit, settings.inp_bound, settings.inp_res > 0,
            )
        else:  # in float32 at least, as the compiled kernel computes (levels fit bf16)
            wide = tile_inputs.dtype in (torch.float32, torch.float64)
            work = tile_inputs if wide else tile_inputs.float()
            scale_ = scale if wide or not isinstance(scale, torch.Tensor) else scale.float()
            levels = work * (scale_ / inp_unit)
            if settings.inp_res > 0:
                levels.round_()
            levels.clamp_(-settings.inp_bound / inp_unit, settings.inp_bound / inp_unit)
            if inp_unit != unit:
                levels.mul_(inp_unit / unit)  # the product comes out in ADC steps
            levels = levels.to(tile_inputs.dtype)
        outputs = grouped_product(levels, tile_weight, groups)
        if settings.out_noise > 0:  # noise and ADC rounding in one step
            self._output_noise(outputs.device).add_round_(
                outputs, settings.out_noise / unit, settings.out_res > 0
            )
        elif settings.out_res > 0:
            outputs.round_()
        clipped = None
        if outputs.numel():
            low, high = torch.aminmax(outputs)
            bound = settings.out_bound
            if bool((high * unit > bound) | (low * unit < -bound)):
                if settings.bound_management == "iterative":
                    clipped = _clipped_tiles(tiles, outputs, groups, bound / unit)
                outputs.clamp_(-bound / unit, bound / unit)
        return outputs, unit, clipped

    def _output_noise(self, device: torch.device) -> OutputNoise:
        if self._noise is None or self._noise.device != device:
            compiled = self.settings.kernels == "compiled"
            self._noise = OutputNoise(derive_seed(self.seed, "output-noise"), device, compiled)
        return self._noise


def _clipped_tiles(tiles: _Tiles, outputs: torch.Tensor, groups: RowGroups, bound: float
                   ) -> torch.Tensor:
    """``[E, column tiles]``: whether any row of a matrix clipped in a column tile."""
    clipped_rows = (outputs.abs() > bound).to(outputs.dtype)  # [S, out]
    per_column = outputs.new_zeros(tiles.num_matrices, outputs.shape[1])
    per_column.index_add_(0, groups.row_matrix, clipped_rows)
    per_tile = outputs.new_zeros(tiles.num_matrices, tiles.grid.n_col_tiles)
    per_tile.index_add_(1, tiles.column_tile, per_column)
    return per_tile > 0


def _uniform_tile_width(grid: TileGrid, settings: AnalogSettings) -> int:
    """Width of every column tile if all are equal and share one scale, else 0."""
    if settings.weight_scaling_columnwise or settings.ideal:
        return 0
    widths = {min(grid.cols, size) for size in grid.out_splits}
    width = widths.pop()
    if widths or any(size % width for size in grid.out_splits):
        return 0
    return width


def _chunk_elements(device: torch.device) -> int:
    return _PROGRAM_CHUNK_ELEMENTS.get(device.type, 1 << 24)


def _group_elements(device: torch.device) -> int:
    return _PER_BATCH_GROUP_ELEMENTS.get(device.type, 1 << 24)


def _group_size(grid: TileGrid, settings: AnalogSettings, chunk: int, elements: int) -> int:
    """Matrices programmed together per block in per-batch programming: about ``elements``
    weights, a multiple of the matrices one chunk of
    :func:`program_in_chunks` holds for every block (so that the groups cut the noise stream
    where resident programming does)."""
    per_chunk = 1
    for size in set(grid.out_splits):  # the cut program_in_chunks makes of each block
        per_chunk = math.lcm(per_chunk, chunk_cut(size, grid.in_features, settings, chunk)[0])
    wanted = elements // (max(grid.out_splits) * grid.in_features)
    return max(per_chunk, wanted // per_chunk * per_chunk)


def _step(res: float, bound: float) -> float:
    """aihwkit ``UniformQuantize`` step for resolution ``res`` over ``[-bound, bound]``."""
    if res <= 0:
        return 0.0
    step = 1.0 / res if res > 1.0 else res
    return step * 2.0 * bound


class DigitalStack(nn.Module):
    """``E`` matrices ``[out, in]`` computed exactly on rows sorted by matrix.

    Given one tensor, keeps it (pass a copy if the original must stay independent). Given
    views of the model's stores (:class:`StackView`, one per block along ``out``) with
    ``resident=True``, keeps one contiguous copy of them; with ``resident=False`` keeps the
    views and reads a group of matrices at a time at every forward (no copy kept)."""

    weight: torch.Tensor

    def __init__(self, weights: torch.Tensor | StackView | Sequence[torch.Tensor | StackView],
                 resident: bool = True) -> None:
        super().__init__()
        blocks = stack_views(weights)
        self._num = int(blocks[0].shape[0])
        self._sources: list[StackView] = [] if resident else blocks
        if resident:
            parts = [b.take(0, self._num) for b in blocks]
            weight = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=1)
            self.register_buffer("weight", weight.detach())

    @property
    def num_matrices(self) -> int:
        return self._num

    def forward(self, inputs: torch.Tensor, groups: RowGroups | None = None) -> torch.Tensor:
        if groups is None:
            groups = RowGroups.single(inputs.shape[0], inputs.device)
        if not self._sources:
            return grouped_product(inputs.to(self.weight.dtype), self.weight, groups)
        blocks = self._sources
        dtype = blocks[0].tensor.dtype
        inputs = inputs.to(dtype)
        width = sum(int(b.shape[1]) for b in blocks)
        output = inputs.new_empty(inputs.shape[0], width)
        ends = [0, *groups.ends.tolist()]
        step = max(1, _group_elements(blocks[0].tensor.device) // (width * int(blocks[0].shape[2])))
        for first in range(0, self._num, step):
            last = min(self._num, first + step)
            low, high = ends[first], ends[last]
            if low == high:
                continue
            weight = torch.cat([b.take(first, last) for b in blocks], dim=1)
            output[low:high] = grouped_product(inputs[low:high].contiguous(), weight,
                                               groups.subset(first, last))
        return output


class SimulatedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` whose matrix runs on simulated AIMC tiles; the bias is digital."""

    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, settings: AnalogSettings, seed: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.tiles = AnalogTileStack(linear.weight.detach().unsqueeze(0), settings, seed)
        self.weight_dtype = linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        """A data-less stand-in for the replaced matrix (:class:`MatrixStandIn`), for model
        code that reads ``linear.weight.dtype`` (T5-style casts). The matrix lives on the
        tiles: any computation with the stand-in raises instead of computing digitally."""
        empty = torch.empty(self.out_features, self.in_features, dtype=self.weight_dtype,
                            device="meta")
        return torch.Tensor._make_subclass(MatrixStandIn, empty)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        leading = inputs.shape[:-1]
        outputs = self.tiles(inputs.reshape(-1, self.in_features))
        outputs = outputs.reshape(*leading, self.out_features).to(inputs.dtype)
        if self.bias is not None:
            outputs = outputs + self.bias
        return outputs


class MatrixStandIn(torch.Tensor):
    """A tensor that answers questions about its shape, dtype and device and refuses every
    computation (a product with it would otherwise give uninitialised numbers silently)."""

    _READABLE = frozenset({"dtype", "shape", "device", "size", "dim", "ndim", "layout",
                           "is_floating_point", "requires_grad", "is_meta", "__repr__"})

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property such as .dtype
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name not in cls._READABLE:
            raise SimulationError(
                f"model code computes with the weight of a linear layer hetmap simulates on "
                f"analog tiles ({name}); only its shape, dtype and device can be read")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))
