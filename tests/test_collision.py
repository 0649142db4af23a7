"""Tests for craft.world.collision (oriented-box SAT, broad phases, spatial hash)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from shapely import affinity
from shapely.geometry import Polygon, box

from craft.errors import CraftError
from craft.world.collision import (
    box_corners,
    boxes_overlap,
    brute_force_pairwise,
    candidate_collisions,
    ego_collisions,
    first_collision,
    pairwise_collisions,
)

# ----------------------------------------------------------------------------- helpers


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def _shapely_box(cx: float, cy: float, yaw: float, length: float, width: float) -> Polygon:
    rect = box(-length / 2, -width / 2, length / 2, width / 2)
    rect = affinity.rotate(rect, yaw, origin=(0.0, 0.0), use_radians=True)
    return affinity.translate(rect, cx, cy)


def _random_box_pairs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A mix of generic, thin, nested, axis-aligned and far-apart box pairs."""
    groups = []

    def group(n, ca, cb, la, wa, lb, wb, ya=None, yb=None):
        ya = rng.uniform(-math.pi, math.pi, n) if ya is None else ya
        yb = rng.uniform(-math.pi, math.pi, n) if yb is None else yb
        groups.append(dict(ca=ca, cb=cb, ya=ya, yb=yb, la=la, wa=wa, lb=lb, wb=wb))

    n = 1200  # generic rotated boxes close to each other
    group(n, rng.uniform(-3, 3, (n, 2)), rng.uniform(-3, 3, (n, 2)),
          rng.uniform(0.3, 6, n), rng.uniform(0.2, 3, n), rng.uniform(0.3, 6, n), rng.uniform(0.2, 3, n))
    n = 400  # thin boxes (lines almost)
    group(n, rng.uniform(-2, 2, (n, 2)), rng.uniform(-2, 2, (n, 2)),
          rng.uniform(1, 6, n), rng.uniform(0.01, 0.08, n), rng.uniform(1, 6, n), rng.uniform(0.01, 0.08, n))
    n = 200  # nested: a small box well inside a big one
    ca = rng.uniform(-50, 50, (n, 2))
    group(n, ca, ca + rng.uniform(-0.5, 0.5, (n, 2)),
          rng.uniform(6, 10, n), rng.uniform(4, 6, n), rng.uniform(0.2, 1, n), rng.uniform(0.1, 1, n))
    n = 200  # far apart
    ang = rng.uniform(-math.pi, math.pi, n)
    dist = rng.uniform(15, 500, n)
    ca = rng.uniform(-100, 100, (n, 2))
    group(n, ca, ca + np.stack([np.cos(ang), np.sin(ang)], -1) * dist[:, None],
          rng.uniform(1, 6, n), rng.uniform(1, 3, n), rng.uniform(1, 6, n), rng.uniform(1, 3, n))
    n = 400  # axis-aligned / parallel boxes (degenerate axes)
    quarter = rng.integers(0, 4, n) * (math.pi / 2)
    group(n, rng.uniform(-3, 3, (n, 2)), rng.uniform(-3, 3, (n, 2)),
          rng.uniform(0.5, 5, n), rng.uniform(0.5, 3, n), rng.uniform(0.5, 5, n), rng.uniform(0.5, 3, n),
          ya=quarter, yb=quarter + rng.integers(0, 4, n) * (math.pi / 2))
    return {k: np.concatenate([g[k] for g in groups]).astype(np.float32) for k in groups[0]}


def _naive_candidates(ego_pos, ego_yaw, el, ew, pos, yaw, length, width, valid):
    """Reference: dense SAT on every (b, g, h, n) through boxes_overlap broadcasting."""
    if pos.dim() == 3:  # static others
        pos, yaw, valid = pos[:, None], yaw[:, None], valid[:, None]
    hit = boxes_overlap(
        ego_pos[:, :, :, None, :],
        ego_yaw[..., None],
        el[:, None, None, None],
        ew[:, None, None, None],
        pos[:, None],
        yaw[:, None],
        length[:, None, None],
        width[:, None, None],
    )
    return hit & valid[:, None]


def _random_scene(rng, B, N, extent, p_valid=0.9, long_trucks=False):
    pos = rng.uniform(0, extent, (B, N, 2))
    yaw = rng.uniform(-math.pi, math.pi, (B, N))
    length = rng.uniform(3.5, 5.5, (B, N))
    width = rng.uniform(1.6, 2.2, (B, N))
    if long_trucks:
        truck = rng.random((B, N)) < 0.1
        length = np.where(truck, rng.uniform(10, 18, (B, N)), length)
    valid = rng.random((B, N)) < p_valid
    pos = np.where(valid[..., None], pos, np.nan)  # invalid agents carry NaN padding
    return _t(pos), _t(yaw), _t(length), _t(width), torch.as_tensor(valid)


