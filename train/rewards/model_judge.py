"""A judge that is one of our checkpoints: `judge(prompts) -> replies`, run by our sampler.

The `judge`, `grounded` and `pairwise` rewards take any such callable (train/rewards/judge.py). This
module makes one from a checkpoint (a converted directory or a training run directory, e.g. the pairwise
reward model trained by SFT on `pair_sft_records`, see train/rewards/rm_data.py) or from a sampler that
already exists (e.g. the RL loop's, on a sub-batch of the same mesh):

  judge = judge_from_checkpoint("runs/rm", max_new_tokens=64, thinking=False)
  replies = judge(["...judging prompt...", ...])

A reward config names the checkpoint instead of a callable, and the registry builds the judge:

  rewards:
    - {name: pairwise, ckpt: runs/rm, ckpt_options: {max_new_tokens: 64, thinking: false}}
    - {name: judge, aspect: safety, ckpt: runs/judge}

Each prompt is one user turn; `thinking` appends the Keye mode suffix the judge was trained with
(" /think", " /no_think"; None: none, the model chooses) and the reply is decoded greedily by default.
Replies come back as text: the rewards parse them and count the ones they cannot parse. One checkpoint
with the same options is loaded once per process (several rewards may share it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SUFFIX = {True: " /think", False: " /no_think", None: ""}
_LOADED: dict = {}


def sampler_judge(sampler, tokenizer, *, max_new_tokens: int = 512, temperature: float = 0.0,
                  thinking: bool | None = False, seed: int = 0):
  """judge(prompts) -> replies over an existing keye_jax.generate.Sampler (its model and mesh)."""
  from keye_jax.generate import SamplingParams, encode_messages
  params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
  suffix = SUFFIX[thinking]

  def judge(prompts: Sequence[str]) -> list[str]:
    if not prompts:
      return []
    encoded = [encode_messages([{"role": "user", "content": [{"type": "text", "text": str(p) + suffix}]}],
                               tokenizer, thinking=thinking) for p in prompts]
    return [g.text for g in sampler.generate(encoded, params)]

  judge.sampler = sampler
  return judge


def judge_from_checkpoint(path: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
                          thinking: bool | None = False, seed: int = 0, mesh=None, overrides: Sequence[str] = ()):
  """judge(prompts) -> replies from a checkpoint argument (converted dir or run dir, see
  keye_jax/checkpoint_io.py), loaded once per process for the same path and options."""
  from keye_jax import checkpoint_io
  ref = checkpoint_io.resolve(path)  # a missing or malformed checkpoint is one clear error here
  key = (ref.path, ref.step, max_new_tokens, temperature, thinking, seed, id(mesh), tuple(overrides))
  if key not in _LOADED:
    from keye_jax.generate import Sampler
    from keye_jax.processing.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(checkpoint_io.tokenizer_dir(ref))
    _, model = checkpoint_io.load_model(path, list(overrides))
    judge = sampler_judge(Sampler(model, tokenizer, mesh=mesh), tokenizer, max_new_tokens=max_new_tokens,
                          temperature=temperature, thinking=thinking, seed=seed)
    judge.checkpoint = ref.describe()
    _LOADED[key] = judge
  return _LOADED[key]


def with_checkpoint_judge(options: Mapping) -> dict:
  """A reward's options with `ckpt` (and optional `ckpt_options`) replaced by `judge=` the checkpoint's
  judge callable; other options unchanged."""
  options = dict(options)
  path = options.pop("ckpt")
  extra = options.pop("ckpt_options", None) or {}
  if not isinstance(extra, Mapping):
    raise ValueError(f"ckpt_options: expected a mapping, got {type(extra).__name__}")
  if options.get("judge") is not None or options.get("cmd") is not None:
    raise ValueError("give one judge: 'ckpt', 'cmd' or 'judge'")
  known = {"max_new_tokens", "temperature", "thinking", "seed", "overrides"}
  unknown = sorted(set(extra) - known)
  if unknown:
    raise ValueError(f"ckpt_options: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
  options["judge"] = judge_from_checkpoint(str(path), **extra)
  return options
