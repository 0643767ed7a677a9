"""`keye generate`: one user turn (images, then videos, then the text) through the sampler, streamed."""

from __future__ import annotations

from typing import Callable, Sequence

from keye_jax.generate import Sampler, SamplingParams, encode_messages
from keye_jax.model import KeyeVL


def generate_cli(model: KeyeVL, tokenizer, prompt: str, images: Sequence[str] = (), videos: Sequence[str] = (),
                 max_new_tokens: int = 512, temperature: float = 0.0, stream: Callable[[str], None] | None = None,
                 *, top_k: int = 0, top_p: float = 1.0, seed: int = 0, processor=None, mesh=None,
                 sampler: Sampler | None = None) -> dict:
  """The answer to one prompt, its text streamed to `stream` as it is produced.
  Returns {"text", "tokens", "thinking", "answer", "finish_reason"}."""
  content = ([{"type": "image", "image": p} for p in images] + [{"type": "video", "video": p} for p in videos]
             + [{"type": "text", "text": prompt}])
  p = encode_messages([{"role": "user", "content": content}], tokenizer, processor)
  sampler = sampler or Sampler(model, tokenizer, mesh=mesh)
  params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed)
  g = sampler.generate([p], params, stream=(lambda _, s: stream(s)) if stream is not None else None)[0]
  return {"text": g.text, "tokens": len(g.tokens), "thinking": g.thinking, "answer": g.answer,
          "finish_reason": g.finish_reason}