def _pairs(result):
    i, j, b = result
    return torch.stack([b, i, j], 1).tolist()


# ----------------------------------------------------------------------------- box_corners


def test_box_corners_match_shapely_rotated_rectangle():
    rng = np.random.default_rng(0)
    n = 200
    c = rng.uniform(-50, 50, (n, 2))
    yaw = rng.uniform(-4, 4, n)
    length = rng.uniform(0.5, 12, n)
    width = rng.uniform(0.2, 3, n)
    corners = box_corners(_t(c), _t(yaw), _t(length), _t(width))
    assert corners.shape == (n, 4, 2) and corners.dtype == torch.float32
    for k in range(n):
        ref = np.asarray(_shapely_box(c[k, 0], c[k, 1], yaw[k], length[k], width[k]).exterior.coords)[:4]
        np.testing.assert_allclose(corners[k].numpy(), ref, atol=2e-4)
        poly = Polygon(corners[k].numpy())
        assert poly.exterior.is_ccw
        assert poly.area == pytest.approx(length[k] * width[k], rel=1e-4)


def test_box_corners_broadcast_and_order():
    corners = box_corners(torch.zeros(2), torch.tensor(0.0), torch.tensor(4.0), torch.tensor(2.0))
    expected = torch.tensor([[2.0, -1.0], [2.0, 1.0], [-2.0, 1.0], [-2.0, -1.0]])
    assert torch.allclose(corners, expected)
    batched = box_corners(torch.zeros(3, 5, 2), torch.zeros(3, 5), torch.tensor(4.0), torch.tensor(2.0))
    assert batched.shape == (3, 5, 4, 2)


# ----------------------------------------------------------------------------- boxes_overlap


def test_boxes_overlap_matches_shapely():
    rng = np.random.default_rng(1)
    p = _random_box_pairs(rng)
    n = len(p["ya"])
    assert n >= 2000
    got = boxes_overlap(
        _t(p["ca"]), _t(p["ya"]), _t(p["la"]), _t(p["wa"]), _t(p["cb"]), _t(p["yb"]), _t(p["lb"]), _t(p["wb"])
    ).numpy()
    compared = overlapping = 0
    for k in range(n):
        a = _shapely_box(*p["ca"][k], p["ya"][k], p["la"][k], p["wa"][k])
        b = _shapely_box(*p["cb"][k], p["yb"][k], p["lb"][k], p["wb"][k])
        area = a.intersection(b).area
        gap = a.distance(b)
        if area > 1e-6:
            truth = True
        elif gap > 1e-4:
            truth = False
        else:
            continue  # touching within tolerance: either answer is acceptable
        compared += 1
        overlapping += truth
        assert bool(got[k]) == truth, f"pair {k}: SAT says {bool(got[k])}, shapely area={area} gap={gap}"
    assert compared >= 0.97 * n
    assert 0.2 * compared < overlapping < 0.8 * compared  # both outcomes well represented


def test_boxes_overlap_is_symmetric_and_broadcasts():
    g = torch.Generator().manual_seed(2)
    ca, cb = torch.rand(500, 2, generator=g) * 6, torch.rand(500, 2, generator=g) * 6
    ya, yb = torch.rand(500, generator=g) * 7, torch.rand(500, generator=g) * 7
    la, wa = 1 + 4 * torch.rand(500, generator=g), 0.5 + torch.rand(500, generator=g)
    lb, wb = 1 + 4 * torch.rand(500, generator=g), 0.5 + torch.rand(500, generator=g)
    ab = boxes_overlap(ca, ya, la, wa, cb, yb, lb, wb)
    ba = boxes_overlap(cb, yb, lb, wb, ca, ya, la, wa)
    assert torch.equal(ab, ba)
    # One box against a (4, 5) grid of boxes.
    grid = boxes_overlap(
        torch.zeros(2), torch.tensor(0.3), torch.tensor(4.0), torch.tensor(2.0),
        torch.rand(4, 5, 2) * 10, torch.zeros(4, 5), torch.full((4, 5), 4.0), torch.full((4, 5), 2.0),
    )
    assert grid.shape == (4, 5) and grid.dtype == torch.bool


def test_boxes_overlap_simple_cases():
    z = torch.tensor(0.0)
    L, W = torch.tensor(4.0), torch.tensor(2.0)
    # Side by side with a 1 cm gap: separated; with 1 cm overlap: overlapping.
    assert not boxes_overlap(torch.zeros(2), z, L, W, torch.tensor([0.0, 2.01]), z, L, W)
    assert boxes_overlap(torch.zeros(2), z, L, W, torch.tensor([0.0, 1.99]), z, L, W)
    # A 45-degree box whose corner pokes into the other's face only along the diagonal axis.
    d = 2.0 + math.sqrt(2.0) - 0.05
    assert boxes_overlap(torch.zeros(2), z, L, W, torch.tensor([d, 0.0]), torch.tensor(math.pi / 4), W, W)
    # Bounding circles overlap, but the box axes separate them.
    stick = (torch.tensor([2.5, 1.6]), torch.tensor(-math.pi / 4), L, torch.tensor(0.2))
    assert not boxes_overlap(torch.zeros(2), z, L, W, *stick)


