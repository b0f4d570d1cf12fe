"""Helpers for unit-testing merges: a state-dict assertion and hypothesis strategies.

:func:`assert_state_dicts_close` needs only ladle. The strategies :func:`state_dicts` and
:func:`model_families` need `hypothesis <https://hypothesis.readthedocs.io>`_
(``pip install hypothesis``, or ``pip install ladle[dev]``); it is imported when a strategy
is built, so ``import ladle.testing`` works without it.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import StateDict, StateDictLike, check_source, load, not_a_dense_tensor
from .engine import OUTPUT_DTYPES, NumberLike, _few, check_number, is_packed, real_view
from .errors import CheckpointError, check_flag, type_name

# The strategies' return annotations name SearchStrategy: bound where hypothesis is imported
# already (a test session), or once a strategy is made, so that typing.get_type_hints (and
# the tools built on it) resolve them; ladle.testing itself never imports hypothesis.
if TYPE_CHECKING or "hypothesis.strategies" in sys.modules:
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "BUFFER_KEY",
    "COMPLEX_DTYPES",
    "FLOAT_DTYPES",
    "KEY_NAMES",
    "assert_state_dicts_close",
    "default_tolerances",
    "model_families",
    "state_dicts",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The floating dtypes the strategies draw from by default."""

COMPLEX_DTYPES = (torch.complex64, torch.complex128)
"""The complex dtypes the strategies may draw (``dtypes=``): real and imaginary parts each
drawn as a float32 value within the bound."""

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
    torch.complex32: (1e-3, 1e-5),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}

_WORST = 5  # keys with differing values shown in a failure message

Number = int | float | complex


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype`` as :func:`torch.testing.assert_close` picks them.

    float16 (1e-3, 1e-5), bfloat16 (1.6e-2, 1e-5), float32 (1.3e-6, 1e-5), float64 (1e-7, 1e-7);
    complex32, complex64 and complex128 as float16, float32 and float64; other dtypes
    (integers, bool, and the float8 dtypes, as in torch) must match exactly: (0, 0).

    Args:
        dtype: a torch dtype (a string such as ``"float16"`` is a ``TypeError``).

    Returns:
        ``(rtol, atol)``, the defaults of :func:`assert_state_dicts_close`.

    Example:
        >>> default_tolerances(torch.bfloat16)
        (0.016, 1e-05)
        >>> default_tolerances(torch.complex64)
        (1.3e-06, 1e-05)
    """
    if not isinstance(dtype, torch.dtype):  # "float16" found no tolerance: exact, silently
        raise TypeError(f"dtype: expected a torch.dtype, found {type_name(dtype)}")
    return _TOLERANCES.get(dtype, (0.0, 0.0))


def _show(value: Number, digits: int) -> str:
    """A reported number: integers in full, floats and complex to ``digits`` significant digits.

    Example:
        >>> _show(2**53 + 1, 9), _show(2.0**53 + 1, 9), _show(complex(1, -0.5), 9)
        ('9007199254740993', '9.00719925e+15', '1-0.5j')
    """
    return str(value) if isinstance(value, int) else f"{value:.{digits}g}"


@dataclass(frozen=True)
class _Mismatch:
    key: str
    count: int
    numel: int
    max_abs: int | float
    max_rel: float
    severity: float  # the largest |actual − expected| / (atol + rtol·|expected|)
    index: tuple[int, ...]
    actual: Number
    expected: Number
    rtol: float
    atol: float
    nans: int = 0  # differing elements where either side is NaN (left out of the maxima)

    def describe(self) -> str:
        nans = f" ({self.nans} NaN)" if self.nans else ""
        return (
            f"  {self.key!r}: {self.count} of {self.numel} elements differ{nans}; max abs error "
            f"{_show(self.max_abs, 6)}, max rel error {self.max_rel:.6g} (rtol={self.rtol:g}, "
            f"atol={self.atol:g}); worst at index {self.index}: actual "
            f"{_show(self.actual, 9)}, expected {_show(self.expected, 9)}"
        )


def _is_exact(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds integers or bools, compared exactly rather than in float64."""
    return not (tensor.is_floating_point() or tensor.is_complex())


