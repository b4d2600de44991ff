"""Primitive decoders of dlib's binary serialization (``dlib/serialize.h``), without dlib.

dlib writes objects with ``serialize(obj, out)``; every type has its own encoding, and a
stream carries no type tags, so the reader must know what comes next. :class:`Reader`
decodes the primitives; callers compose them following dlib's ``deserialize`` functions.

Encodings (from dlib 20.0.1 ``serialize.h``, ``float_details.h``, ``matrix/matrix.h``,
``cuda/tensor.h``, ``geometry/vector.h``):

- integers (all C++ integral types except the char types): one control byte, then the
  absolute value in little-endian order. Control byte: bit 0x80 = negative (signed types),
  low 4 bits = number of value bytes (1..8, never 0; zero is ``01 00``). dlib rejects a size
  larger than ``sizeof`` of the target type: pass ``max_bytes=4`` for C++ ``int``.
- ``char`` / ``signed char`` / ``unsigned char``: one raw byte.
- ``bool``: one ASCII byte, ``'1'`` or ``'0'``.
- ``float`` / ``double``: ``float_details``: the mantissa (signed int64) then the exponent
  (signed int16), both as integers above; the value is ``mantissa * 2**exponent``, except
  exponent 32000 = +inf, 32001 = -inf, 32002 = NaN. (``serialize.h``'s prose says
  "exponent then mantissa"; the code writes the mantissa first.) Very old files used an
  ASCII text format instead (first byte has a bit of 0x70 set), also accepted here.
- ``std::string``, ``std::vector<char>``, ``std::vector<unsigned char>``: length (integer)
  then the raw bytes.
- ``std::vector<T>``: length (integer) then each element with T's encoding.
- ``dlib::matrix<T>``: ``-nr``, ``-nc`` (negated in the current format; positive in the
  old one), then the elements in row-major order, each with T's encoding.
- ``dlib::vector<T,2>`` (points): x then y, with T's encoding.
- ``dlib::resizable_tensor``: int version (2), then num_samples, k, nr, nc (integers), then
  ``num_samples*k*nr*nc`` raw little-endian IEEE float32 values (NCHW order).
- ``dlib::alias_tensor``: int version (1), then num_samples, k, nr, nc; no data.

Example::

    r = Reader(path.read_bytes(), name=path.name)
    version = r.read_int(max_bytes=4)
    initial_shape = r.read_matrix()              # matrix<float,0,1> -> float32 [nr, nc]
    forests = r.read_vector(lambda r: r.read_vector(read_tree))
    r.expect_end()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np

__all__ = ["DlibSerializationError", "Reader", "FLOAT_IS_INF", "FLOAT_IS_NINF", "FLOAT_IS_NAN"]

T = TypeVar("T")

# float_details special exponents
FLOAT_IS_INF = 32000
FLOAT_IS_NINF = 32001
FLOAT_IS_NAN = 32002


class DlibSerializationError(ValueError):
    """Malformed, truncated or unexpected dlib serialized data (message names the offset)."""


class Reader:
    """Sequential decoder over an in-memory dlib serialized stream.

    Args:
      data: the serialized bytes (e.g. ``Path(...).read_bytes()``).
      name: how error messages refer to the stream (e.g. the file name).

    Attributes:
      pos: offset of the next unread byte (may be read and set).

    Every ``read_*`` method consumes exactly the bytes of one object and raises
    :class:`DlibSerializationError` (with the offset) on truncation or invalid data.
    """

    def __init__(self, data: bytes | bytearray | memoryview, *, name: str = "dlib data") -> None:
        self.data = bytes(data)
        self.name = name
        self.pos = 0

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        return len(self.data)

    @property
    def remaining(self) -> int:
        """Number of unread bytes."""
        return len(self.data) - self.pos

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def expect_end(self) -> None:
        """Raise unless the whole stream has been consumed (catches trailing garbage)."""
        if self.pos != len(self.data):
            self.error(f"{len(self.data) - self.pos} unread trailing bytes")

    def error(self, msg: str, pos: int | None = None) -> None:
        """Raise :class:`DlibSerializationError` mentioning the stream name and offset."""
        p = self.pos if pos is None else pos
        raise DlibSerializationError(f"{self.name}: {msg} (at byte offset {p} of {len(self.data)})")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            self.error(f"truncated data: {what} needs {n} bytes, only {len(self.data) - self.pos} left")

    # ------------------------------------------------------------------ raw bytes
    def read_bytes(self, n: int) -> bytes:
        """``n`` raw bytes."""
        self._need(n, f"{n} raw bytes")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def peek_byte(self) -> int:
        """The next byte (0..255) without consuming it."""
        self._need(1, "a byte")
        return self.data[self.pos]

    def read_byte(self) -> int:
        """One raw byte (dlib's ``char`` / ``unsigned char`` encoding) as 0..255."""
        self._need(1, "a byte")
        b = self.data[self.pos]
        self.pos += 1
        return b

    # ------------------------------------------------------------------ integers
    def read_int(self, max_bytes: int = 8) -> int:
        """A signed integer (C++ ``int``: ``max_bytes=4``; ``long``/``int64``: 8; ``short``: 2)."""
        start = self.pos
        self._need(1, "an integer control byte")
        ctrl = self.data[self.pos]
        size = ctrl & 0x0F
        if size == 0 or size > min(max_bytes, 8):
            self.error(f"invalid signed integer control byte 0x{ctrl:02x} (size {size}, max {max_bytes})", start)
        self.pos += 1
        self._need(size, "an integer")
        value = int.from_bytes(self.data[self.pos : self.pos + size], "little")
        self.pos += size
        return -value if ctrl & 0x80 else value

    def read_uint(self, max_bytes: int = 8) -> int:
        """An unsigned integer (C++ ``unsigned long``/``size_t``/``uint64``: 8; ``unsigned int``: 4)."""
        start = self.pos
        self._need(1, "an integer control byte")
        ctrl = self.data[self.pos]
        size = ctrl & 0x8F  # dlib masks out the 3 reserved bits; a sign bit makes it invalid
        if size == 0 or size > min(max_bytes, 8):
            self.error(f"invalid unsigned integer control byte 0x{ctrl:02x} (max {max_bytes} bytes)", start)
        self.pos += 1
        self._need(size, "an integer")
        value = int.from_bytes(self.data[self.pos : self.pos + size], "little")
        self.pos += size
        return value

    def read_bool(self) -> bool:
        """A ``bool`` (ASCII ``'1'`` / ``'0'``)."""
        b = self.read_byte()
        if b == 0x31:
            return True
        if b == 0x30:
            return False
        self.error(f"invalid bool byte 0x{b:02x} (expected '0' or '1')", self.pos - 1)
        raise AssertionError  # unreachable

    # ------------------------------------------------------------------ floating point
    def _read_float_details(self) -> tuple[int, int]:
        mantissa = self.read_int(8)
        exponent = self.read_int(2)
        return mantissa, exponent

    def _read_old_ascii_float(self) -> float:
        start = self.pos
        end = self.data.find(b" ", self.pos, self.pos + 64)
        if end < 0:
            self.error("truncated or invalid ASCII floating point number", start)
        text = self.data[self.pos : end].decode("ascii", "replace")
        self.pos = end + 1
        if text.startswith("inf"):
            return math.inf
        if text.startswith("ninf"):
            return -math.inf
        if text.startswith("NaN"):
            return math.nan
        try:
            return float(text)
        except ValueError:
            self.error(f"invalid ASCII floating point number {text!r}", start)
            raise AssertionError from None  # unreachable

    @staticmethod
    def _compose(mantissa: int, exponent: int) -> float:
        if exponent == FLOAT_IS_INF:
            return math.inf
        if exponent == FLOAT_IS_NINF:
            return -math.inf
        if exponent >= FLOAT_IS_NAN:
            return math.nan
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            return math.copysign(math.inf, mantissa)

    def read_double(self) -> float:
        """A ``double`` (dlib ``float_details``: int64 mantissa, int16 exponent)."""
        self._need(1, "a floating point number")
        if self.data[self.pos] & 0x70:
            return self._read_old_ascii_float()
        start = self.pos
        try:
            m, e = self._read_float_details()
        except DlibSerializationError as err:
            raise DlibSerializationError(f"{err} while reading a floating point number at offset {start}") from None
        return self._compose(m, e)

    def read_float(self) -> float:
        """A C++ ``float``: same encoding as :meth:`read_double`, rounded to float32.

        Returns a Python float holding the exact float32 value (``np.float32(x) == x``).
        """
        with np.errstate(over="ignore"):
            return float(np.float32(self.read_double()))

    def read_floats(self, n: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """``n`` consecutive dlib-encoded floats (e.g. a matrix body) as a 1-D array.

        ``dtype=np.float32`` matches C++ ``float`` (default); ``np.float64`` matches ``double``.
        """
        data = self.data
        size = len(data)
        pos = self.pos
        mant = np.empty(n, dtype=np.float64)
        expo = np.empty(n, dtype=np.int64)
        for i in range(n):
            # fast path of read_double: two dlib integers inline
            if pos >= size or data[pos] & 0x70:
                self.pos = pos
                mant[i], expo[i] = self.read_double(), 0
                pos = self.pos
                continue
            vals = []
            for max_bytes in (8, 2):
                if pos >= size:
                    self.pos = pos
                    self.error(f"truncated data: float {i} of {n}")
                ctrl = data[pos]
                nb = ctrl & 0x0F
                if nb == 0 or nb > max_bytes:
                    self.error(f"invalid integer control byte 0x{ctrl:02x} in float {i} of {n}", pos)
                if pos + 1 + nb > size:
                    self.pos = pos
                    self.error(f"truncated data: float {i} of {n}")
                v = int.from_bytes(data[pos + 1 : pos + 1 + nb], "little")
                vals.append(-v if ctrl & 0x80 else v)
                pos += 1 + nb
            m, e = vals
            if e >= FLOAT_IS_INF:
                mant[i], expo[i] = self._compose(m, e), 0
            else:
                mant[i], expo[i] = float(m), e
        self.pos = pos
        with np.errstate(over="ignore"):
            out = np.ldexp(mant, expo.clip(-2000, 2000).astype(np.int32))
            return out.astype(dtype)

    # ------------------------------------------------------------------ strings
    def read_string_bytes(self) -> bytes:
        """A ``std::string`` (or ``std::vector<char>``) as raw bytes: length then bytes."""
        n = self.read_uint()
        return self.read_bytes(n)

    def read_string(self) -> str:
        """A ``std::string`` decoded as UTF-8."""
        start = self.pos
        raw = self.read_string_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.error(f"string is not valid UTF-8: {raw[:40]!r}", start)
            raise AssertionError from None  # unreachable

    def expect_string(self, *allowed: str, what: str = "object") -> str:
        """Read a ``std::string`` version tag and raise unless it is one of ``allowed``.

        dlib objects begin with such tags (``"con_4"``, ``"relu_"``...). Guards against
        reading garbage as a length: the announced length must fit in the stream.
        """
        start = self.pos
        try:
            s = self.read_string()
        except DlibSerializationError as err:
            raise DlibSerializationError(f"{err}; expected {what} tag {' or '.join(map(repr, allowed))}") from None
        if s not in allowed:
            self.error(f"unexpected {what} tag {s!r}, expected {' or '.join(map(repr, allowed))}", start)
        return s

    # ------------------------------------------------------------------ containers
    def read_vector(self, read_elem: Callable[[Reader], T]) -> list[T]:
        """A ``std::vector<T>``: length then ``read_elem(self)`` for each element.

        Example: ``r.read_vector(Reader.read_float)``, ``r.read_vector(lambda r: r.read_uint())``.
        """
        n = self.read_uint()
        if n > self.remaining:  # every element takes at least one byte
            self.error(f"truncated data or bad length: vector of {n} elements exceeds the remaining {self.remaining} bytes")
        return [read_elem(self) for _ in range(n)]

    def read_byte_vector(self) -> bytes:
        """A ``std::vector<char>`` / ``std::vector<unsigned char>``: length then raw bytes."""
        return self.read_string_bytes()

    def read_bool_vector(self) -> list[bool]:
        """A ``std::vector<bool>`` (stored as a vector<unsigned char> of '1'/'0')."""
        return [b == 0x31 for b in self.read_byte_vector()]

    def read_matrix(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """A ``dlib::matrix<float|double>`` as an array ``[nr, nc]`` (row-major).

        A column vector ``matrix<T,0,1>`` comes back as ``[nr, 1]``. ``dtype`` is float32
        for ``float`` matrices and float64 for ``double`` ones.
        """
        nr, nc = self.read_matrix_shape()
        return self.read_floats(nr * nc, dtype).reshape(nr, nc)

    def read_int_matrix(self, max_bytes: int = 8) -> np.ndarray:
        """A ``dlib::matrix`` of integers as an int64 array ``[nr, nc]``."""
        nr, nc = self.read_matrix_shape()
        return np.array([self.read_int(max_bytes) for _ in range(nr * nc)], dtype=np.int64).reshape(nr, nc)

    def read_matrix_shape(self) -> tuple[int, int]:
        """The ``(nr, nc)`` header of a ``dlib::matrix`` (negated in the current format)."""
        start = self.pos
        nr = self.read_int()
        nc = self.read_int()
        if nr < 0 or nc < 0:
            nr, nc = -nr, -nc
        if nr * nc > self.remaining:
            self.error(f"truncated data or bad shape: matrix of {nr}x{nc} elements exceeds the remaining {self.remaining} bytes", start)
        return nr, nc

    def read_point2(self, read_elem: Callable[[Reader], T] | None = None) -> tuple[T, T]:
        """A ``dlib::vector<T,2>`` (point): x then y; default element type ``float``."""
        f = read_elem or Reader.read_float
        x = f(self)
        y = f(self)
        return x, y

    # ------------------------------------------------------------------ dnn tensors
    def read_tensor(self) -> np.ndarray:
        """A ``dlib::resizable_tensor``: float32 array ``[num_samples, k, nr, nc]`` (NCHW).

        An empty tensor comes back with shape ``(0, 0, 0, 0)``.
        """
        start = self.pos
        version = self.read_int(4)
        if version != 2:
            self.error(f"unexpected resizable_tensor version {version} (expected 2)", start)
        shape = tuple(self.read_int() for _ in range(4))
        if any(d < 0 for d in shape):
            self.error(f"negative tensor dimensions {shape}", start)
        count = math.prod(shape)
        self._need(4 * count, f"tensor data of shape {shape}")
        arr = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos).astype(np.float32)
        self.pos += 4 * count
        return arr.reshape(shape)

    def read_alias_tensor(self) -> tuple[int, int, int, int]:
        """A ``dlib::alias_tensor`` (a shape only): ``(num_samples, k, nr, nc)``."""
        start = self.pos
        version = self.read_int(4)
        if version != 1:
            self.error(f"unexpected alias_tensor version {version} (expected 1)", start)
        return tuple(self.read_int() for _ in range(4))  # type: ignore[return-value]

    # ------------------------------------------------------------------ helpers
    def read_each(self, readers: Iterable[Callable[[Reader], T]]) -> list[T]:
        """Apply each reader in turn (a fixed sequence of heterogeneous fields)."""
        return [f(self) for f in readers]
