"""OpenSimplex noise in 2D and 3D, vectorised in torch, plus its multi-octave (fractal) sum.

Pure math, no I/O. The single-octave functions reproduce the values of the ``opensimplex``
package (Kurt Spencer's 2014 OpenSimplex, the algorithm AnoDDPM's ``simplex.py`` also copies) for
the same coordinates and seed; the test suite checks this to 1e-6. They are evaluated for every
point of a batch at once with torch ops on the tensors' device: per point the algorithm looks at a
fixed number of lattice vertices (4 in 2D, 8 in 3D), chosen by a *case* that is computed with
comparisons, so there is no Python loop over points or samples.

The algorithm, in short (OpenSimplex):

1. Skew the input point ``p`` onto the "stretched" lattice: ``s = p + sum(p) * STRETCH``; the integer
   part ``floor(s)`` names a unit super-cell, the fractional part ``ins`` says where in it we are.
2. Each lattice vertex ``v`` (integer, skewed coordinates) gets a pseudo-random gradient ``g(v)`` from a
   256-entry permutation table (hash ``perm[(perm[(perm[vx & 255] + vy) & 255] + vz) & 255]``).
3. The noise is ``sum_v max(0, 2 - |d|^2)^4 * (g(v) . d) / NORM`` with ``d = p - unskew(v)`` and
   ``unskew(v) = v + sum(v) * SQUISH``, over the vertices the algorithm visits: in 2D every vertex whose
   kernel reaches the point (4 at most); in 3D the vertices of the cell region the point is in (the
   tetrahedron at (0,0,0), the octahedron, or the tetrahedron at (1,1,1)) plus two "extra" vertices
   picked by which region vertices are closest. In the two tetrahedral regions that choice can leave
   out a third vertex whose kernel still reaches the point (contribution below 3e-5); we reproduce
   the choice, not an idealised sum, so values equal the reference implementation.

The per-point vertex lists are the tables :data:`CASE_OFFSETS_2D` / :data:`CASE_OFFSETS_3D`
(built once below from the rules), indexed by the case number computed in
:func:`_cases_2d` / :func:`_cases_3d`.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

# Constants of the published algorithm (Spencer's OpenSimplexNoise.java; identical literals in
# the opensimplex package, which matters at cell boundaries).
STRETCH_2D = -0.211324865405187  # (1 / sqrt(2 + 1) - 1) / 2
SQUISH_2D = 0.366025403784439  # (sqrt(2 + 1) - 1) / 2
STRETCH_3D = -1.0 / 6.0  # (1 / sqrt(3 + 1) - 1) / 3
SQUISH_3D = 1.0 / 3.0  # (sqrt(3 + 1) - 1) / 3
NORM_2D = 47.0
NORM_3D = 103.0

# 2D gradients: the 8 directions to the vertices of an octagon; gradient number = (hash >> 1) & 7.
GRADIENTS_2D: tuple[tuple[int, int], ...] = (
    (5, 2), (2, 5), (-5, 2), (-2, 5), (5, -2), (2, -5), (-5, -2), (-2, -5),
)
# 3D gradients: 24 directions to the vertices of a skewed rhombicuboctahedron; number = hash % 24.
GRADIENTS_3D: tuple[tuple[int, int, int], ...] = tuple(
    tuple(sign_vec[axis] * (11 if axis == big else 4) for axis in range(3))
    for sign_vec in ((-1, 1, 1), (1, 1, 1), (-1, -1, 1), (1, -1, 1),
                     (-1, 1, -1), (1, 1, -1), (-1, -1, -1), (1, -1, -1))
    for big in range(3)
)

TABLE_SIZE = 256
# Fills the two unused slots of the tetrahedral cases: (2,2,2) (mirror (-1,-1,-1)) is more than
# 5 units from every point of its tetrahedron, outside the kernel (radius sqrt 2), so it adds
# exactly zero; it stays within [-1, 2] like every other offset, which the padded tables need.
_UNUSED = (2, 2, 2)

# opensimplex's seeding: a 64-bit linear congruential generator driving a Fisher-Yates shuffle.
_LCG_MULTIPLIER = 6364136223846793005
_LCG_INCREMENT = 1442695040888963407
_UINT64 = 1 << 64


# --------------------------------------------------------------------------------------------
# Permutation tables
# --------------------------------------------------------------------------------------------
def _lcg_step(state: int) -> int:
    """One step of the LCG in signed 64-bit arithmetic (wraps as C's int64 would)."""
    state = (state * _LCG_MULTIPLIER + _LCG_INCREMENT) % _UINT64
    return state - _UINT64 if state >= _UINT64 // 2 else state


def opensimplex_permutation(seed: int) -> torch.Tensor:
    """The permutation table that ``opensimplex.seed(seed)`` builds, as an int64 tensor of 256.

    Three warm-up LCG steps, then for ``i = 255 .. 0`` draw ``r = (state + 31) mod (i + 1)`` and move
    ``source[r]`` to ``perm[i]`` (a Fisher-Yates shuffle). Use it to reproduce the reference noise;
    :class:`~nndiff.diffusion.noise.SimplexNoise` draws its tables from a ``torch.Generator`` instead.
    """
    state = int(seed)
    for _ in range(3):
        state = _lcg_step(state)
    source = list(range(TABLE_SIZE))
    perm = [0] * TABLE_SIZE
    for i in range(TABLE_SIZE - 1, -1, -1):
        state = _lcg_step(state)
        r = (state + 31) % (i + 1)  # Python's modulo is already non-negative
        perm[i] = source[r]
        source[r] = source[i]
    return torch.tensor(perm, dtype=torch.int64)


def random_permutations(
    count: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """``count`` independent uniformly random permutations of 0..255, shape ``(count, 256)``, int64.

    Drawn in one call (argsort of float64 uniforms) so a batch costs no Python loop; float64 makes a
    tie, which would bias the permutation, practically impossible.
    """
    keys = torch.rand((count, TABLE_SIZE), generator=generator, device=device, dtype=torch.float64)
    return keys.argsort(dim=1)


# --------------------------------------------------------------------------------------------
# Case tables: which lattice vertices (offsets from the cell origin, skewed coordinates) a point
# visits. Built from OpenSimplex's rules so the code below only computes a case number per point.
# --------------------------------------------------------------------------------------------
def _unit(axis: int, scale: int = 1) -> tuple[int, int, int]:
    return tuple(scale if a == axis else 0 for a in range(3))  # type: ignore[return-value]


def _add(*vectors: Sequence[int]) -> tuple[int, ...]:
    return tuple(sum(components) for components in zip(*vectors))


def _mirror(offset: Sequence[int]) -> tuple[int, ...]:
    """Point reflection of the unit cell: (1,1,1) - offset. Maps the (0,0,0) tetrahedron onto the (1,1,1) one."""
    return tuple(1 - o for o in offset)


_ONES = (1, 1, 1)


def _tetrahedron_extras(case: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Extra vertices for a point in the tetrahedron at (0,0,0).

    Cases 0..2 (the origin is one of the two closest tetrahedron vertices; ``c`` = the closest unit
    vertex): ``e_c - e_j`` for the two other axes ``j``. Cases 3..5 (the two closest are unit vertices
    ``e_a``, ``e_b``; ``k`` = the remaining axis): ``(1,1,1) - e_k`` and ``(1,1,1) - 2 e_k``.
    """
    if case < 3:
        c = case
        others = [j for j in range(3) if j != c]
        return tuple(_add(_unit(c), _unit(j, -1)) for j in others)  # type: ignore[return-value]
    k = case - 3
    return _add(_ONES, _unit(k, -1)), _add(_ONES, _unit(k, -2))


def _octahedron_extras(case: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Extra vertices for a point in the octahedron between the two tetrahedra.

    The octahedron's vertices form three opposite pairs, pair ``q`` = (``e_q`` "near", ``(1,1,1) - e_q``
    "far"); the two pairs whose closer vertex is closest decide. Cases 0..2: both closer vertices far,
    ``r`` = third axis: ``(1,1,1)`` and ``2 e_r``. Cases 3..5: both near: ``(0,0,0)`` and
    ``(1,1,1) - 2 e_r``. Cases 6..11: one far vertex (pair ``q1``) and one near vertex (pair ``q2``),
    case = 6 + 2 * q1 + (index of q2 among the other two axes): ``(1,1,1) - 2 e_q1`` and ``2 e_q2``.
    """
    if case < 3:
        return _ONES, _unit(case, 2)
    if case < 6:
        return (0, 0, 0), _add(_ONES, _unit(case - 3, -2))
    q1, rest = divmod(case - 6, 2)
    q2 = [q for q in range(3) if q != q1][rest]
    return _add(_ONES, _unit(q1, -2)), _unit(q2, 2)


def _build_case_offsets_3d() -> torch.Tensor:
    """Table ``(24, 8, 3)``: cases 0-5 tetrahedron at (0,0,0), 6-11 its mirror at (1,1,1), 12-23 octahedron."""
    rows: list[list[tuple[int, ...]]] = []
    corner = [_unit(0), _unit(1), _unit(2), (0, 0, 0)]
    for case in range(6):
        rows.append(corner + list(_tetrahedron_extras(case)) + [_UNUSED, _UNUSED])
    for case in range(6):
        rows.append([_mirror(o) for o in corner + list(_tetrahedron_extras(case))] + [_UNUSED, _UNUSED])
    octahedron = [_unit(0), _unit(1), _unit(2), (1, 1, 0), (1, 0, 1), (0, 1, 1)]
    for case in range(12):
        rows.append(octahedron + list(_octahedron_extras(case)))
    return torch.tensor(rows, dtype=torch.int64)


def _build_case_offsets_2d() -> torch.Tensor:
    """Table ``(6, 4, 2)``: the triangle's three vertices plus one extra vertex.

    Cases 0-2: triangle at (0,0), extra (1,-1), (-1,1) or (1,1); cases 3-5: triangle at (1,1), extra
    (2,0), (0,2) or (0,0).
    """
    lower = [(1, 0), (0, 1), (0, 0)]
    upper = [(1, 0), (0, 1), (1, 1)]
    extras_lower = [(1, -1), (-1, 1), (1, 1)]
    extras_upper = [(2, 0), (0, 2), (0, 0)]
    rows = [lower + [e] for e in extras_lower] + [upper + [e] for e in extras_upper]
    return torch.tensor(rows, dtype=torch.int64)


CASE_OFFSETS_2D = _build_case_offsets_2d()
CASE_OFFSETS_3D = _build_case_offsets_3d()


# --------------------------------------------------------------------------------------------
# Case numbers: vectorised versions of OpenSimplex's branches, with the reference's tie order.
# Only comparisons, boolean and int32 arithmetic (torch.where is slow on CPU and float blends
# could round): each returns an int32 case number per point.
# --------------------------------------------------------------------------------------------
def _int(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.int32)


def _cases_2d(xins: torch.Tensor, yins: torch.Tensor, in_sum: torch.Tensor) -> torch.Tensor:
    """Case number 0..5 per point for :data:`CASE_OFFSETS_2D`."""
    lower = in_sum <= 1
    # Lower triangle: if (0,0) is one of the two closest vertices the extra vertex leans towards
    # the larger of xins, yins, else it is (1,1). Upper triangle: the mirror image.
    z_lower, z_upper = 1 - in_sum, 2 - in_sum
    close_lower = (z_lower > xins) | (z_lower > yins)
    close_upper = (z_upper < xins) | (z_upper < yins)
    origin_close = _int((lower & close_lower) | (~lower & close_upper))
    lean = _int(xins <= yins)  # 0: extra vertex towards x, 1: towards y
    return 2 + origin_close * (lean - 2) + 3 * _int(~lower)


def _tetrahedron_case(
    sx: torch.Tensor, sy: torch.Tensor, sz: torch.Tensor, w: torch.Tensor, *, mirrored: bool
) -> torch.Tensor:
    """Case 0..5 of :func:`_tetrahedron_extras` from closeness scores of e_x, e_y, e_z and the origin.

    In the (0,0,0) tetrahedron a larger score is closer; in the mirrored (1,1,1) one a smaller
    score is, so there every comparison is reversed (as in the reference).
    """
    closer = torch.lt if mirrored else torch.gt
    closer_or_equal = torch.le if mirrored else torch.ge
    # The two closest unit vertices: a is x or z, b is y or z.
    x_beats_y = closer_or_equal(sx, sy)
    b_is_z = x_beats_y & closer(sz, sy)
    a_is_z = ~x_beats_y & closer(sz, sx)
    w_beats_x, w_beats_y, w_beats_z = closer(w, sx), closer(w, sy), closer(w, sz)
    origin_close = (a_is_z & w_beats_z) | (~a_is_z & w_beats_x) | (b_is_z & w_beats_z) | (~b_is_z & w_beats_y)
    b_closest = (b_is_z & closer(sz, sx)) | (a_is_z & closer(sy, sz)) | (~(a_is_z | b_is_z) & ~x_beats_y)
    a_axis = 2 * _int(a_is_z)
    b_axis = 1 + _int(b_is_z)
    closest = a_axis + _int(b_closest) * (b_axis - a_axis)
    remaining = 3 - a_axis - b_axis
    return 3 + remaining + _int(origin_close) * (closest - 3 - remaining)


def _octahedron_case(xins: torch.Tensor, yins: torch.Tensor, zins: torch.Tensor) -> torch.Tensor:
    """Case 0..11 of :func:`_octahedron_extras`."""
    # Pair z: (0,0,1) vs (1,1,0), decided by x + y; pair y by x + z; pair x by y + z. |p - 1| equals
    # the reference's "p - 1 if p > 1 else 1 - p" exactly (rounding is symmetric).
    p_z, p_y, p_x = xins + yins, xins + zins, yins + zins
    far_z, far_y, far_x = p_z > 1, p_y > 1, p_x > 1
    score_z, score_y, score_x = (p_z - 1).abs(), (p_y - 1).abs(), (p_x - 1).abs()
    # Start with pairs a = z, b = y; pair x replaces the weaker of them if it is closer.
    z_le_y = score_z <= score_y
    replace_a = z_le_y & (score_z < score_x)
    replace_b = ~replace_a & ~z_le_y & (score_y < score_x)
    a_far = _int((replace_a & far_x) | (~replace_a & far_z))
    b_far = _int((replace_b & far_x) | (~replace_b & far_y))
    a_axis = 2 - 2 * _int(replace_a)
    b_axis = 1 - _int(replace_b)
    third = 3 - a_axis - b_axis
    same_side_case = third + 3 * (1 - a_far)
    far_pair = b_axis + a_far * (a_axis - b_axis)  # only used when exactly one is far
    near_pair = a_axis + b_axis - far_pair
    mixed_case = 6 + 2 * far_pair + near_pair - _int(near_pair > far_pair)
    same_side = 1 - (a_far ^ b_far)
    return mixed_case + same_side * (same_side_case - mixed_case)


def _cases_3d(xins: torch.Tensor, yins: torch.Tensor, zins: torch.Tensor, in_sum: torch.Tensor) -> torch.Tensor:
    """Case number 0..23 per point for :data:`CASE_OFFSETS_3D`."""
    lower = _int(in_sum <= 1)
    upper = _int(in_sum >= 2)
    tet_lower = _tetrahedron_case(xins, yins, zins, 1 - in_sum, mirrored=False)
    tet_upper = 6 + _tetrahedron_case(xins, yins, zins, 3 - in_sum, mirrored=True)
    octahedron = 12 + _octahedron_case(xins, yins, zins)
    return lower * tet_lower + upper * tet_upper + (1 - lower - upper) * octahedron


# --------------------------------------------------------------------------------------------
# Evaluation on flat point lists
# --------------------------------------------------------------------------------------------
def _as_tables(perm: torch.Tensor) -> torch.Tensor:
    """Permutation(s) as a ``(S, 256)`` int32 tensor; raises on a malformed table."""
    if perm.ndim == 1:
        perm = perm[None]
    if perm.ndim != 2 or perm.shape[1] != TABLE_SIZE:
        raise ValueError(f"permutation table must have shape (256,) or (S, 256), got {tuple(perm.shape)}")
    return perm.to(torch.int32)


# Lookup tables are stored per permutation in blocks of _BLOCK entries, entry ``_PAD + i`` for
# ``i`` in [-2, 513] holding the value for ``i mod 256``. Hash sums (previous level + lattice
# coordinate & 255 + vertex offset in [-1, 2]) then index a block directly: no "& 255" and no
# table-base addition per vertex, which are a fifth of the work per vertex.
_PAD = 2
_BLOCK = 2 * TABLE_SIZE + 2 * _PAD


class _Tables:
    """Padded permutation and gradient tables for ``S`` permutations (built once per call).

    ``perm[b + _PAD + i] = perm_s[i mod 256] + b + _PAD`` with ``b = s * _BLOCK``: the stored value
    already points into the same block, ready for the next level's sum. ``gradients[axis][b + _PAD + i]``
    is that axis's component of the gradient that ``perm_s[i mod 256]`` selects.
    """

    def __init__(self, perm: torch.Tensor, dims: int, dtype: torch.dtype):
        perm = _as_tables(perm)
        self.count = perm.shape[0]
        device = perm.device
        wrapped = torch.arange(-_PAD, _BLOCK - _PAD, device=device) % TABLE_SIZE
        padded = perm[:, wrapped]  # (S, _BLOCK)
        block_start = (torch.arange(self.count, device=device, dtype=torch.int32) * _BLOCK + _PAD)[:, None]
        self.perm = (padded + block_start).reshape(-1)
        if dims == 2:
            gradients, number = GRADIENTS_2D, (padded >> 1) & 7
        else:
            gradients, number = GRADIENTS_3D, padded % 24
        table = torch.tensor(gradients, dtype=dtype, device=device)[number.reshape(-1).long()]
        self.gradients = [table[:, axis].contiguous() for axis in range(dims)]

    def block_start(self, table_index: torch.Tensor) -> torch.Tensor:
        """Entry of ``i = 0`` in the block of each point's permutation."""
        return table_index.to(torch.int32) * _BLOCK + _PAD


class _Slot:
    """One vertex slot of a case table, as per-case lookup vectors: integer offset and unskewed offset per axis."""

    def __init__(self, offsets: torch.Tensor, squish: float, device: torch.device, dtype: torch.dtype):
        unskewed = offsets.double() + offsets.sum(dim=1, keepdim=True).double() * squish
        self.lattice = [column.to(device=device, dtype=torch.int32) for column in offsets.T]
        self.unskewed = [column.to(device=device, dtype=dtype) for column in unskewed.T]


@functools.lru_cache(maxsize=16)
def _slots(dims: int, device: torch.device, dtype: torch.dtype) -> tuple[_Slot, ...]:
    table, squish = (CASE_OFFSETS_2D, SQUISH_2D) if dims == 2 else (CASE_OFFSETS_3D, SQUISH_3D)
    return tuple(_Slot(table[:, slot], squish, device, dtype) for slot in range(table.shape[1]))


def _evaluate(position: Sequence[torch.Tensor], table_index: torch.Tensor, tables: _Tables) -> torch.Tensor:
    """OpenSimplex (2D or 3D) at flat points ``position = (x, y[, z])``, each ``(N,)``.

    ``table_index`` (integer, ``(N,)``) says which permutation of ``tables`` each point uses.
    """
    dims = len(position)
    stretch_c, squish_c, norm = (STRETCH_2D, SQUISH_2D, NORM_2D) if dims == 2 else (STRETCH_3D, SQUISH_3D, NORM_3D)
    # Same operation order as the reference, so cell and case decisions agree bit for bit.
    total = position[0] + position[1] if dims == 2 else position[0] + position[1] + position[2]
    stretch = total * stretch_c
    skewed = [p + stretch for p in position]
    cell = [torch.floor(s) for s in skewed]
    squish = (cell[0] + cell[1] if dims == 2 else cell[0] + cell[1] + cell[2]) * squish_c
    origin_delta = [p - (c + squish) for p, c in zip(position, cell)]
    inside = [s - c for s, c in zip(skewed, cell)]
    if dims == 2:
        case = _cases_2d(inside[0], inside[1], inside[0] + inside[1])
    else:
        case = _cases_3d(inside[0], inside[1], inside[2], inside[0] + inside[1] + inside[2])
    # Lattice coordinates mod 256; the first one already points into the point's table block.
    wrapped = [c.to(torch.int32).bitwise_and_(TABLE_SIZE - 1) for c in cell]
    wrapped[0] += tables.block_start(table_index)

    value = torch.zeros_like(position[0])
    for slot in _slots(dims, position[0].device, position[0].dtype):
        # In-place updates below only touch temporaries; they save allocations, which dominate on CPU.
        delta = [d - u.index_select(0, case) for d, u in zip(origin_delta, slot.unskewed)]
        radius2 = delta[0] * delta[0]
        for axis in range(1, dims):
            radius2.addcmul_(delta[axis], delta[axis])
        attn = radius2.neg_().add_(2).clamp_(min=0)
        # Hash the vertex: perm[(perm[(perm[x & 255] + y) & 255] + z) & 255] (2D: one level less)
        # through the padded tables; the gradient tables hold the last lookup.
        index = wrapped[0] + slot.lattice[0].index_select(0, case)
        for axis in range(1, dims):
            index = tables.perm.index_select(0, index)
            index.add_(wrapped[axis]).add_(slot.lattice[axis].index_select(0, case))
        dot = tables.gradients[0].index_select(0, index).mul_(delta[0])
        for axis in range(1, dims):
            dot.addcmul_(tables.gradients[axis].index_select(0, index), delta[axis])
        attn.mul_(attn)
        value.addcmul_(attn.mul_(attn), dot)
    return value / norm


def _flatten_rows(
    coordinates: Sequence[torch.Tensor], count: int
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Size]:
    """Broadcast coordinates to one shape and flatten; row ``s`` of the leading axis uses table ``s``."""
    shape = torch.broadcast_shapes(*(c.shape for c in coordinates))
    if count > 1 and (len(shape) == 0 or shape[0] != count):
        raise ValueError(
            f"with {count} permutation tables the coordinates need a leading dimension of {count}, "
            f"got shape {tuple(shape)}"
        )
    flat = [c.expand(shape).reshape(-1) for c in coordinates]
    per_row = flat[0].numel() // count
    table_index = torch.arange(count, dtype=torch.int32, device=flat[0].device).repeat_interleave(per_row)
    return flat, table_index, shape


def opensimplex2(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Single-octave 2D OpenSimplex noise at ``(x, y)``, in [-1, 1].

    ``perm`` is one permutation table ``(256,)`` or one per row ``(S, 256)``; with ``S`` tables the
    broadcast coordinates have leading dimension ``S`` and row ``s`` uses table ``s``. Returns the
    broadcast shape in the coordinates' floating dtype; equals ``opensimplex.noise2(x, y)`` with the
    table of :func:`opensimplex_permutation` (use float64 for agreement to 1e-6 and beyond).
    """
    tables = _Tables(perm.to(x.device), 2, x.dtype)
    flat, table_index, shape = _flatten_rows([x, y], tables.count)
    return _evaluate(flat, table_index, tables).reshape(shape)


def opensimplex3(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Single-octave 3D OpenSimplex noise at ``(x, y, z)``, in [-1, 1].

    Same conventions as :func:`opensimplex2`; equals ``opensimplex.noise3(x, y, z)``.
    """
    tables = _Tables(perm.to(x.device), 3, x.dtype)
    flat, table_index, shape = _flatten_rows([x, y, z], tables.count)
    return _evaluate(flat, table_index, tables).reshape(shape)


# --------------------------------------------------------------------------------------------
# Multi-octave (fractal) noise on image grids
# --------------------------------------------------------------------------------------------
def octave_scales(octaves: int, frequency: float, lacunarity: float = 2.0) -> list[float]:
    """Noise-space units per voxel for each octave: ``lacunarity**k / frequency``.

    ``frequency`` follows AnoDDPM's naming: it is the *feature size* of the first octave in voxels
    (voxel index ``i`` is sampled at noise coordinate ``i / frequency``); AnoDDPM halves it for each
    further octave, i.e. ``lacunarity = 2``.
    """
    return [lacunarity**k / frequency for k in range(octaves)]


def octave_amplitudes(octaves: int, persistence: float) -> list[float]:
    """Weight of each octave in the sum: ``persistence**k`` (the first octave has weight 1)."""
    return [persistence**k for k in range(octaves)]


def default_chunk_points(device: torch.device | str) -> int:
    """Points evaluated per chunk: small on CPU (the intermediates of ~400 elementwise ops stay in
    cache), one large launch on GPU (launch overhead dominates there)."""
    return 1 << 24 if torch.device(device).type == "cuda" else 1 << 15


def fractal_simplex(
    spatial_shape: Sequence[int],
    perm: torch.Tensor,
    offsets: torch.Tensor,
    *,
    scales: Sequence[float],
    amplitudes: Sequence[float],
    spacing: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    max_chunk_points: int | None = None,
) -> torch.Tensor:
    """Sum of octaves of OpenSimplex noise on a voxel grid, one independent field per table.

    Args:
        spatial_shape: ``(H, W)`` or ``(D, H, W)``; the last array axis is noise ``x``, then ``y``, ``z``.
        perm: ``(S, 256)`` permutation tables, one per output field (row ``s`` of the result).
        offsets: ``(S, octaves, n)`` noise-space offsets per field and octave, in noise axis order
            ``(x, y[, z])``. ``n`` = number of spatial axes selects 2D or 3D noise; ``n = 3`` with a 2D
            grid samples the plane ``z = offset_z`` of 3D noise (AnoDDPM's choice for 2D images).
        scales, amplitudes: per octave (see :func:`octave_scales`, :func:`octave_amplitudes`). Octave
            ``k`` samples voxel index ``i`` (per axis) at ``i * spacing * scales[k] + offsets[:, k]``.
        spacing: relative voxel size per spatial axis (array order), default all 1.
        dtype: floating dtype of the computation and the result.
        max_chunk_points: (voxel, octave) evaluations per chunk; default
            :func:`default_chunk_points`. Bounds memory; the result does not depend on it.

    Returns:
        ``(S, *spatial_shape)`` tensor on ``perm.device``; not normalised.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    perm = _as_tables(perm)
    count, device = perm.shape[0], perm.device
    octaves, noise_dims = len(scales), offsets.shape[-1]
    if len(spatial_shape) not in (2, 3) or noise_dims not in (2, 3) or noise_dims < len(spatial_shape):
        raise ValueError(
            f"need a 2D or 3D grid and 2 or 3 noise axes (at least as many as grid axes), got grid "
            f"{spatial_shape} with {noise_dims} noise axes"
        )
    if tuple(offsets.shape[:2]) != (count, octaves) or octaves != len(amplitudes) or octaves < 1:
        raise ValueError(
            f"offsets must have shape ({count}, {octaves}, {noise_dims}) and scales/amplitudes one "
            f"entry per octave; got offsets {tuple(offsets.shape)}, {octaves} scales, "
            f"{len(amplitudes)} amplitudes"
        )
    spacing = [1.0] * len(spatial_shape) if spacing is None else [float(s) for s in spacing]
    if len(spacing) != len(spatial_shape):
        raise ValueError(f"spacing needs one value per spatial axis {spatial_shape}, got {spacing}")

    grid = _OctaveGrid(spatial_shape, spacing, offsets.to(device), scales, amplitudes, dtype)
    tables = _Tables(perm, noise_dims, dtype)
    voxels = count * grid.points_per_field
    # Whole voxels per chunk, all octaves of a voxel together: the octave sum is a plain reduction.
    chunk = max(1, (max_chunk_points or default_chunk_points(device)) // octaves)
    result = torch.empty(voxels, dtype=dtype, device=device)

    for start in range(0, voxels, chunk):
        stop = min(start + chunk, voxels)
        result[start:stop] = grid.evaluate(start, stop, tables)
    return result.reshape(count, *spatial_shape)


class _OctaveGrid:
    """Noise coordinates of the (octave, voxel) points of a range of flat voxels."""

    def __init__(self, spatial_shape, spacing, offsets, scales, amplitudes, dtype):
        self.noise_dims = offsets.shape[-1]
        self.points_per_field = math.prod(spatial_shape)
        # Grid axes in noise order (x = last array axis); a 2D grid in 3D noise has no z grid axis.
        self.axis_sizes = list(reversed(spatial_shape))
        self.axis_spacing = list(reversed(spacing))
        self.offsets = offsets.to(dtype).transpose(0, 1).contiguous()  # (octaves, S, noise_dims)
        self.scales = [float(s) for s in scales]
        self.amplitudes = [float(a) for a in amplitudes]
        self.dtype = dtype

    def evaluate(self, start: int, stop: int, tables: _Tables) -> torch.Tensor:
        """Octave sums for the flat voxels ``start:stop`` (voxel = field * points_per_field + index)."""
        voxel = torch.arange(start, stop, device=self.offsets.device)
        field = voxel // self.points_per_field
        index = voxel % self.points_per_field
        grid = []
        for size, step in zip(self.axis_sizes, self.axis_spacing):
            grid.append((index % size).to(self.dtype) * step)
            index = index // size
        # All octaves in one evaluation (octave-major), so each op runs once per chunk, not per octave.
        shift = self.offsets.index_select(1, field)  # (octaves, n, noise_dims)
        position = []
        for axis in range(self.noise_dims):
            if axis < len(grid):
                scaled = torch.stack([grid[axis] * scale for scale in self.scales])
                position.append((scaled + shift[..., axis]).reshape(-1))
            else:
                position.append(shift[..., axis].reshape(-1))
        table_index = field.to(torch.int32).repeat(len(self.scales))
        values = _evaluate(position, table_index, tables).reshape(len(self.scales), -1)
        # Fixed summation order: the result does not depend on chunking or threads.
        total = values[0] * self.amplitudes[0]
        for k in range(1, len(self.amplitudes)):
            total.add_(values[k], alpha=self.amplitudes[k])
        return total