# ----------------------------------------------------------------------------- ego_collisions


@pytest.mark.parametrize("ego_index", [0, 3])
def test_ego_collisions_equal_sat_on_all_pairs(ego_index):
    rng = np.random.default_rng(3)
    pos, yaw, length, width, valid = _random_scene(rng, B=8, N=40, extent=25.0)
    valid[1, ego_index] = False  # one batch element with an invalid ego
    hits = ego_collisions(pos, yaw, length, width, valid, ego_index=ego_index)
    e = slice(ego_index, ego_index + 1)
    ref = boxes_overlap(pos[:, e], yaw[:, e], length[:, e], width[:, e], pos, yaw, length, width)
    ref &= valid & valid[:, e]
    ref[:, ego_index] = False
    assert hits.shape == (8, 40) and hits.dtype == torch.bool
    assert torch.equal(hits, ref)
    assert ref.sum() > 5 and not hits[1].any()


def test_ego_collisions_rejects_bad_input():
    pos, yaw = torch.zeros(2, 3, 2), torch.zeros(2, 3)
    valid = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(CraftError):
        ego_collisions(pos, yaw, yaw, yaw, valid, ego_index=3)
    with pytest.raises(CraftError):
        ego_collisions(pos, yaw[:, :2], yaw, yaw, valid)


# ----------------------------------------------------------------------------- candidate_collisions


def _candidate_case(rng, B=3, G=9, H=6, N=7, static=False):
    ego_pos = _t(rng.uniform(0, 15, (B, G, H, 2)))
    ego_yaw = _t(rng.uniform(-math.pi, math.pi, (B, G, H)))
    el, ew = _t(rng.uniform(4, 5, B)), _t(rng.uniform(1.7, 2.1, B))
    shape = (B, N) if static else (B, H, N)
    pos = rng.uniform(0, 15, shape + (2,))
    valid = rng.random(shape) < 0.85
    pos = _t(np.where(valid[..., None], pos, np.nan))
    yaw = _t(rng.uniform(-math.pi, math.pi, shape))
    length, width = _t(rng.uniform(3, 6, (B, N))), _t(rng.uniform(1.5, 2.5, (B, N)))
    return ego_pos, ego_yaw, el, ew, pos, yaw, length, width, torch.as_tensor(valid)


@pytest.mark.parametrize("static", [False, True])
def test_candidate_collisions_equal_naive_reference(static):
    rng = np.random.default_rng(4 + static)
    case = _candidate_case(rng, static=static)
    hits = candidate_collisions(*case)
    ref = _naive_candidates(*case)
    assert hits.shape == (3, 9, 6, 7) and hits.dtype == torch.bool
    assert torch.equal(hits, ref)
    assert 0 < ref.sum() < ref.numel()


def test_candidate_collisions_chunked_path_matches(monkeypatch):
    import craft.world.collision as collision

    rng = np.random.default_rng(6)
    case = _candidate_case(rng, B=2, G=16, H=5, N=6)
    monkeypatch.setattr(collision, "_CHUNK_PAIRS", 40)  # force many small chunks
    assert torch.equal(candidate_collisions(*case), _naive_candidates(*case))


def test_candidate_collisions_no_hits_and_bad_shapes():
    rng = np.random.default_rng(7)
    ego_pos, ego_yaw, el, ew, pos, yaw, length, width, valid = _candidate_case(rng)
    far = candidate_collisions(ego_pos, ego_yaw, el, ew, pos + 1000.0, yaw, length, width, valid)
    assert not far.any()
    with pytest.raises(CraftError):
        candidate_collisions(ego_pos, ego_yaw, el, ew, pos[:, :2], yaw, length, width, valid)
    with pytest.raises(CraftError):
        candidate_collisions(ego_pos, ego_yaw[..., :2], el, ew, pos, yaw, length, width, valid)


def test_first_collision_indices():
    rng = np.random.default_rng(8)
    hits = torch.as_tensor(rng.random((3, 5, 6, 4)) < 0.04)
    hits[0, 0] = False
    hits[0, 1] = False
    hits[0, 1, 2, 3] = True
    hits[0, 1, 4, 0] = True
    step, agent = first_collision(hits)
    assert step.shape == agent.shape == (3, 5) and step.dtype == torch.long
    assert (step[0, 0], agent[0, 0]) == (6, -1)
    assert (step[0, 1], agent[0, 1]) == (2, 3)
    for b in range(3):
        for g in range(5):
            steps = [h for h in range(6) if hits[b, g, h].any()]
            if steps:
                assert step[b, g] == steps[0]
                assert agent[b, g] == int(np.flatnonzero(hits[b, g, steps[0]].numpy())[0])
            else:
                assert step[b, g] == 6 and agent[b, g] == -1


