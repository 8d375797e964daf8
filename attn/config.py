"""Configuration of superlinear multi-step attention (N = 2)."""

from __future__ import annotations

import dataclasses
import math

from attn import powers
from attn._checks import is_int, is_real


# Coverage is verified exactly up to this context length (and asymptotically
# by the exponent rule beyond it).
_COVERAGE_CHECK_LEN = 1 << 22


@dataclasses.dataclass(frozen=True)
class SuperlinearConfig:
  """Static hyper-parameters of superlinear attention (see `docs/superlinear.md`).

  Notation of the reference: query at absolute position `q`, `t = q + 1`
  visible keys, `f(j) = floor(j ** (1 / search_power))`.

  Attributes:
    sw_index: `s`. The local window has `W = f(s + 1) - 1` keys
      (`(s + 1)**2 - 1` at `search_power = 0.5`); `s = 0` means no window.
    num_spans: `k`, the number of anchors kept by the top-k span-search.
    search_power: `p` in (0, 1]; a query scores about `t**p - s` anchors
      `a_j = q + 1 - f(j)`, `j = s + 1, s + 2, ...`.
    span_power: `sigma` in [0, 1]; spans grow like `t**sigma`.
    backward_factor: `bb`; a span reaches `ceil(bb * t**sigma)` keys before
      its anchor.
    forward_factor: `bf`; and `ceil(bf * t**sigma)` keys after it (clipped so
      that the span never overlaps the window).

  The defaults are the paper's balanced setting (`p = sigma = 1/2`) with
  `bb = 2`, the smallest backward factor for which every earlier key is a
  candidate of every query (random context access), a 63-key window and two
  spans. `__post_init__` rejects configurations that would structurally
  exclude keys (asymptotically that needs `sigma > 1 - p`, or `sigma = 1 - p`
  with `bb >= 1 / p`); `attn.superlinear_candidate_mask` checks coverage
  exactly at a given length.
  """

  sw_index: int = 7
  num_spans: int = 2
  search_power: float = 0.5
  span_power: float = 0.5
  backward_factor: float = 2.0
  forward_factor: float = 1.0

  def __post_init__(self):
    def bad(name, value, need):
      raise ValueError(f"SuperlinearConfig.{name}={value!r}: {need}.")

    if not is_int(self.sw_index) or self.sw_index < 0:
      bad("sw_index", self.sw_index, "must be an int >= 0 (0 = no window)")
    if not is_int(self.num_spans) or self.num_spans < 1:
      bad("num_spans", self.num_spans, "must be an int >= 1")
    for name in ("search_power", "span_power", "backward_factor", "forward_factor"):
      value = getattr(self, name)
      if not is_real(value) or not math.isfinite(value):
        bad(name, value, "must be a finite number")
    if not 0.0 < self.search_power <= 1.0:
      bad("search_power", self.search_power, "must lie in (0, 1]")
    if not 0.0 <= self.span_power <= 1.0:
      bad("span_power", self.span_power, "must lie in [0, 1]")
    if self.backward_factor < 0 or self.forward_factor < 0:
      bad("backward_factor/forward_factor",
          (self.backward_factor, self.forward_factor), "must be >= 0")
    # Normalise numpy scalars to Python numbers (hashing, printing, jit keys).
    for name in ("sw_index", "num_spans"):
      object.__setattr__(self, name, int(getattr(self, name)))
    for name in ("search_power", "span_power", "backward_factor", "forward_factor"):
      object.__setattr__(self, name, float(getattr(self, name)))
    p, sigma, bb = self.search_power, self.span_power, self.backward_factor
    # The window and the first num_spans stripes must be int32 positions
    # (exact integers in the tables): f(s + k) = floor((s + k)**(1/p)).
    j = self.sw_index + self.num_spans
    if powers.stripe_offsets(j, p)[-1] >= powers.STRIPE_BEYOND:
      p_min = math.log(j) / math.log(powers.STRIPE_BEYOND)
      raise ValueError(
          f"SuperlinearConfig.search_power={p!r}: with sw_index={self.sw_index} and "
          f"num_spans={self.num_spans} the stripe offset f({j}) = floor({j} ** "
          f"(1/search_power)) exceeds 2**31 - 1, so the window and the {self.num_spans} "
          f"nearest stripes cannot be int32 positions: use search_power > "
          f"{math.ceil(p_min * 1e4) / 1e4:g} (valid range ({p_min:.4g}, 1]), or a "
          "smaller sw_index + num_spans.")
    # Interior gap between stripes j and j+1 is ~ (1/p) j**(1/p - 1) ~ (1/p)
    # t**(1 - p); the left edge is only reached by the backward extension
    # ~ bb t**sigma.  Below these bounds coverage fails for long contexts.
    if p < 1.0 and (sigma < 1.0 - p - 1e-12 or
                    (abs(sigma - (1.0 - p)) <= 1e-12 and bb < 1.0 / p - 1e-12)):
      raise ValueError(
          f"SuperlinearConfig(search_power={p}, span_power={sigma}, "
          f"backward_factor={bb}) leaves keys that no span can reach (no random "
          f"context access): use span_power > 1 - search_power, or span_power = "
          f"1 - search_power with backward_factor >= 1 / search_power "
          f"(= {1.0 / p:g}).")

    hole = powers.first_hole(_COVERAGE_CHECK_LEN, search_power=p, sw_index=self.sw_index,
                             span_power=sigma, backward_factor=bb)
    if hole is not None:
      raise ValueError(
          f"{self} leaves keys that no span can reach from the query at position "
          f"{hole - 1} (no random context access): raise backward_factor or "
          "span_power.")

  @property
  def window(self) -> int:
    """`W`, the number of keys of the local window (0 when `sw_index = 0`)."""
    return int(powers.stripe_offsets(self.sw_index + 1, self.search_power)[-1]) - 1