def _halves(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An integer or bool tensor as int64 ``(high, low)``, ``tensor = high·2**32 + low`` exactly.

    Any integer dtype fits, uint64 included; the halves' differences are exact in int64 and
    in float64.

    Example:
        >>> high, low = _halves(torch.tensor([2**64 - 1, 3], dtype=torch.uint64))
        >>> high.tolist(), low.tolist()
        ([4294967295, 0], [4294967295, 3])
    """
    if tensor.dtype == torch.uint64:  # no shifts for uint64: read its bits as int64
        bits = tensor.view(torch.int64)
        return (bits >> 32) + bits.lt(0).to(torch.int64) * 2**32, bits & 0xFFFFFFFF
    tensor = tensor.to(torch.int64)
    return tensor >> 32, tensor & 0xFFFFFFFF


def _join(halves: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> list[int]:
    """The exact integers of ``halves`` where ``mask`` holds."""
    high, low = halves[0][mask].tolist(), halves[1][mask].tolist()
    return [h * 2**32 + x for h, x in zip(high, low, strict=True)]


def _to_float64(halves: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return halves[0].to(torch.float64) * 2.0**32 + halves[1].to(torch.float64)


@dataclass(frozen=True)
class _Compared:
    """Elementwise: which elements differ, ``|actual − expected|`` and ``|expected|`` (both in
    float64); the largest difference of those that differ (0 if none), and the exact values of
    a selection of elements; ``unbounded``: the elements that differ, hold no NaN, and where a
    side is infinite or the difference overflows float64, which no tolerance covers: ranked
    as infinitely far off (an error of 1e6 in the imaginary part of ``inf+0j`` is one, whose
    ratio to a tolerance of ``rtol·inf`` is 0, and whose relative error is 0)."""

    bad: torch.Tensor
    diff: torch.Tensor
    magnitude: torch.Tensor
    max_abs: int | float
    actual: Callable[[torch.Tensor], Sequence[Number]]
    expected: Callable[[torch.Tensor], Sequence[Number]]
    unbounded: torch.Tensor | None = None


def _compare_exactly(a: torch.Tensor, e: torch.Tensor, rtol: float, atol: float) -> _Compared:
    """Integers and bools: equal, or their exact difference (rounded once) within tolerance."""
    ha, he = _halves(a), _halves(e)
    diff = ((ha[0] - he[0]).to(torch.float64) * 2.0**32 + (ha[1] - he[1])).abs()
    magnitude = _to_float64(he).abs()
    equal = ha[0].eq(he[0]) & ha[1].eq(he[1])
    bad = ~(equal | (diff <= atol + rtol * magnitude))
    rounded = ~equal & (diff.ge(2.0**53) | magnitude.ge(2.0**53))  # float64 rounds these
    if bool(rounded.any()) and math.isfinite(atol + rtol):  # judged again, exactly
        limit, relative = Fraction(atol), Fraction(rtol)
        pairs = zip(_join(ha, rounded), _join(he, rounded), strict=True)
        bad[rounded] = torch.tensor([abs(x - y) > limit + relative * abs(y) for x, y in pairs])
    at = bad & diff.eq(diff[bad].max()) if bool(bad.any()) else bad  # rounding keeps the order
    max_abs = max(
        (abs(x - y) for x, y in zip(_join(ha, at), _join(he, at), strict=True)), default=0
    )
    return _Compared(bad, diff, magnitude, max_abs, lambda m: _join(ha, m), lambda m: _join(he, m))


def _compare_numerically(
    a: torch.Tensor, e: torch.Tensor, rtol: float, atol: float, equal_nan: bool
) -> _Compared:
    """Floats in float64, complex in complex128 (by the magnitude of the difference): equal,
    or both finite and within tolerance, so that inf only matches the same inf."""
    wide = torch.complex128 if a.is_complex() or e.is_complex() else torch.float64
    a, e = a.to(wide), e.to(wide)
    # |a − e| of complex values from their parts: torch's complex subtraction makes NaN of
    # infinities (0 − (inf+infj)), and the magnitude of inf + NaNj is inf. An element with a
    # NaN has no error: NaN, left out of the maximum. Equal parts differ by 0, infinities too
    # (inf+1j against inf+2j is 1 off, not NaN).
    diff = (
        torch.hypot(
            *(torch.where(x == y, 0.0, x - y) for x, y in ((a.real, e.real), (a.imag, e.imag)))
        )
        if a.is_complex()
        else (a - e).abs()
    )
    diff, magnitude = diff.masked_fill(a.isnan() | e.isnan(), math.nan), e.abs()
    # A difference past float64's range (-1.5e308 against 1e308) is inf: no tolerance holds it.
    bounded = a.isfinite() & e.isfinite() & diff.isfinite()
    close = a.eq(e) | (bounded & (diff <= atol + rtol * magnitude))
    if equal_nan:
        close |= a.isnan() & e.isnan()
    max_abs = _max_not_nan(diff[~close]) if not bool(close.all()) else 0.0
    return _Compared(
        ~close,
        diff,
        magnitude,
        max_abs,
        lambda m: a[m].tolist(),
        lambda m: e[m].tolist(),
        ~close & ~bounded & ~(a.isnan() | e.isnan()),  # a NaN: its own count, and ratio
    )


def _or_inf(error: float) -> float:
    """``error``, or infinity for NaN (which no order places)."""
    return math.inf if math.isnan(error) else error


def _max_not_nan(values: torch.Tensor) -> float:
    """The largest of ``values`` that is not NaN (NaN if they all are): one NaN would hide
    how far the other elements are off."""
    kept = values[~values.isnan()]
    return float(kept.max()) if kept.numel() else math.nan


def _compare(
    key: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float,
    atol: float,
    equal_nan: bool,
) -> _Mismatch | None:
    a, e = actual.detach().to("cpu"), expected.detach().to("cpu")
    compared = (
        _compare_exactly(a, e, rtol, atol)
        if _is_exact(a) and _is_exact(e)
        else _compare_numerically(a, e, rtol, atol, equal_nan)
    )
    bad, diff, magnitude = compared.bad, compared.diff, compared.magnitude
    if not bool(bad.any()):
        return None
    ratio = (diff / (atol + rtol * magnitude)).nan_to_num(nan=math.inf, posinf=math.inf)
    unbounded = compared.unbounded if compared.unbounded is not None else torch.zeros_like(bad)
    ratio = torch.where(unbounded, math.inf, ratio)
    ratio = torch.where(bad, ratio, -1.0).reshape(-1)
    # Of the elements of the largest ratio, the largest error: with no tolerance (integers,
    # atol=0 where 0 is expected) every failing ratio is inf, and the first was taken.
    tied = torch.where(ratio == ratio.max(), diff.reshape(-1).nan_to_num(nan=math.inf), -1.0)
    worst = torch.zeros(a.numel(), dtype=torch.bool)
    worst[int(torch.argmax(tied))] = True
    worst = worst.reshape(a.shape)
    index = tuple(int(i) for i in worst.nonzero()[0]) if a.dim() else ()
    rel = torch.where(diff.isinf(), math.inf, diff / magnitude)[bad]
    return _Mismatch(
        key=key,
        count=int(bad.sum()),
        numel=a.numel(),
        max_abs=compared.max_abs,
        max_rel=_max_not_nan(rel),
        severity=float(ratio.max()),
        index=index,
        actual=compared.actual(worst)[0],
        expected=compared.expected(worst)[0],
        rtol=rtol,
        atol=atol,
        nans=0 if _is_exact(a) and _is_exact(e) else int((a.isnan() | e.isnan())[bad].sum()),
    )


def _as_state_dict(
    name: str, value: Mapping[str, torch.Tensor] | StateDictLike
) -> Mapping[str, torch.Tensor]:
    """``value`` as a mapping of tensors (loaded with :func:`ladle.load` unless a mapping);
    a ``TypeError`` naming ``name`` and the key for a value that is no tensor."""
    check_source(name, value)
    state = value if isinstance(value, Mapping) else load(value)
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor for key {key!r}, found {type_name(tensor)}")
        problem = not_a_dense_tensor(key, tensor)  # meta, sparse, quantized: no values here
        if problem is None and is_packed(tensor.dtype):
            problem = f"tensor {key!r} packs two values per element ({tensor.dtype})"
            problem += ": compare tensor.view(torch.uint8)"
        if problem is not None:
            raise CheckpointError(f"{name}: {problem}")
    return state


def assert_state_dicts_close(
    actual: Mapping[str, torch.Tensor] | StateDictLike,
    expected: Mapping[str, torch.Tensor] | StateDictLike,
    *,
    rtol: NumberLike | None = None,
    atol: NumberLike | None = None,
    equal_nan: bool = False,
) -> None:
    """Assert that two state dicts have the same keys, dtypes, shapes and close values.

    Values are close where ``|actual − expected| ≤ atol + rtol·|expected|``, computed in
    float64 (complex in complex128, by the magnitude of the difference); integers and bools
    are compared as exact integers, whatever their size. Whatever the tolerances, inf matches
    only inf of the same sign, and NaN matches NaN only with ``equal_nan``. On failure the
    :class:`AssertionError` lists every problem at once: missing and extra keys, keys whose
    dtype or shape differ, and the (up to) five keys whose values differ most (of equal ratios
    of error to tolerance, the larger error first), each with its
    count of differing elements (and of those with a NaN), max abs and max rel error (over
    the elements without NaN), and the worst element (integers in full, complex values as
    such).

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
        TypeError: ``rtol`` or ``atol`` is no number (a string, a bool); it is named.
        ValueError: ``rtol`` or ``atol`` is negative or not finite; it is named.
        CheckpointError: a tensor holds no values to compare (on the meta device, sparse,
            quantized, or packed two to an element: compare its ``view(torch.uint8)``).

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
    rtol = None if rtol is None else check_number("rtol", rtol)
    atol = None if atol is None else check_number("atol", atol)
    if rtol is not None and not (rtol >= 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol: expected a finite number ≥ 0, found {rtol}")
    if atol is not None and not (atol >= 0 and math.isfinite(atol)):
        raise ValueError(f"atol: expected a finite number ≥ 0, found {atol}")
    equal_nan = check_flag("equal_nan", equal_nan)  # "no", being truthy, let NaN pass
    got, want = _as_state_dict("actual", actual), _as_state_dict("expected", expected)
    problems = []
    missing = [key for key in want if key not in got]
    extra = [key for key in got if key not in want]
    if missing:
        problems.append(f"  missing keys (in expected, not in actual): {_few(missing, 5)}")
    if extra:
        problems.append(f"  extra keys (in actual, not in expected): {_few(extra, 5)}")
    mismatches = []
    for key in want:
        if key not in got:
            continue
        a, e = got[key], want[key]
        if a.dtype != e.dtype:
            problems.append(f"  {key!r}: dtype {a.dtype}, expected {e.dtype}")
        if tuple(a.shape) != tuple(e.shape):
            problems.append(f"  {key!r}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
            continue
        (r_a, t_a), (r_e, t_e) = default_tolerances(a.dtype), default_tolerances(e.dtype)
        key_rtol = max(r_a, r_e) if rtol is None else rtol
        key_atol = max(t_a, t_e) if atol is None else atol
        mismatch = _compare(key, a, e, key_rtol, key_atol, equal_nan)
        if mismatch is not None:
            mismatches.append(mismatch)
    if not problems and not mismatches:
        return
    if mismatches:
        # The larger error first; a NaN error (a NaN against a number) counts as the largest.
        mismatches.sort(key=lambda m: (-m.severity, -_or_inf(m.max_abs)))
        plural = "key" if len(mismatches) == 1 else "keys"
        problems.append(f"  values differ in {len(mismatches)} {plural}, worst first:")
        problems.extend(m.describe() for m in mismatches[:_WORST])
        if len(mismatches) > _WORST:
            more = len(mismatches) - _WORST
            problems.append(f"  ... and {more} more key{'s' if more > 1 else ''}")
    raise AssertionError("\n".join(["state dicts are not close:", *problems]))


def _hypothesis() -> Any:
    try:
        from hypothesis import strategies
    except ImportError as err:  # pragma: no cover - hypothesis is a test dependency
        raise ImportError(
            "ladle.testing strategies need hypothesis: pip install hypothesis"
        ) from err
    globals().setdefault("SearchStrategy", strategies.SearchStrategy)  # see the imports
    return strategies


def _sequence_of(name: str, values: object, kind: type, what: str) -> tuple[Any, ...]:
    """``values`` as a tuple of ``kind`` (``what``), or a ``TypeError`` naming ``name``: a
    lone dtype or string where a sequence of them goes, or an item of another type."""
    if isinstance(values, (kind, str)):
        raise TypeError(f"{name}: expected a sequence of {what}, found {values!r} alone")
    if not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a sequence of {what}, found {type_name(values)}")
    for value in values:
        if not isinstance(value, kind):
            raise TypeError(f"{name}: expected a sequence of {what}, found the item {value!r}")
    return tuple(values)


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

    dtypes = _sequence_of("dtypes", dtypes, torch.dtype, "torch dtypes")
    if keys is not None:
        keys = _sequence_of("keys", keys, str, "names")
    # Floating dtypes a merge writes: not packed float4 (no arithmetic), nor the unsigned,
    # scale-only float8_e8m0fnu (a drawn -3.0 stored as 4.0: no family, and every merge
    # refuses it).
    if not dtypes or not all(d in OUTPUT_DTYPES or d in COMPLEX_DTYPES for d in dtypes):
        raise ValueError(
            f"dtypes: expected one or more floating dtypes a merge writes (float32, bfloat16, "
            f"float16, float64, a signed float8) or complex64, complex128, found {dtypes}"
        )
    limits = (("max_keys", max_keys), ("max_side", max_side))
    for limit, value in limits:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{limit}: expected an int, found {type_name(value)}")
    for limit, value in limits:
        if value < 1:
            raise ValueError(f"{limit}: expected at least 1, found {value}")
    dtype_strategy = st.sampled_from(dtypes)
    if shapes is not None:
        return st.tuples(st.just(_fixed_shapes(shapes)), dtype_strategy)
    pool = KEY_NAMES if keys is None else tuple(keys)
    if not pool or len(set(pool)) != len(pool) or BUFFER_KEY in pool:
        raise ValueError(f"keys: expected distinct names other than {BUFFER_KEY!r}, found {pool}")
    names = (
        st.lists(st.sampled_from(pool), min_size=1, max_size=min(max_keys, len(pool)), unique=True)
        if keys is None
        else st.just(list(pool))
    )
    # Mostly vectors and matrices; a 0-d tensor (a scalar parameter) now and then: one draw
    # in eight (``one_of`` of the two drew 0-d as often as vectors). Shrinks to a vector.
    arrays = array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=max_side)
    one_shape = st.sampled_from([False] * 7 + [True]).flatmap(
        lambda scalar: st.just(()) if scalar else arrays
    )

    @st.composite
    def layout(draw: Any) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
        return {name: draw(one_shape) for name in draw(names)}, draw(dtype_strategy)

    return layout()


def _fixed_shapes(shapes: object) -> dict[str, tuple[int, ...]]:
    """``shapes`` (a mapping of keys to sequences of sides, ints ≥ 0) as a dict of tuples;
    anything else, or the buffer's key among them, is an error naming ``shapes``."""
    if not isinstance(shapes, Mapping):
        raise TypeError(f"shapes: expected a mapping of keys to shapes, found {type_name(shapes)}")
    fixed = {}
    for key, shape in shapes.items():
        if not isinstance(shape, Iterable):  # tuple() would say "'int' object is ..."
            raise TypeError(
                f"shapes: expected a sequence of sides for key {str(key)!r}, found "
                f"{type_name(shape)}"
            )
        fixed[str(key)] = tuple(shape)
    try:  # ints (numpy's too), not floats that int() would truncate
        fixed = {k: tuple(operator.index(side) for side in v) for k, v in fixed.items()}
    except TypeError:
        fixed = {}  # reported with the shapes as given
    if not fixed or any(side < 0 for shape in fixed.values() for side in shape):
        raise ValueError(
            "shapes: expected one or more keys with sides that are ints ≥ 0, found "
            f"{ {str(k): tuple(v) for k, v in shapes.items()} }"
        )
    if BUFFER_KEY in fixed:
        raise ValueError(f"shapes: expected keys other than {BUFFER_KEY!r}, found {list(fixed)}")
    return fixed


def _float32_arrays(shape: tuple[int, ...], bound: float) -> SearchStrategy[torch.Tensor]:
    st = _hypothesis()
    import numpy as np
    from hypothesis.extra.numpy import arrays

    elements = st.floats(-bound, bound, width=32)
    return arrays(np.float32, shape, elements=elements, fill=st.nothing()).map(
        lambda array: torch.from_numpy(np.array(array, dtype=np.float32))
    )


def _parts_of(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, ...]:
    """The shape of the float32 values drawn for a tensor of ``shape`` and ``dtype``: with a
    last dimension of 2, its real and imaginary parts, for a complex one."""
    return (*shape, 2) if dtype.is_complex else shape


def _stored(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Drawn float32 ``values`` (:func:`_parts_of`) as a tensor of ``dtype``.

    Example:
        >>> _stored(torch.tensor([[1.0, -2.0]]), torch.complex64)
        tensor([1.-2.j])
    """
    if dtype.is_complex:  # view_as_complex refuses an empty tensor's strides (0, 0)
        return torch.complex(values[..., 0], values[..., 1]).to(dtype)
    return values.to(dtype)


def _round_down(bound: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` that is at most ``bound`` (> 0, at most its largest).

    Example:
        >>> _round_down(0.1, torch.float32), _round_down(0.1, torch.bfloat16)
        (0.09999999403953552, 0.099609375)
    """
    value = torch.tensor(bound, dtype=torch.float64).to(dtype)
    if float(value) > bound:  # positive floats are ordered as their bits: step one down
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[value.element_size()]
        value = (value.view(bits) - 1).view(dtype)
    return float(value)


def _drawn_in(dtypes: Sequence[torch.dtype]) -> list[torch.dtype]:
    """The dtypes a value passes through: float32 (drawn in), then each narrower dtype."""
    return list(dict.fromkeys([torch.float32, *(d for d in dtypes if d.itemsize <= 4)]))


def _check_bound(
    bound: NumberLike, dtypes: Sequence[torch.dtype], *, fine_tunes: bool = False
) -> dict[torch.dtype, float]:
    """Per dtype, ``bound`` rounded down to a value of that dtype and of float32.

    Values are drawn in float32 within it and rounded to the dtype, so they stay finite and
    within ``bound``. With ``fine_tunes`` (base plus task vector), twice the bound must be
    finite too.

    Example:
        >>> _check_bound(0.1, [torch.float16, torch.float64])
        {torch.float16: 0.0999755859375, torch.float64: 0.09999999403953552}
        >>> _check_bound(1e5, [torch.float32, torch.float16])
        Traceback (most recent call last):
        ...
        ValueError: bound: expected at most 65504 (the largest finite torch.float16), found 100000.0
    """
    bound = check_number("bound", bound)  # no bool, no string, within float's range
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"bound: expected a finite number > 0, found {bound}")
    terms = 2 if fine_tunes else 1
    passes = _drawn_in(dtypes)
    largest = min(passes, key=lambda d: torch.finfo(d).max)
    if bound * terms > torch.finfo(largest).max:
        why = [f"{'half ' if fine_tunes else ''}the largest finite {largest}"]
        if largest not in dtypes:
            why.append("in which values are drawn")
        if fine_tunes:
            why.append("as a fine-tune is the base plus a task vector")
        raise ValueError(
            f"bound: expected at most {torch.finfo(largest).max / terms:.9g} "
            f"({', '.join(why)}), found {bound}"
        )
    coarsest = max(passes, key=lambda d: torch.finfo(d).smallest_normal * torch.finfo(d).eps)
    smallest = torch.finfo(coarsest).smallest_normal * torch.finfo(coarsest).eps
    if bound < smallest:
        raise ValueError(
            f"bound: expected at least {smallest:.9g} (the smallest positive {coarsest}), "
            f"found {bound}"
        )
    float32 = _round_down(bound, torch.float32)
    return {d: float32 if d.itemsize > 4 else _round_down(float32, d) for d in dtypes}


def state_dicts(
    *,
    keys: Sequence[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    buffers: bool = True,
    max_keys: int = 4,
    max_side: int = 4,
    bound: NumberLike = 10.0,
) -> SearchStrategy[StateDict]:
    """A hypothesis strategy for small state dicts.

    Each draw has one floating dtype for all its tensors (drawn from ``dtypes``), finite values
    in ``[−bound, bound]``, and, with ``buffers``, an int64 0-d :data:`BUFFER_KEY`
    (``bn.num_batches_tracked``). Values are drawn in float32 and rounded to the dtype; the
    bound is first rounded down (to the largest value of both at most ``bound``), so that no
    value exceeds it.

    Args:
        keys: the key names, all of them in every draw; default 1 to ``max_keys`` names drawn
            from :data:`KEY_NAMES`.
        shapes: fixed keys and shapes (overrides ``keys``; no :data:`BUFFER_KEY`; sides are
            ints ≥ 0); default shapes of 1 or 2 dimensions of 1 to ``max_side`` entries each,
            or now and then (one in eight) 0-d.
        dtypes: floating dtypes to draw from; default float32, bfloat16, float16. May hold
            :data:`COMPLEX_DTYPES` (complex64, complex128), whose real and imaginary parts
            are each drawn within ``bound``.
        buffers: add the integer buffer.
        max_keys: most keys drawn when ``keys`` and ``shapes`` are not given.
        max_side: longest dimension of a drawn shape.
        bound: largest magnitude of a value: finite, at most the largest finite value of
            float32 and of each of ``dtypes`` (65504 with float16), and at least their
            smallest positive value (5.96e-08 with float16).

    Returns:
        A strategy of ``dict[str, torch.Tensor]``.

    Raises:
        ValueError: an argument is out of range; the message names it, and the limit.
        TypeError: an argument of the wrong type (a lone dtype for ``dtypes``); it is named.

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
    buffers = check_flag("buffers", buffers)  # "no" added the buffer
    layouts = _layouts(keys, shapes, dtypes, max_keys, max_side)
    bounds = _check_bound(bound, dtypes)

    @st.composite
    def draw_state_dict(draw: Any) -> StateDict:
        layout, dtype = draw(layouts)
        state = {
            key: _stored(draw(_float32_arrays(_parts_of(shape, dtype), bounds[dtype])), dtype)
            for key, shape in layout.items()
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
    bound: NumberLike = 10.0,
) -> SearchStrategy[tuple[StateDict, list[StateDict]]]:
    """A hypothesis strategy for a base and ``n`` fine-tunes of it: ``(base, [models])``.

    All members share keys, shapes and one floating dtype (drawn from ``dtypes``). Each
    fine-tune is the base plus a drawn task vector with entries in ``[−bound, bound]``,
    computed in float32 and rounded to the dtype, so shrinking moves towards fine-tunes equal
    to the base. With ``buffers``, every member has its own int64 :data:`BUFFER_KEY` value,
    distinct from the others'.
    The other arguments are those of :func:`state_dicts`.

    Args:
        n: the number of fine-tunes, or a strategy for it (e.g. ``st.integers(2, 4)``); at
            least 1 (a strategy drawing less raises ``ValueError`` in the test).
        keys: as :func:`state_dicts`.
        shapes: as :func:`state_dicts`.
        dtypes: as :func:`state_dicts`.
        buffers: as :func:`state_dicts`.
        max_keys: as :func:`state_dicts`.
        max_side: as :func:`state_dicts`.
        bound: largest magnitude of a base value and of a task-vector entry; as
            :func:`state_dicts`, but at most *half* the largest finite value, so that
            fine-tunes stay finite too (32752 with float16).

    Returns:
        A strategy of ``(base, [fine-tune, ...])``.

    Raises:
        ValueError: an argument is out of range; the message names it, and the limit.
        TypeError: an argument of the wrong type (a lone dtype for ``dtypes``); it is named.

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
    buffers = check_flag("buffers", buffers)  # "no" added the buffer
    if isinstance(n, st.SearchStrategy):
        counts = n
    elif isinstance(n, int) and not isinstance(n, bool):
        if n < 1:
            raise ValueError(f"n: expected at least 1 fine-tune, found {n}")
        counts = st.just(n)
    else:
        raise TypeError(f"n: expected an int or a strategy of ints, found {type_name(n)}")
    layouts = _layouts(keys, shapes, dtypes, max_keys, max_side)
    bounds = _check_bound(bound, dtypes, fine_tunes=True)

    @st.composite
    def draw_family(draw: Any) -> tuple[StateDict, list[StateDict]]:
        layout, dtype = draw(layouts)
        count = draw(counts)
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"n: expected a strategy of ints, drew {count!r} from {n!r}")
        if count < 1:
            raise ValueError(f"n: expected at least 1 fine-tune, drew {count} from {n!r}")
        arrays = {
            key: _float32_arrays(_parts_of(shape, dtype), bounds[dtype])
            for key, shape in layout.items()
        }
        base = {key: _stored(draw(values), dtype) for key, values in arrays.items()}
        models = []
        for _ in range(count):
            model = {  # the base's values (a complex one's parts) plus a task vector's
                key: _stored(real_view(base[key]).float() + draw(values), dtype)
                for key, values in arrays.items()
            }
            models.append(model)
        if buffers:  # distinct values, so that a test can tell whose buffer an output holds
            values = draw(
                st.lists(st.integers(0, 10**6), min_size=count + 1, max_size=count + 1, unique=True)
            )
            for state, value in zip([base, *models], values, strict=True):
                state[BUFFER_KEY] = torch.tensor(value, dtype=torch.int64)
        return base, models

    return draw_family()
