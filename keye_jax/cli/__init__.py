"""The `keye` command (also `python -m keye_jax`): parses arguments and calls the parts.

Progress goes to stderr; each command that has a result prints it as one JSON object, the last line on
stdout. Heavy imports happen inside each command so `keye --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _emit(result: dict) -> None:
  print(json.dumps(result), flush=True)


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
  result = verify.verify(args.ckpt, golden=args.golden, hf_dir=args.hf_dir, atol=args.atol)
  _emit(result)
  return 0 if result["ok"] else 1


def _data(args) -> int:
  if args.what == "demo":
    from train.data.demo import write_demo_dataset
    _emit(write_demo_dataset(args.path, seed=args.seed))
  else:
    from train.data.check import check_source
    _emit(check_source(args.path))
  return 0


def _train(args) -> int:
  from train import loop
  _emit(loop.run(args.config, args.overrides))
  return 0


def _plan(args) -> int:
  from train import plan
  result = plan.plan(args.config, args.topology, args.overrides)
  _emit(result)
  return 0 if result["fits"] else 1


def _generate(args) -> int:
  from checkpoints_convert import load_model
  from keye_jax.cli.generate import generate_cli
  from keye_jax.processing.tokenizer import load_tokenizer
  _, model = load_model(args.ckpt, args.override)
  tokenizer = load_tokenizer(args.ckpt)
  result = generate_cli(model, tokenizer, args.prompt, images=args.image, videos=args.video,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        seed=args.seed, stream=lambda s: print(s, end="", file=sys.stderr, flush=True))
  print(file=sys.stderr)
  _emit(result)
  return 0


def _eval(args) -> int:
  from checkpoints_convert import load_model
  from keye_jax.evaluate import run_eval
  from keye_jax.processing.tokenizer import load_tokenizer
  _, model = load_model(args.ckpt, args.override)
  tokenizer = load_tokenizer(args.ckpt)
  _emit(run_eval(model, tokenizer, args.benchmark, args.data, args.out))
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
  v.set_defaults(fn=_verify)

  d = sub.add_parser("data", help="datasets")
  dsub = d.add_subparsers(dest="what", required=True)
  a = dsub.add_parser("demo", help="write the synthetic demo dataset")
  a.add_argument("path", metavar="OUT_DIR")
  a.add_argument("--seed", type=int, default=0)
  a = dsub.add_parser("check", help="decode every sample of a source and report bad ones")
  a.add_argument("path", metavar="SOURCE")
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
  if args.command == "train":
    from keye_jax import host_memory
    if host_memory.runs_on_cpu():
      host_memory.keep_freed_memory()  # before the command creates JAX's CPU client
  try:
    return args.fn(args)
  except (ValueError, FileNotFoundError, KeyError) as e:
    # Bad input (config keys, checkpoint tensors, media): one clear line, no traceback.
    print(f"keye {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
