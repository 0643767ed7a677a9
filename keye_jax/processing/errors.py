"""The one exception type of the preprocessing package."""

from __future__ import annotations


class MediaError(ValueError):
  """An image, video or message element cannot be used; the message names the source and the reason."""

  def __init__(self, source, reason: str):
    self.source = _describe(source)
    self.reason = reason
    super().__init__(f"{self.source}: {reason}")


def _describe(source) -> str:
  if isinstance(source, str):
    return source if len(source) <= 200 else source[:200] + "..."
  if isinstance(source, (bytes, bytearray)):
    return f"<{len(source)} bytes>"
  return f"<{type(source).__name__}>"
