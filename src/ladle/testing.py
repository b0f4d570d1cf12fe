"""Helpers for unit-testing merges: a state-dict assertion and hypothesis strategies.

:func:`assert_state_dicts_close` needs only ladle. The strategies :func:`state_dicts` and
:func:`model_families` need `hypothesis <https://hypothesis.readthedocs.io>`_
(``pip install hypothesis``, or ``pip install ladle[dev]``); it is imported when a strategy
is built, so ``import ladle.testing`` works without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import StateDict, StateDictLike, load

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "BUFFER_KEY",
    "FLOAT_DTYPES",
    "KEY_NAMES",
    "assert_state_dicts_close",
    "default_tolerances",
    "model_families",
    "state_dicts",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The floating dtypes the strategies draw from by default."""

KEY_NAMES = (
    "embed.weight",
    "layers.0.weight",
    "layers.0.bias",
    "layers.1.weight",
    "norm.weight",
    "head.weight",
    "logit_scale",
)
"""The key names the strategies draw from by default."""

BUFFER_KEY = "bn.num_batches_tracked"
"""The integer (int64, 0-d) buffer the strategies add with ``buffers=True``."""

_TOLERANCES = {  # those of torch.testing.assert_close
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}

_WORST = 5  # keys with differing values shown in a failure message


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype`` as :func:`torch.testing.assert_close` picks them.

    float16 (1e-3, 1e-5), bfloat16 (1.6e-2, 1e-5), float32 (1.3e-6, 1e-5), float64 (1e-7, 1e-7);
    other dtypes (integers, bool) must match exactly: (0, 0).

    Example:
        >>> default_tolerances(torch.bfloat16)
        (0.016, 1e-05)
    """
    return _TOLERANCES.get(dtype, (0.0, 0.0))


@dataclass(frozen=True)
class _Mismatch:
    key: str
    count: int
    numel: int
    max_abs: float
    max_rel: float
    severity: float  # the largest |actual − expected| / (atol + rtol·|expected|)
    index: tuple[int, ...]
    actual: float
    expected: float
    rtol: float
    atol: float

    def describe(self) -> str:
        return (
            f"  {self.key!r}: {self.count} of {self.numel} elements differ; max abs error "
            f"{self.max_abs:.6g}, max rel error {self.max_rel:.6g} (rtol={self.rtol:g}, "
            f"atol={self.atol:g}); worst at index {self.index}: actual {self.actual:.9g}, "
            f"expected {self.expected:.9g}"
        )


def _compare(
    key: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float,
    atol: float,
    equal_nan: bool,
) -> _Mismatch | None:
    a = actual.detach().to("cpu")
    e = expected.detach().to("cpu")
    exact = rtol == 0 and atol == 0 and not (a.is_floating_point() or e.is_floating_point())
    a64, e64 = a.to(torch.float64), e.to(torch.float64)
    diff = (a64 - e64).abs()
    if exact:  # integers beyond 2**53 are not exact in float64
        close = a.eq(e) if a.dtype == e.dtype else a64.eq(e64)
    else:
        close = a64.eq(e64) | (diff <= atol + rtol * e64.abs())
        if equal_nan:
            close |= a64.isnan() & e64.isnan()
    bad = ~close
    if not bool(bad.any()):
        return None
    ratio = diff / (atol + rtol * e64.abs())  # inf where the tolerance is 0, NaN for NaN
    ratio = torch.where(bad, ratio.nan_to_num(nan=math.inf), -1.0)
    worst = int(torch.argmax(ratio.reshape(-1)))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
    rel = diff[bad] / e64.abs()[bad]
    return _Mismatch(
        key=key,
        count=int(bad.sum()),
        numel=a.numel(),
        max_abs=float(diff[bad].max()),
        max_rel=float(rel.max()),
        severity=float(ratio.reshape(-1)[worst]),
        index=index,
        actual=float(a64.reshape(-1)[worst]),
        expected=float(e64.reshape(-1)[worst]),
        rtol=rtol,
        atol=atol,
    )


def _few(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(key) for key in keys[:5])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > 5 else ''})"


def _as_state_dict(value: Mapping[str, torch.Tensor] | StateDictLike) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else load(value)


def assert_state_dicts_close(
    actual: Mapping[str, torch.Tensor] | StateDictLike,
    expected: Mapping[str, torch.Tensor] | StateDictLike,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    equal_nan: bool = False,
) -> None:
    """Assert that two state dicts have the same keys, dtypes, shapes and close values.

    Values are close where ``|actual − expected| ≤ atol + rtol·|expected|`` (computed in
    float64); inf must match inf of the same sign, and NaN matches NaN only with
    ``equal_nan``. On failure the :class:`AssertionError` lists every problem at once: missing
    and extra keys, keys whose dtype or shape differ, and the (up to) five keys whose values
    differ most, each with its count of differing elements, max abs and max rel error, and
    the worst element.

    Args:
        actual: the state dict under test: a mapping, or anything :func:`ladle.load` reads
            (a path written with ``out=``, a module, a checkpoint).
        expected: the reference, likewise.
        rtol: relative tolerance; default per dtype as :func:`torch.testing.assert_close`
            (see :func:`default_tolerances`; where the two dtypes differ, the looser).
        atol: absolute tolerance; default likewise.
        equal_nan: treat NaN in both at the same place as equal.

    Raises:
        AssertionError: the state dicts differ; the message says where and by how much.

    Example:
        >>> import torch
        >>> assert_state_dicts_close({"w": torch.tensor([1.0, 2.0])},
        ...                          {"w": torch.tensor([1.0, 2.0 + 1e-7])})
        >>> assert_state_dicts_close({"w": torch.tensor([1.0, 2.5])},
        ...                          {"w": torch.tensor([1.0, 2.0]), "b": torch.zeros(2)})
        Traceback (most recent call last):
        ...
        AssertionError: state dicts are not close:
          missing keys (in expected, not in actual): 1 ('b')
          values differ in 1 key, worst first:
          'w': 1 of 2 elements differ; max abs error 0.5, max rel error 0.25 (rtol=1.3e-06, atol=1e-05); worst at index (1,): actual 2.5, expected 2
    """  # noqa: E501
    if rtol is not None and not (rtol >= 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol: expected a finite number ≥ 0, found {rtol}")
    if atol is not None and not (atol >= 0 and math.isfinite(atol)):
        raise ValueError(f"atol: expected a finite number ≥ 0, found {atol}")
    got, want = _as_state_dict(actual), _as_state_dict(expected)
    problems = []
    missing = [key for key in want if key not in got]
    extra = [key for key in got if key not in want]
    if missing:
        problems.append(f"  missing keys (in expected, not in actual): {_few(missing)}")
    if extra:
        problems.append(f"  extra keys (in actual, not in expected): {_few(extra)}")
    mismatches = []
    for key in want:
        if key not in got:
            continue
        a, e = got[key], want[key]
        if tuple(a.shape) != tuple(e.shape):
            problems.append(f"  {key!r}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
            continue
        if a.dtype != e.dtype:
            problems.append(f"  {key!r}: dtype {a.dtype}, expected {e.dtype}")
        (r_a, t_a), (r_e, t_e) = default_tolerances(a.dtype), default_tolerances(e.dtype)
        key_rtol = max(r_a, r_e) if rtol is None else rtol
        key_atol = max(t_a, t_e) if atol is None else atol
        mismatch = _compare(key, a, e, key_rtol, key_atol, equal_nan)
        if mismatch is not None:
            mismatches.append(mismatch)
    if not problems and not mismatches:
        return
    if mismatches:
        mismatches.sort(key=lambda m: -m.severity)
        plural = "key" if len(mismatches) == 1 else "keys"
        problems.append(f"  values differ in {len(mismatches)} {plural}, worst first:")
        problems.extend(m.describe() for m in mismatches[:_WORST])
        if len(mismatches) > _WORST:
            problems.append(f"  ... and {len(mismatches) - _WORST} more keys")
    raise AssertionError("\n".join(["state dicts are not close:", *problems]))


def _hypothesis() -> Any:
    try:
        from hypothesis import strategies
    except ImportError as err:  # pragma: no cover - hypothesis is a test dependency
        raise ImportError(
            "ladle.testing strategies need hypothesis: pip install hypothesis"
        ) from err
    return strategies


def _layouts(
    keys: Sequence[str] | None,
    shapes: Mapping[str, Sequence[int]] | None,
    dtypes: Sequence[torch.dtype],
    max_keys: int,
    max_side: int,
) -> SearchStrategy[tuple[dict[str, tuple[int, ...]], torch.dtype]]:
    """Keys with their shapes, and one floating dtype; checked eagerly."""
    st = _hypothesis()
    from hypothesis.extra.numpy import array_shapes

    dtypes = tuple(dtypes)
    if not dtypes or not all(d.is_floating_point for d in dtypes):
        raise ValueError(f"dtypes: expected one or more floating dtypes, found {dtypes}")
    if max_keys < 1:
        raise ValueError(f"max_keys: expected at least 1, found {max_keys}")
    if max_side < 1:
        raise ValueError(f"max_side: expected at least 1, found {max_side}")
    dtype_strategy = st.sampled_from(dtypes)
    if shapes is not None:
        fixed = {str(k): tuple(int(s) for s in shape) for k, shape in shapes.items()}
        return st.tuples(st.just(fixed), dtype_strategy)
    pool = KEY_NAMES if keys is None else tuple(keys)
    if not pool or len(set(pool)) != len(pool) or BUFFER_KEY in pool:
        raise ValueError(f"keys: expected distinct names other than {BUFFER_KEY!r}, found {pool}")
    names = (
        st.lists(st.sampled_from(pool), min_size=1, max_size=min(max_keys, len(pool)), unique=True)
        if keys is None
        else st.just(list(pool))
    )
    # Mostly vectors and matrices; a 0-d tensor (a scalar parameter) now and then.
    one_shape = st.one_of(
        array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=max_side), st.just(())
    )

    @st.composite
    def layout(draw: Any) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
        return {name: draw(one_shape) for name in draw(names)}, draw(dtype_strategy)

    return layout()


def _float32_arrays(shape: tuple[int, ...], bound: float) -> SearchStrategy[torch.Tensor]:
    st = _hypothesis()
    import numpy as np
    from hypothesis.extra.numpy import arrays

    elements = st.floats(-bound, bound, width=32)
    return arrays(np.float32, shape, elements=elements, fill=st.nothing()).map(
        lambda array: torch.from_numpy(np.array(array, dtype=np.float32))
    )


def _check_bound(bound: float) -> float:
    bound = float(bound)
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"bound: expected a finite number > 0, found {bound}")
    return bound


def state_dicts(
    *,
    keys: Sequence[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    buffers: bool = True,
    max_keys: int = 4,
    max_side: int = 4,
    bound: float = 10.0,
) -> SearchStrategy[StateDict]:
    """A hypothesis strategy for small state dicts.

    Each draw has one floating dtype for all its tensors (drawn from ``dtypes``), finite values
    in ``[−bound, bound]`` (rounded to that dtype), and, with ``buffers``, an int64 0-d
    :data:`BUFFER_KEY` (``bn.num_batches_tracked``).

    Args:
        keys: the key names, all of them in every draw; default 1 to ``max_keys`` names drawn
            from :data:`KEY_NAMES`.
        shapes: fixed keys and shapes (overrides ``keys``); default shapes of 1 or 2
            dimensions of 1 to ``max_side`` entries each, or now and then 0-d.
        dtypes: floating dtypes to draw from; default float32, bfloat16, float16.
        buffers: add the integer buffer.
        max_keys: most keys drawn when ``keys`` and ``shapes`` are not given.
        max_side: longest dimension of a drawn shape.
        bound: largest magnitude of a value.

    Returns:
        A strategy of ``dict[str, torch.Tensor]``.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5)
        ... @given(state_dicts(shapes={"w": (2, 3)}, dtypes=[torch.float16]))
        ... def check(state_dict):
        ...     assert state_dict["w"].shape == (2, 3) and state_dict["w"].dtype == torch.float16
        ...     assert state_dict["bn.num_batches_tracked"].dtype == torch.int64
        >>> check()
    """
    st = _hypothesis()
    layouts = _layouts(keys, shapes, dtypes, max_keys, max_side)
    bound = _check_bound(bound)

    @st.composite
    def draw_state_dict(draw: Any) -> StateDict:
        layout, dtype = draw(layouts)
        state = {
            key: draw(_float32_arrays(shape, bound)).to(dtype) for key, shape in layout.items()
        }
        if buffers:
            state[BUFFER_KEY] = torch.tensor(draw(st.integers(0, 10**6)), dtype=torch.int64)
        return state

    return draw_state_dict()


def model_families(
    n: int | SearchStrategy[int] = 2,
    *,
    keys: Sequence[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    buffers: bool = True,
    max_keys: int = 4,
    max_side: int = 4,
    bound: float = 10.0,
) -> SearchStrategy[tuple[StateDict, list[StateDict]]]:
    """A hypothesis strategy for a base and ``n`` fine-tunes of it: ``(base, [models])``.

    All members share keys, shapes and one floating dtype (drawn from ``dtypes``). Each
    fine-tune is the base plus a drawn task vector with entries in ``[−bound, bound]``,
    computed in float32 and rounded to the dtype, so shrinking moves towards fine-tunes equal
    to the base. With ``buffers``, every member has its own int64 :data:`BUFFER_KEY` value.
    The other arguments are those of :func:`state_dicts`.

    Args:
        n: the number of fine-tunes, or a strategy for it (e.g. ``st.integers(2, 4)``).
        keys: as :func:`state_dicts`.
        shapes: as :func:`state_dicts`.
        dtypes: as :func:`state_dicts`.
        buffers: as :func:`state_dicts`.
        max_keys: as :func:`state_dicts`.
        max_side: as :func:`state_dicts`.
        bound: largest magnitude of a base value and of a task-vector entry.

    Returns:
        A strategy of ``(base, [fine-tune, ...])``.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5)
        ... @given(model_families(n=3))
        ... def check(family):
        ...     base, models = family
        ...     assert len(models) == 3
        ...     for model in models:
        ...         assert model.keys() == base.keys()
        ...         assert all(model[k].shape == base[k].shape for k in base)
        >>> check()
    """
    st = _hypothesis()
    if isinstance(n, int):
        if n < 1:
            raise ValueError(f"n: expected at least 1 fine-tune, found {n}")
        counts = st.just(n)
    else:
        counts = n
    layouts = _layouts(keys, shapes, dtypes, max_keys, max_side)
    bound = _check_bound(bound)

    def draw_buffer(draw: Any, state: StateDict) -> None:
        if buffers:
            state[BUFFER_KEY] = torch.tensor(draw(st.integers(0, 10**6)), dtype=torch.int64)

    @st.composite
    def draw_family(draw: Any) -> tuple[StateDict, list[StateDict]]:
        layout, dtype = draw(layouts)
        count = draw(counts)
        base = {key: draw(_float32_arrays(shape, bound)).to(dtype) for key, shape in layout.items()}
        models = []
        for _ in range(count):
            model = {
                key: (base[key].float() + draw(_float32_arrays(shape, bound))).to(dtype)
                for key, shape in layout.items()
            }
            draw_buffer(draw, model)
            models.append(model)
        draw_buffer(draw, base)
        return base, models

    return draw_family()