def test_first_collision_on_candidate_hits():
    rng = np.random.default_rng(9)
    case = _candidate_case(rng)
    step, agent = first_collision(candidate_collisions(*case))
    ref = _naive_candidates(*case)
    collided = step < 6
    assert collided.any()
    b, g = collided.nonzero(as_tuple=True)
    assert ref[b, g, step[b, g], agent[b, g]].all()


# ----------------------------------------------------------------------------- pairwise_collisions


@pytest.mark.parametrize(
    "N, extent, capacity, trucks",
    [
        (60, 1000.0, 16, False),  # very sparse: no collisions at all
        (200, 250.0, 16, False),  # sparse: a few collisions
        (80, 60.0, 16, False),  # medium density
        (120, 80.0, 16, True),  # long trucks (bigger cells)
        (150, 25.0, 4, False),  # crowded: cells exceed capacity -> brute-force fallback
    ],
)
def test_pairwise_collisions_equal_brute_force(N, extent, capacity, trucks):
    rng = np.random.default_rng(N)
    scene = _random_scene(rng, B=5, N=N, extent=extent, long_trucks=trucks)
    got = pairwise_collisions(*scene, capacity=capacity)
    ref = brute_force_pairwise(*scene)
    assert all(t.dtype == torch.long for t in got)
    assert _pairs(got) == _pairs(ref)
    i, j, _ = got
    assert bool((i < j).all())


def test_pairwise_collisions_mixed_fallback_and_cell_size():
    rng = np.random.default_rng(11)
    dense = _random_scene(rng, B=2, N=100, extent=20.0)
    sparse = _random_scene(rng, B=2, N=100, extent=150.0)
    scene = [torch.cat([a, b]) for a, b in zip(dense, sparse)]  # batches 0-1 fall back, 2-3 hash
    ref = _pairs(brute_force_pairwise(*scene))
    assert len(ref) > 10
    assert _pairs(pairwise_collisions(*scene, capacity=3)) == ref
    assert _pairs(pairwise_collisions(*scene, capacity=1)) == ref  # everything falls back
    assert _pairs(pairwise_collisions(*scene, cell_size=0.5)) == ref  # raised to the largest diagonal
    assert _pairs(pairwise_collisions(*scene, cell_size=40.0, capacity=200)) == ref


def test_brute_force_pairwise_matches_shapely():
    rng = np.random.default_rng(12)
    pos, yaw, length, width, valid = _random_scene(rng, B=2, N=25, extent=18.0)
    got = _pairs(brute_force_pairwise(pos, yaw, length, width, valid))
    ref = []
    for b in range(2):
        polys = [_shapely_box(*pos[b, k].tolist(), yaw[b, k].item(), length[b, k].item(), width[b, k].item())
                 if valid[b, k] else None for k in range(25)]
        for i in range(25):
            for j in range(i + 1, 25):
                if polys[i] is not None and polys[j] is not None and polys[i].intersection(polys[j]).area > 1e-6:
                    ref.append([b, i, j])
    assert got == ref and len(ref) > 3


def test_pairwise_collisions_edge_cases_and_errors():
    def scene(B, N, valid):
        return torch.zeros(B, N, 2), torch.zeros(B, N), torch.ones(B, N), torch.ones(B, N), torch.full((B, N), valid)

    assert all(t.numel() == 0 for t in pairwise_collisions(*scene(3, 1, True)))
    assert all(t.numel() == 0 for t in pairwise_collisions(*scene(2, 4, False)))
    stacked = scene(1, 3, True)
    assert _pairs(pairwise_collisions(*stacked)) == [[0, 0, 1], [0, 0, 2], [0, 1, 2]]
    with pytest.raises(CraftError):
        pairwise_collisions(*stacked, capacity=0)
    with pytest.raises(CraftError):
        pairwise_collisions(*stacked, cell_size=-1.0)
    with pytest.raises(CraftError):
        pairwise_collisions(torch.zeros(1, 3), *stacked[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(13)
    scene = _random_scene(rng, B=3, N=90, extent=50.0)
    cuda = [t.cuda() for t in scene]
    assert _pairs(pairwise_collisions(*cuda)) == _pairs(pairwise_collisions(*scene))
    assert torch.equal(ego_collisions(*cuda).cpu(), ego_collisions(*scene))
    case = _candidate_case(rng)
    assert torch.equal(candidate_collisions(*[t.cuda() for t in case]).cpu(), candidate_collisions(*case))
