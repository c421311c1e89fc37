"""Checks of values where they enter POPEX: one rule per quantity, one place.

A public function or a route checks its arguments with these, once; the
private cores below trust what they are given (STYLE: validate at the entry
point, then trust). Every check raises :class:`~popex.errors.ConfigError`
naming the parameter and the bound, and refuses NaN and infinity: a
requirement of "infinitely many milliseconds" is a client bug, not a wish.
"""

from __future__ import annotations

import math

from popex.errors import ConfigError

__all__ = [
    "MAX_DEADLINE_MS",
    "OBJECTIVES",
    "pickled_kind",
    "check_choice",
    "check_deadline_ms",
    "check_finite",
    "check_int",
    "check_objective",
]

#: The largest latency requirement anyone means (one hour), ms.
MAX_DEADLINE_MS = 3_600_000.0

#: What must meet the requirement: the expected ("mean") or the worst-case ("tail") latency.
OBJECTIVES = ("mean", "tail")


def check_finite(value: object, *, name: str, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, allow_text: bool = True) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Parameters
    ----------
    value : object
        What was given; bools are refused although Python counts them as ints.
    name : str
        The parameter's name, for the message.
    low, high : float
        Bounds, inclusive unless ``low_open``.
    low_open : bool
        Whether ``low`` itself is refused.
    allow_text : bool
        Whether a numeric string (a form field) is read as its number;
        False where a typed source (a config file, a library call) must
        give a number.

    Returns
    -------
    float

    Raises
    ------
    ConfigError
        If ``value`` is not a finite real number within the bounds.

    Examples
    --------
    >>> check_finite(2, name="rtt_ms", low=0.0)
    2.0
    >>> check_finite(float("inf"), name="rtt_ms")
    Traceback (most recent call last):
    ...
    popex.errors.ConfigError: rtt_ms must be a finite number, got inf
    >>> check_finite("2", name="rtt_ms", allow_text=False)
    Traceback (most recent call last):
    ...
    popex.errors.ConfigError: rtt_ms must be a number, got '2'
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            if isinstance(value, (bool, bytes)) or value is None or (isinstance(value, str) and not allow_text):
                raise TypeError
            number = float(value)  # type: ignore[arg-type]  # numpy scalars, numeric strings from a form
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{name} must be a number, got {value!r}") from err
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if number > high or number < low or (low_open and number == low):
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return number


def check_int(value: object, *, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``low..high``.

    Parameters
    ----------
    value : object
        What was given; bools and floats are refused.
    name : str
        The parameter's name, for the message.
    low, high : int
        Inclusive bounds.

    Returns
    -------
    int

    Raises
    ------
    ConfigError
        If ``value`` is not an int (bools refused) or is out of range.

    Examples
    --------
    >>> check_int(3, name="n_repeats", low=1, high=10)
    3
    """
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an int in {low}..{high}, got {value!r}")
    return value


def check_deadline_ms(deadline_ms: object, *, name: str = "deadline_ms") -> float:
    """A latency requirement in ms: finite, in ``[0, MAX_DEADLINE_MS]``.

    Parameters
    ----------
    deadline_ms : object
        The requirement as given (a number, or a numeric string from a form field).
    name : str
        The parameter's name, for the message.

    Returns
    -------
    float

    Raises
    ------
    ConfigError
        If it is not a number, is NaN or infinite, negative, or above an hour.

    Examples
    --------
    >>> check_deadline_ms(50)
    50.0
    >>> check_deadline_ms(-1)
    Traceback (most recent call last):
    ...
    popex.errors.ConfigError: deadline_ms must be in [0, 3.6e+06], got -1
    """
    return check_finite(deadline_ms, name=name, low=0.0, high=MAX_DEADLINE_MS)


def check_choice(value: object, *, name: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices`` (names compared exactly: "MEAN" is not "mean").

    Parameters
    ----------
    value : object
        What was given.
    name : str
        The parameter's name, for the message.
    choices : tuple of str
        The allowed names.

    Returns
    -------
    str

    Raises
    ------
    ConfigError
        For anything else, naming the allowed values.

    Examples
    --------
    >>> check_choice("int8", name="wire_dtype", choices=("float32", "int8"))
    'int8'
    """
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_objective(objective: object) -> str:
    """``"mean"`` or ``"tail"``: :func:`check_choice` over :data:`OBJECTIVES`.

    Parameters
    ----------
    objective : object
        What was given.

    Returns
    -------
    str

    Raises
    ------
    ConfigError
        For anything else, naming the allowed values.

    Examples
    --------
    >>> check_objective("tail")
    'tail'
    """
    return check_choice(objective, name="objective", choices=OBJECTIVES)


def pickled_kind(data: bytes) -> str | None:
    """What pickled file ``data`` looks like ("a Python pickle", "a torch.save() zip ..."), or None.

    Files from users and the network are named by kind when they are refused,
    so the sender learns to convert them, never that POPEX tried to read them.

    >>> pickled_kind(b"\\x80\\x04K."), pickled_kind(b"{}")
    ('a Python pickle', None)
    """
    if data[:1] == b"\x80" or data[:2] in (b"(d", b"(l", b"}q"):
        return "a Python pickle"
    if data[:4] == b"PK\x03\x04":
        return "a torch.save() zip (a pickle inside)"
    return None
