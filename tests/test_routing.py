"""route_top_p: top-p selection with renormalised weights, against hand-worked cases and a loop oracle."""

import pytest
import torch

from dlp_lora.router import check_max_loras, check_top_p, route_top_p


def _route(rows, top_p, max_loras=None):
    return route_top_p(torch.tensor(rows, dtype=torch.float32), top_p, max_loras)


def test_top_p_keeps_smallest_prefix_and_renormalises():
    ids, w = _route([[0.5, 0.3, 0.2]], 0.6)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375]]))


def test_order_follows_probability_not_index():
    ids, w = _route([[0.1, 0.2, 0.7]], 0.75)
    assert ids.tolist() == [[2, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.7 / 0.9, 0.2 / 0.9]]))


def test_exact_mass_hit_keeps_prefix_only():
    # 0.5 + 0.3 reaches 0.8 exactly in real arithmetic; float32 rounding must not add 0.2
    ids, _ = _route([[0.5, 0.3, 0.2]], 0.8)
    assert ids.tolist() == [[0, 1]]
    ids, _ = _route([[0.25, 0.25, 0.25, 0.25]], 0.75)
    assert ids.tolist() == [[0, 1, 2]]


def test_always_at_least_one():
    ids, w = _route([[0.9, 0.1]], 1e-9)
    assert ids.tolist() == [[0]] and w.tolist() == [[1.0]]


def test_top_p_one_keeps_all_nonzero_mass():
    ids, w = _route([[0.6, 0.0, 0.4 - 1e-9, 1e-9]], 1.0)
    assert ids.tolist() == [[0, 2, 3]]
    torch.testing.assert_close(w.sum(1), torch.ones(1))
    assert w[0, 2] > 0


def test_max_loras_caps_after_top_p():
    ids, w = _route([[0.4, 0.35, 0.25]], 1.0, max_loras=2)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.4 / 0.75, 0.35 / 0.75]]))
    ids, w = _route([[0.4, 0.35, 0.25]], 0.3, max_loras=2)  # top-p already keeps fewer
    assert ids.tolist() == [[0]] and w.tolist() == [[1.0]]


def test_batch_rows_padded_to_largest_k():
    ids, w = _route([[0.9, 0.05, 0.05], [0.3, 0.3, 0.4], [0.1, 0.8, 0.1]], 0.7)
    assert ids.tolist() == [[0, -1], [2, 0], [1, -1]]
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0], [4 / 7, 3 / 7], [1.0, 0.0]]))


def _loop_oracle(p, top_p, max_loras):
    """One row at a time, in float64, the selection rule written out plainly."""
    out = []
    for row in p.double().tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])
        kept, mass = [], 0.0
        for i in order:
            if kept and (mass >= top_p * sum(row) or row[i] == 0):
                break
            kept.append(i)
            mass += row[i]
        kept = kept[:max_loras] if max_loras else kept
        z = sum(row[i] for i in kept)
        out.append({i: row[i] / z for i in kept})
    return out


@pytest.mark.parametrize("top_p, max_loras", [(0.3, None), (0.6, None), (0.9, 2), (1.0, None), (0.999, 3)])
def test_matches_loop_oracle_on_random_softmax(top_p, max_loras):
    probs = torch.softmax(torch.randn(64, 7) * 2.0, dim=1)
    ids, w = route_top_p(probs, top_p, max_loras)
    for b, expect in enumerate(_loop_oracle(probs, top_p, max_loras)):
        got = {int(i): float(x) for i, x in zip(ids[b], w[b], strict=True) if int(i) >= 0}
        assert got.keys() == expect.keys()
        for i in expect:
            assert got[i] == pytest.approx(expect[i], rel=1e-6)
        assert all(float(x) == 0.0 for i, x in zip(ids[b], w[b], strict=True) if int(i) < 0)


def test_empty_batch():
    ids, w = route_top_p(torch.empty(0, 4), 0.5)
    assert ids.shape == (0, 1) and w.shape == (0, 1)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "0.5", True, None])
def test_bad_top_p(bad):
    with pytest.raises(ValueError, match="top_p"):
        route_top_p(torch.tensor([[0.5, 0.5]]), bad)
    with pytest.raises(ValueError, match="top_p"):
        check_top_p(bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_max_loras(bad):
    with pytest.raises(ValueError, match="max_loras"):
        route_top_p(torch.tensor([[0.5, 0.5]]), 0.5, bad)
    with pytest.raises(ValueError, match="max_loras"):
        check_max_loras(bad)


BAD_PROBS = [[0.5, 0.5], [[1, 0]], [[0.5, -0.1]], [[0.0, 0.0]], [[float("nan"), 1.0]]]


@pytest.mark.parametrize("bad", [torch.tensor(x) for x in BAD_PROBS])
def test_bad_probs(bad):
    with pytest.raises(ValueError, match="probs"):
        route_top_p(bad, 0.5)
