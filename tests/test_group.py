"""Group laws of B_d (property-tested) and validation of SignedPermutation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_gauge import Gauge, GaugeError, SignedPermutation


@st.composite
def elements(draw, d=None):
    d = d or draw(st.integers(1, 12))
    perm = draw(st.permutations(list(range(d))))
    sign = draw(st.lists(st.sampled_from([-1, 1]), min_size=d, max_size=d))
    return SignedPermutation(perm, sign)


@st.composite
def triples(draw):
    d = draw(st.integers(1, 12))
    return draw(elements(d)), draw(elements(d)), draw(elements(d))


@settings(max_examples=200, deadline=None)
@given(triples())
def test_associativity(t):
    a, b, c = t
    assert (a @ b) @ c == a @ (b @ c)


@settings(max_examples=200, deadline=None)
@given(elements())
def test_inverse_and_identity(a):
    e = SignedPermutation.identity(a.size)
    assert a @ a.inverse() == e
    assert a.inverse() @ a == e
    assert a @ e == a and e @ a == a
    assert a.inverse().inverse() == a


@settings(max_examples=200, deadline=None)
@given(triples())
def test_composition_is_function_composition(t):
    a, b, _ = t
    x = torch.randn(3, a.size, dtype=torch.float64)
    assert torch.equal((b @ a)(x), b(a(x)))


@settings(max_examples=100, deadline=None)
@given(elements())
def test_action_matches_dense_matrix(a):
    x = torch.randn(a.size, dtype=torch.float64)
    assert torch.equal(a(x), a.to_dense() @ x)
    assert torch.equal(a.inverse().to_dense(), a.to_dense().T)


def test_action_convention_and_any_dim():
    g = SignedPermutation([2, 0, 1], [1, -1, 1])
    x = torch.tensor([10.0, 20.0, 30.0])
    assert g(x).tolist() == [30.0, -10.0, 20.0]      # y[j] = sign[j] * x[perm[j]]
    m = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(g.apply(m, dim=0), torch.stack([m[2], -m[0], m[1]]))
    assert not torch.equal(m, g.apply(m, dim=0))       # input untouched, output new
    assert torch.equal(m, torch.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_bit_exact_in_every_dtype(dtype):
    g = SignedPermutation.random(257, 3)
    x = (torch.randn(5, 257) * 1e3).to(dtype)
    x[0, :4] = torch.tensor([0.0, -0.0, float("inf"), 1e-30]).to(dtype)
    y = g.inverse()(g(x))
    assert torch.equal(y.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       x.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_random_is_reproducible_and_positive_fraction():
    a = SignedPermutation.random(100, torch.Generator().manual_seed(5))
    b = SignedPermutation.random(100, torch.Generator().manual_seed(5))
    assert a == b
    c = SignedPermutation.random(100, 1, positive_fraction=0.3)
    assert c.positive_fraction == pytest.approx(0.3)
    assert SignedPermutation.random(10, 0, signed=False).is_permutation


def test_map_indices_follows_coordinates():
    g = SignedPermutation.random(50, 2)
    x = torch.zeros(50)
    x[[3, 17]] = torch.tensor([1.0, -2.0])
    y = g(x)
    new = g.map_indices([3, 17])
    assert torch.equal(y[new].abs(), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("perm,sign,msg", [
    ([0, 0, 1], None, "not a permutation"),
    ([0, 1, 3], None, "not a permutation"),
    ([0, 1, 2], [1, 0, 1], r"exactly \+1 or -1; sign\[1\] = 0"),
    ([0, 1, 2], [1, -1], "same length"),
    ([[0, 1]], None, "one-dimensional"),
    ([], None, "at least one"),
    ([0.5, 1.0], None, "integers"),
])
def test_validation_refuses(perm, sign, msg):
    with pytest.raises(GaugeError, match=msg):
        SignedPermutation(perm, sign)


def test_duplicate_indices_named():
    with pytest.raises(GaugeError, match=r"duplicated indices include \[2\]"):
        SignedPermutation([2, 2, 0])


@pytest.mark.parametrize("perm,bad", [([0, 1, 3], "perm[2] = 3"), ([0, 1, 2, 3, 9], "perm[4] = 9"),
                                      ([0, -1, 1], "perm[1] = -1")])
def test_out_of_range_index_named_not_called_duplicated(perm, bad):
    """An index outside range(d) is reported as out of range (it used to read 'duplicated indices include [d-1]')."""
    with pytest.raises(GaugeError, match="out of range") as e:
        SignedPermutation(perm)
    assert bad in str(e.value) and "duplicat" not in str(e.value)


def test_accepts_numpy_and_lists():
    assert SignedPermutation(np.array([1, 0]), np.array([-1, 1])) == SignedPermutation([1, 0], [-1, 1])


def test_gauge_group_law_and_spaces():
    a = Gauge(residual=SignedPermutation.random(8, 0), mlp={0: SignedPermutation.random(6, 1)})
    b = Gauge(residual=SignedPermutation.random(8, 2), attn={1: SignedPermutation.random(4, 3, signed=False)})
    ab = b @ a
    assert ab.residual == b.residual @ a.residual
    assert ab.mlp[0] == a.mlp[0] and ab.attn[1] == b.attn[1]
    assert (ab @ ab.inverse()) == Gauge(residual=SignedPermutation.identity(8))
    x = torch.randn(8)
    assert torch.equal(ab.transport(x), b.transport(a.transport(x)))


@pytest.mark.parametrize("name", ["mlp.01", "attn.+1", "mlp. 3", "mlp.3 ", " residual", "residual\n", "mlp.-1",
                                  "attn.1_0", "mlp.\u0663", "mlp.", "residual.0", 3])
def test_gauge_refuses_non_canonical_space_names(name):
    """'mlp.01' used to be accepted and then matched no layer (acting as the identity)."""
    with pytest.raises(GaugeError, match="unknown gauge space"):
        Gauge(spaces={name: SignedPermutation.identity(3)})


def test_gauge_refuses_negative_layer_keys():
    with pytest.raises(GaugeError, match="unknown gauge space 'mlp.-1'"):
        Gauge(mlp={-1: SignedPermutation.identity(3)})


def test_gauge_refuses_bad_spaces():
    with pytest.raises(GaugeError, match="unknown gauge space"):
        Gauge(spaces={"mlp": SignedPermutation.identity(3)})
    with pytest.raises(GaugeError, match="at least one space"):
        Gauge()
    with pytest.raises(GaugeError, match="SignedPermutation"):
        Gauge(residual=[0, 1])


def test_gauge_transport_vectors_width_checked():
    g = Gauge(residual=SignedPermutation.random(8, 0))
    v = torch.randn(3, 8)
    out = g.transport(v)
    assert torch.equal(out, g.residual(v)) and out.data_ptr() != v.data_ptr()
    with pytest.raises(GaugeError, match="width mismatch"):
        g.transport(torch.randn(7))
