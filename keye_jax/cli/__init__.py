"""The `keye` command (also `python -m keye_jax`): parses arguments and calls the parts.

Progress goes to stderr; each command that has a result prints it as one JSON object, the last line on
stdout. Heavy imports happen inside each command so `keye --help` is instant.

Exit codes: 0 done; 1 the command ran but its check failed (plan does not fit, verify above tolerance,
data check above the bad fraction); 2 bad input (a one-line error naming the file/key, no traceback);
130 interrupted (Ctrl-C; training saves a checkpoint first).
Paths given here (arguments and `key=value` overrides) resolve against the current directory; paths
written inside a config file resolve against that file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _finite(x):
  """Non-finite floats (a NaN loss) become null: the result line stays valid JSON."""
  if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
    return None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


def _emit(result: dict) -> None:
  print(json.dumps(_finite(result), allow_nan=False), flush=True)


def _convert(args) -> int:
  from checkpoints_convert import convert, init
  if args.what == "to-orbax":
    _emit(convert.to_orbax(args.src, args.out, dtype=args.dtype))
  elif args.what == "to-hf":
    _emit(convert.to_hf(args.src, args.out))
  else:
    _emit(init.init(args.src, vision_dir=args.vision, text_dir=args.text, seed=args.seed, dtype=args.dtype))
  return 0


def _verify(args) -> int:
  from checkpoints_convert import verify
  result = verify.verify(args.ckpt, golden=args.golden, hf_dir=args.hf_dir, atol=args.atol,
                         trust_remote_code=args.trust_remote_code)
  _emit(result)
  return 0 if result["ok"] else 1


def _data(args) -> int:
  if args.what == "demo":
    from keye_jax.processing.tokenizer import build_demo_tokenizer
    from train.data.demo import write_demo_dataset
    result = write_demo_dataset(args.path, seed=args.seed)
    build_demo_tokenizer(os.path.join(args.path, "tokenizer"))  # what the demo stage configs read
    _emit(result)
    return 0
  from train.data.check import check_source
  result = check_source(args.path)
  bad = sum(result["bad"].values())
  _emit(result)
  if result["total"] == 0 or bad > args.max_bad_fraction * result["total"]:
    print(f"keye data check: {bad} of {result['total']} samples are bad, above --max-bad-fraction "
          f"{args.max_bad_fraction}", file=sys.stderr)
    return 1
  return 0


def _train(args) -> int:
  from train import stages
  result = stages.run(args.config, args.overrides)
  _emit(result)
  return 130 if result.get("signal") == "SIGINT" else 0


def _plan(args) -> int:
  from train import plan
  from train.rl.config import is_rl_config
  if is_rl_config(args.config):
    from train.rl import plan
  result = plan.plan(args.config, args.topology, args.overrides)
  _emit(result)
  return 0 if result["fits"] else 1


def _generate(args) -> int:
  from keye_jax import checkpoint_io
  from keye_jax.cli.generate import generate_cli
  from keye_jax.generate import encode_messages
  from keye_jax.processing.tokenizer import load_tokenizer
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
  if not args.temperature >= 0:
    raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
  ref = checkpoint_io.resolve(args.ckpt)
  tokenizer = load_tokenizer(checkpoint_io.tokenizer_dir(ref))
  cfg = checkpoint_io.model_config(ref)
  content = ([{"type": "image", "image": os.path.abspath(p)} for p in args.image]
             + [{"type": "video", "video": os.path.abspath(p)} for p in args.video]
             + [{"type": "text", "text": args.prompt}])
  prompt = encode_messages([{"role": "user", "content": content}], tokenizer)  # images over max_pixels shrink
  limit = cfg.text.max_position_embeddings
  if len(prompt.input_ids) + args.max_new_tokens > limit:
    raise ValueError(f"the prompt is {len(prompt.input_ids)} tokens and --max-new-tokens is {args.max_new_tokens}: "
                     f"together more than the model's {limit} positions (at most {limit - args.max_new_tokens} "
                     "prompt tokens; use smaller images/videos or fewer new tokens)")
  _, model = checkpoint_io.load_model(ref, args.override)
  result = generate_cli(model, tokenizer, args.prompt, images=args.image, videos=args.video,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        seed=args.seed, stream=lambda s: print(s, end="", file=sys.stderr, flush=True))
  print(file=sys.stderr)
  _emit(result)
  return 0


def _eval(args) -> int:
  from keye_jax import checkpoint_io
  from keye_jax.evaluate import run_eval
  from keye_jax.evaluate.harness import adapter, checkpoint_identity
  from keye_jax.processing.tokenizer import load_tokenizer
  mod = adapter(args.benchmark)  # an unknown benchmark or a missing judge fails before any model loads
  if args.limit is not None and args.limit < 1:
    raise ValueError(f"--limit must be at least 1, got {args.limit}")
  if args.judge_cmd and args.judge_ckpt:
    raise ValueError("give one judge: --judge-cmd or --judge-ckpt")
  if getattr(mod, "NEEDS_JUDGE", False) and not (args.judge_cmd or args.judge_ckpt):
    raise ValueError(f"{mod.NAME} is scored by a judge: give --judge-cmd CMD or --judge-ckpt CKPT")
  if not os.path.exists(args.data):
    raise FileNotFoundError(f"--data {args.data}: no such file or directory")

  def identity(ref) -> str:
    if ref.kind == "converted":
      return checkpoint_identity(ref.path)
    return checkpoint_identity(os.path.join(ref.path, checkpoint_io.RUN_CHECKPOINTS, str(ref.step)))

  ref = checkpoint_io.resolve(args.ckpt)  # a converted checkpoint or a run dir, relative or absolute
  judge = judge_name = None
  if args.judge_ckpt:
    from keye_jax.evaluate.mia_bench import sampler_judge
    from keye_jax.generate import Sampler, encode_messages
    jref = checkpoint_io.resolve(args.judge_ckpt)
    jtok = load_tokenizer(checkpoint_io.tokenizer_dir(jref))
    _, jmodel = checkpoint_io.load_model(jref, args.override)
    judge = sampler_judge(Sampler(jmodel, jtok), lambda m: encode_messages(m, jtok, thinking=False))
    judge_name = f"ckpt:{identity(jref)}"

  def load():  # only once the data has loaded and something is left to generate
    return checkpoint_io.load_model(ref, args.override)[1], load_tokenizer(checkpoint_io.tokenizer_dir(ref))

  _emit(run_eval(None, None, args.benchmark, args.data, args.out, batch_size=args.batch_size,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                 judge_cmd=args.judge_cmd, judge=judge, judge_name=judge_name, limit=args.limit,
                 checkpoint=identity(ref), overwrite=args.overwrite, load_model=load))
  return 0


def _merge(args) -> int:
  from train import merge
  _emit(merge.merge(args.ckpts, args.weights, args.out))
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="keye", description="Keye-VL 1.5 in JAX: convert, verify, train, generate, eval.")
  sub = p.add_subparsers(dest="command", required=True)

  c = sub.add_parser("convert", help="checkpoint conversion")
  csub = c.add_subparsers(dest="what", required=True)
  a = csub.add_parser("to-orbax", help="HF checkpoint dir -> Orbax checkpoint dir")
  a.add_argument("src", metavar="HF_DIR")
  a.add_argument("out", metavar="OUT_DIR")
  a.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  a = csub.add_parser("to-hf", help="Orbax checkpoint dir -> HF layout")
  a.add_argument("src", metavar="ORBAX_DIR")
  a.add_argument("out", metavar="OUT_DIR")
  a = csub.add_parser("init", help="stage-1 start: SigLIP vision + Qwen3 text + fresh projector")
  a.add_argument("src", metavar="OUT_DIR")
  a.add_argument("--vision", required=True, metavar="SIGLIP_DIR")
  a.add_argument("--text", required=True, metavar="QWEN3_DIR")
  a.add_argument("--seed", type=int, default=0)
  a.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  a.set_defaults(out=None)
  c.set_defaults(fn=_convert)

  v = sub.add_parser("verify", help="compare our logits with golden logits or the checkpoint's own PyTorch code")
  v.add_argument("ckpt", metavar="ORBAX_DIR")
  v.add_argument("golden", nargs="?", metavar="GOLDEN.npz")
  v.add_argument("--hf-dir", default=None)
  v.add_argument("--atol", type=float, default=1e-3)
  v.add_argument("--trust-remote-code", action="store_true",
                 help="with --hf-dir: allow running the checkpoint directory's own Python modeling code")
  v.set_defaults(fn=_verify)

  d = sub.add_parser("data", help="datasets")
  dsub = d.add_subparsers(dest="what", required=True)
  a = dsub.add_parser("demo", help="write the synthetic demo dataset")
  a.add_argument("path", metavar="OUT_DIR")
  a.add_argument("--seed", type=int, default=0)
  a = dsub.add_parser("check", help="decode every sample of a source and report bad ones")
  a.add_argument("path", metavar="SOURCE")
  a.add_argument("--max-bad-fraction", type=float, default=0.05,
                 help="exit 1 when more than this fraction of the samples is bad (data.max_bad_fraction)")
  d.set_defaults(fn=_data)

  t = sub.add_parser("train", help="train from a stage or all-stages YAML config")
  t.add_argument("config")
  t.add_argument("overrides", nargs="*", metavar="key.sub=value")
  t.set_defaults(fn=_train)

  pl = sub.add_parser("plan", help="AOT-compile the training step for a TPU topology and report memory")
  pl.add_argument("config")
  pl.add_argument("--topology", required=True, help="e.g. v5p:4x4x4")
  pl.add_argument("overrides", nargs="*", metavar="key.sub=value")
  pl.set_defaults(fn=_plan)

  from keye_jax.cli import rl
  rl.add_parser(sub)

  g = sub.add_parser("generate", help="generate an answer for a prompt with optional images/videos")
  g.add_argument("ckpt", metavar="CKPT")
  g.add_argument("--prompt", required=True)
  g.add_argument("--image", action="append", default=[])
  g.add_argument("--video", action="append", default=[])
  g.add_argument("--max-new-tokens", type=int, default=128)
  g.add_argument("--temperature", type=float, default=0.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--override", action="append", default=[], metavar="key=value",
                 help="model config override, e.g. dtype=bfloat16")
  g.set_defaults(fn=_generate)

  e = sub.add_parser("eval", help="score a benchmark")
  e.add_argument("ckpt", metavar="CKPT")
  e.add_argument("--benchmark", required=True)
  e.add_argument("--data", required=True)
  e.add_argument("--out", required=True)
  e.add_argument("--override", action="append", default=[], metavar="key=value")
  e.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N items")
  e.add_argument("--batch-size", type=int, default=8)
  e.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's own")
  e.add_argument("--temperature", type=float, default=0.0)
  e.add_argument("--seed", type=int, default=0,
                 help="sampling seed (with --temperature > 0); other seeds give other samples, for pass@k")
  e.add_argument("--judge-cmd", default=None, metavar="CMD",
                 help="judge for MIA-Bench: a shell command reading the grading prompt on stdin (image paths "
                      "in $KEYE_JUDGE_IMAGES), replying on stdout")
  e.add_argument("--judge-ckpt", default=None, metavar="CKPT", help="judge for MIA-Bench: one of our checkpoints")
  e.add_argument("--overwrite", action="store_true",
                 help="recompute when --out holds predictions of another checkpoint or other settings")
  e.set_defaults(fn=_eval)

  m = sub.add_parser("merge", help="weighted average of checkpoints")
  m.add_argument("ckpts", nargs="+", metavar="CKPT")
  m.add_argument("--weights", nargs="+", type=float, required=True)
  m.add_argument("--out", required=True)
  m.set_defaults(fn=_merge)

  from keye_jax.cli import cot
  cot.add_parser(sub)
  return p


def main(argv: list[str] | None = None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  # `key=value` overrides may also follow options (`keye plan CONFIG --topology T model.remat=full`).
  if extra:
    if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
      args.overrides = list(args.overrides) + extra
    else:
      parser.error(f"unrecognized arguments: {' '.join(extra)}")
  _cpu_only_without_accelerators(args.command)
  if args.command in ("train", "rl"):
    from keye_jax import cpu_ops
    cpu_ops.prepare_host()  # before the command creates JAX's CPU client
  try:
    return args.fn(args)
  except KeyboardInterrupt:
    print(f"\nkeye {args.command}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:
    if not isinstance(e, _user_errors()):
      raise  # a bug: the traceback is what is needed
    # Bad input (config keys, checkpoint tensors, media, data): one clear line, no traceback.
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"keye {args.command}: error: {message}", file=sys.stderr)
    return 2


def _cpu_only_without_accelerators(command: str) -> None:
  """On a machine with no TPU or GPU device, JAX would try libtpu (installed for `keye plan`) and print a
  screen of TPU warnings before falling back to the CPU: go straight to the CPU instead. `keye plan` keeps
  libtpu (its ahead-of-time compiles need it); a JAX_PLATFORMS the user set, or JAX already imported by
  the caller, is left alone."""
  from keye_jax.host_memory import runs_on_cpu
  if command != "plan" and "jax" not in sys.modules and not os.environ.get("JAX_PLATFORMS") and runs_on_cpu():
    os.environ["JAX_PLATFORMS"] = "cpu"


def _user_errors() -> tuple[type, ...]:
  """Exceptions that report bad input or an unusable environment (their message says what to fix)."""
  types = [ValueError, OSError, KeyError, ImportError]
  for module, name in (("train.data.pipeline", "DataError"), ("train.loop", "NonFiniteError")):
    if module in sys.modules:
      types.append(getattr(sys.modules[module], name))
  return tuple(types)


if __name__ == "__main__":
  sys.exit(main())
