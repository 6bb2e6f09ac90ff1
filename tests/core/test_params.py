"""Parameter flattening for every supported structure."""

from __future__ import annotations

import pytest
import torch

from curvlab.params import ParamSpec


@pytest.mark.parametrize(
    "params",
    [
        torch.randn(3, 2),
        (torch.randn(2), torch.randn(3, 1)),
        [torch.randn(2), torch.randn(4)],
        {"a": torch.randn(2, 2), "b": torch.randn(1)},
    ],
)
def test_roundtrip(params):
    spec = ParamSpec(params)
    x = spec.flatten()
    assert x.shape == (spec.size,)
    back = spec.unflatten(x)
    assert type(back) is type(params)
    leaves = [back] if isinstance(back, torch.Tensor) else list(back.values() if isinstance(back, dict) else back)
    orig = (
        [params] if isinstance(params, torch.Tensor) else list(params.values() if isinstance(params, dict) else params)
    )
    for a, b in zip(leaves, orig):
        assert torch.equal(a, b)
    # views: gradients flow back into the flat vector
    x.requires_grad_(True)
    s = sum(
        t.sum()
        for t in (
            [spec.unflatten(x)]
            if isinstance(params, torch.Tensor)
            else (spec.unflatten(x).values() if isinstance(params, dict) else spec.unflatten(x))
        )
    )
    s.backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_module_roundtrip_does_not_touch_user_module():
    net = torch.nn.Linear(3, 2)
    spec = ParamSpec(net)
    assert spec.keys == ["weight", "bias"] and spec.size == 8
    new = spec.to_user(torch.zeros(8))
    assert isinstance(new, torch.nn.Linear) and new is not net
    assert torch.count_nonzero(new.weight) == 0 and torch.count_nonzero(net.weight) > 0


def test_dtype_device_kept():
    spec = ParamSpec({"w": torch.zeros(2, dtype=torch.float64)})
    assert spec.flatten().dtype == torch.float64 and spec.dtype == torch.float64


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="params must be"):
        ParamSpec("abc")
    with pytest.raises(TypeError, match=r"params\[1\].*floating"):
        ParamSpec((torch.zeros(2), torch.zeros(2, dtype=torch.int64)))
    with pytest.raises(TypeError, match=r"params\['b'\] must be a tensor"):
        ParamSpec({"a": torch.zeros(1), "b": 3.0})
    with pytest.raises(ValueError, match="dtype"):
        ParamSpec([torch.zeros(1), torch.zeros(1, dtype=torch.float64)])
    with pytest.raises(ValueError, match="no tensor"):
        ParamSpec([])
    with pytest.raises(ValueError, match="shape"):
        ParamSpec(torch.zeros(3)).unflatten(torch.zeros(4))
