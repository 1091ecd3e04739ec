"""Channel-major activations in frames, for chains of sparse layers.

The sparse kernels read their input in the stretched, channel-major layout
of escort_jax.conv_geometry, (C, Ha, Wb, N) with zero margins, and an NHWC
input costs a layout pass into it before every layer (a third of a vector
row at batch 32; benchmarks/NOTES.md). A `Framed` activation stays in that
layout between layers:

    data[c, top + h, left + w, n] = x[n, h, w, c],  zeros elsewhere,

data of shape (C + extra_planes, top + H + bottom, left + W + right, N):
the margins hold the convolutions' zero padding, and the extra planes are
zeros that the kernels' wide reads past the last channel land in. A
stride-1 convolution that keeps the map's size ('SAME') and pads no more
than the margins reads a frame directly, and the vector kernel writes its
output as the same frame of its own channels, so that a chain of such
layers runs with no layout pass between them:

    xf = frames.to_frame(x_nhwc, margins=1)
    yf = sparse_conv(xf, sk1, padding="SAME", activation="relu")
    yf = sparse_conv(yf, sk2, padding="SAME", activation="relu")
    y = frames.from_frame(yf)

The margins must hold zeros. Elementwise maps that keep zero at zero (ReLU,
adding two frames, scaling) keep a frame valid as they are: apply them to
`xf.data`, as `jax.tree.map(jax.nn.relu, xf)` does. A bias or a batch
norm's shift would not: fold those into the convolution's bias.

The framed path runs on one device (it does not split a sharded batch as
escort_jax.sharding does for NHWC inputs).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from escort_jax import conv_geometry as cg
from escort_jax.structure import SparseStructure
from pallas_kernels.output_layout import FramedOutput

# Wide positions that a kernel may read past a plane's last wide row: the
# rounding of its output up to whole tiles (block_q).
FRAME_SLACK = 1024


def _margins(margins) -> tuple[tuple[int, int], tuple[int, int]]:
  """An int, two ints, or ((top, bottom), (left, right)) -> the pairs."""
  if isinstance(margins, (int, np.integer)):
    margins = (int(margins), int(margins))
  try:
    pairs = [(m, m) if isinstance(m, (int, np.integer)) else tuple(m)
             for m in margins]
  except TypeError:
    raise TypeError(f"margins must be an int, two ints or ((top, bottom), "
                    f"(left, right)), got {margins!r}") from None
  if (len(pairs) != 2 or any(len(p) != 2 for p in pairs) or not all(
      isinstance(e, (int, np.integer)) and e >= 0 for p in pairs
      for e in p)):
    raise ValueError(f"margins must be non-negative: an int, two ints or "
                     f"((top, bottom), (left, right)), got {margins!r}")
  return tuple((int(a), int(b)) for a, b in pairs)  # type: ignore


@dataclasses.dataclass(frozen=True)
class Frame:
  """The static layout of a Framed activation.

  Attributes:
    batch, height, width, channels: the activation (N, H, W, C).
    margins: ((top, bottom), (left, right)) zero rows and columns around
      each image plane.
  """

  batch: int
  height: int
  width: int
  channels: int
  margins: tuple[tuple[int, int], tuple[int, int]]

  @property
  def plane_h(self) -> int:
    """Ha = top + H + bottom."""
    return self.height + sum(self.margins[0])

  @property
  def plane_w(self) -> int:
    """Wb = left + W + right, also the wide row width of a convolution
    that reads the frame."""
    return self.width + sum(self.margins[1])

  @property
  def plane_len(self) -> int:
    """Ha * Wb * N."""
    return self.plane_h * self.plane_w * self.batch

  @property
  def extra_planes(self) -> int:
    """Zero planes after the last channel: enough for a wide row and
    FRAME_SLACK positions of reads past the last plane's data."""
    return -(-(self.plane_w * self.batch + FRAME_SLACK) // self.plane_len)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """The data's shape: (C + extra_planes, Ha, Wb, N)."""
    return (self.channels + self.extra_planes, self.plane_h, self.plane_w,
            self.batch)

  @property
  def nhwc_shape(self) -> tuple[int, int, int, int]:
    return (self.batch, self.height, self.width, self.channels)

  def with_channels(self, channels: int) -> "Frame":
    return dataclasses.replace(self, channels=channels)

  @property
  def layout_geometry(self) -> cg.ConvGeometry:
    """A stride-1 1x1 convolution padded by the margins: its flat input
    (conv_geometry.to_flat_input, with extra_planes whole zero planes as its
    tail) is this frame's data, flattened."""
    return cg.ConvGeometry(
        batch=self.batch, in_h=self.height, in_w=self.width,
        in_channels=self.channels, out_channels=self.channels, kernel_h=1,
        kernel_w=1, strides=(1, 1), dilation=(1, 1), padding=self.margins,
        groups=1)

  @property
  def tail(self) -> int:
    """The zero planes' elements: the tail of layout_geometry's flat input."""
    return self.extra_planes * self.plane_len

  def output_layout(self) -> FramedOutput:
    """Where a convolution that reads a frame of this size (and keeps the
    map's size) writes the frame of its output."""
    (top, _), (left, _) = self.margins
    return FramedOutput(batch=self.batch, out_h=self.height,
                        row_width=self.plane_w, out_w=self.width, top=top,
                        left=left, plane_h=self.plane_h,
                        extra_planes=self.extra_planes)


@jax.tree_util.register_pytree_node_class
class Framed:
  """An activation in a frame: `data` (C + extra_planes, Ha, Wb, N) and
  its static `frame`. A pytree (the frame is static), so it passes through
  jit, grad and Flax modules."""

  def __init__(self, data, frame: Frame):
    if tuple(np.shape(data)) != frame.shape:
      raise ValueError(f"a frame of {frame} has shape {frame.shape}, got "
                       f"data of shape {np.shape(data)}")
    self.data = data
    self.frame = frame

  def tree_flatten(self):
    return (self.data,), self.frame

  @classmethod
  def tree_unflatten(cls, frame, children):
    obj = object.__new__(cls)
    obj.data, = children
    obj.frame = frame
    return obj

  @property
  def dtype(self):
    return self.data.dtype

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """The activation's (N, H, W, C), as from_frame returns it."""
    return self.frame.nhwc_shape

  def astype(self, dtype) -> "Framed":
    return Framed(self.data.astype(dtype), self.frame)

  def __repr__(self):
    return f"Framed({self.frame}, dtype={self.dtype})"


def frame_of(x_nhwc_shape, margins) -> Frame:
  """The Frame of an (N, H, W, C) activation with the given margins."""
  n, h, w, c = (int(d) for d in x_nhwc_shape)
  return Frame(batch=n, height=h, width=w, channels=c,
               margins=_margins(margins))


def _keeps_map_size(g: cg.ConvGeometry) -> bool:
  """Whether g's output is its input's size at stride 1: what a framed
  call needs, its output frame being the input's with other channels."""
  return g.strides == (1, 1) and (g.out_h, g.out_w) == (g.in_h, g.in_w)


def tightest_frame(g: cg.ConvGeometry) -> Frame | None:
  """The frame with margins equal to convolution g's padding, which g reads
  directly (check_reads); None where g reads no frame (a stride, a map that
  changes size, or negative padding)."""
  if not _keeps_map_size(g) or any(p < 0 for pair in g.padding
                                   for p in pair):
    return None
  return frame_of((g.batch, g.in_h, g.in_w, g.in_channels), g.padding)


def frame_data(x_nhwc: jax.Array, frame: Frame) -> jax.Array:
  """(N, H, W, C) -> the frame's data: the kernels' input layout pass
  (ops.flat_input: the Pallas layout kernel where it was measured faster
  than XLA's fusion, else XLA's) on the frame's layout_geometry."""
  from escort_jax.ops import flat_input  # ops reads frames: import here
  return flat_input(x_nhwc, frame.layout_geometry,
                    frame.tail).reshape(frame.shape)


def unframe_data(data: jax.Array, frame: Frame) -> jax.Array:
  """The frame's data -> (N, H, W, C): crop and transpose."""
  (top, _), (left, _) = frame.margins
  x = data[:frame.channels, top:top + frame.height,
           left:left + frame.width, :]
  return jnp.transpose(x, (3, 1, 2, 0))


def to_frame(x: jax.Array, margins=1, *, layout: str = "NHWC") -> Framed:
  """An activation (layout "NHWC" or "NCHW") as a Framed one whose margins
  (an int, two ints, or ((top, bottom), (left, right))) are at least the
  padding of every convolution that will read it."""
  if layout not in ("NHWC", "NCHW"):
    raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
  if np.ndim(x) != 4:
    raise ValueError(f"x must have rank 4 ({layout}), got shape "
                     f"{np.shape(x)}")
  x = jnp.asarray(x)
  if layout == "NCHW":
    x = jnp.transpose(x, (0, 2, 3, 1))
  frame = frame_of(x.shape, margins)
  return Framed(frame_data(x, frame), frame)


def from_frame(xf: Framed, *, layout: str = "NHWC") -> jax.Array:
  """A Framed activation back in layout "NHWC" or "NCHW"."""
  if not isinstance(xf, Framed):
    raise TypeError(f"from_frame takes a Framed activation, got "
                    f"{type(xf).__name__}")
  if layout not in ("NHWC", "NCHW"):
    raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
  x = unframe_data(xf.data, xf.frame)
  return jnp.transpose(x, (0, 3, 1, 2)) if layout == "NCHW" else x


def check_reads(frame: Frame, g: cg.ConvGeometry) -> None:
  """Raises ValueError unless convolution g can read `frame` directly and
  write the frame of its output: stride 1, output as large as the input,
  padding within the margins."""
  given = (g.batch, g.in_h, g.in_w, g.in_channels)
  if given != frame.nhwc_shape:
    raise ValueError(f"the frame holds {frame.nhwc_shape} (N, H, W, C), but "
                     f"the convolution's input is {given}")
  if not _keeps_map_size(g):
    raise ValueError(
        "a Framed input needs a convolution that keeps the map's size "
        f"(stride 1, 'SAME' padding): got strides {g.strides}, padding "
        f"{g.padding}, output {g.out_h}x{g.out_w} from {g.in_h}x{g.in_w}; "
        "use frames.from_frame and an NHWC convolution there")
  for (p_lo, p_hi), (m_lo, m_hi), axis in zip(g.padding, frame.margins,
                                              ("rows", "columns")):
    if p_lo > m_lo or p_hi > m_hi:
      raise ValueError(
          f"the convolution pads {(p_lo, p_hi)} {axis}, more than the "
          f"frame's margins {(m_lo, m_hi)}; make the frame with margins "
          "at least the padding of every convolution that reads it")


@functools.lru_cache(maxsize=1024)
def framed_offsets(structure: SparseStructure, g: cg.ConvGeometry,
                   frame: Frame) -> tuple[np.ndarray, np.ndarray]:
  """(rows, offsets): each nonzero's output channel (CSR order) and its
  source offset into the frame's flattened data, for wide output rows of
  the frame's width (check_reads(frame, g) must hold)."""
  k, c, r, s = structure.coordinates()
  (pad_top, _), (pad_left, _) = g.padding
  (top, _), (left, _) = frame.margins
  rows = r * g.dilation[0] - pad_top + top
  cols = s * g.dilation[1] - pad_left + left
  planes = cg.input_channels(k, c, g)
  offsets = ((planes.astype(np.int64) * frame.plane_h + rows) * frame.plane_w
             + cols) * frame.batch
  return k, offsets
