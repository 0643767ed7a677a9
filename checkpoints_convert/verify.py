"""`keye verify`: run our model on a golden file's inputs and compare with its logits.

Golden `.npz` (interfaces.md): input_ids (S,) or (B, S); optional attention_mask; optional pixel_values
(N, 3, 14, 14) + image_grid_thw (n, 3); optional pixel_values_videos + video_grid_thw (reference rows:
equal consecutive frames may be run-length merged, t > 1); logits (S, V) or (B, S, V); optional
position_ids (3, S) or (3, B, S), compared exactly.
With `--hf-dir`, the golden is made first by the checkpoint's own PyTorch code: transformers imports and runs
the Python files in HF_DIR (modeling_*.py, configuration_*.py: trust_remote_code, offline), so it needs
torch + transformers and the explicit `--trust-remote-code`. The reference is refused when any of its weights
or non-persistent buffers (rotary frequencies) would be left uninitialised, naming them: a half-random
reference would report a large difference that looks like our bug.
"""

from __future__ import annotations

import numpy as np

from keye_jax.checkpoint_io import CheckpointError
from keye_jax.processing.positions import batch_position_ids
from keye_jax.processing.vision_layout import split_grid_thw, vision_layout


def _blocks(pixels, grid_thw, kind: str):
  """Reference pixels + grid rows -> list of (kind, (h, w), patches (h*w, C*p*p)) per image/frame."""
  if pixels is None or grid_thw is None:
    return []
  grids = split_grid_thw(grid_thw)
  flat = np.asarray(pixels, np.float32).reshape(len(pixels), -1)
  sizes = grids[:, 0] * grids[:, 1]
  if int(sizes.sum()) != len(flat):
    raise CheckpointError(f"golden: {kind} grids hold {int(sizes.sum())} patches but pixel values have {len(flat)}")
  starts = np.concatenate([[0], np.cumsum(sizes)])
  return [(kind, (int(h), int(w)), flat[starts[i]:starts[i + 1]]) for i, (h, w) in enumerate(grids)]


def golden_batch(golden: dict, cfg, bucket: int = 64) -> tuple[dict, np.ndarray]:
  """Our batch (numpy) and the (B, S) real-token mask from reference-style inputs."""
  ids = np.asarray(golden["input_ids"])
  ids = ids[None] if ids.ndim == 1 else ids
  mask = np.asarray(golden.get("attention_mask", np.ones_like(ids))).reshape(ids.shape).astype(bool)
  merge = cfg.vision.spatial_merge_size if cfg.vision is not None else 2
  queues = {"image": _blocks(golden.get("pixel_values"), golden.get("image_grid_thw"), "image"),
            "video": _blocks(golden.get("pixel_values_videos"), golden.get("video_grid_thw"), "video")}
  token_of = {"image": cfg.image_token_id, "video": cfg.video_token_id}
  rows = []
  for i in range(len(ids)):
    # Each kind's blocks are consumed in order; the row's vision stream interleaves them by position.
    placed = []
    for kind, queue in queues.items():
      where = np.flatnonzero((ids[i] == token_of[kind]) & mask[i])
      used = 0
      while used < len(where):
        if not queue:
          raise CheckpointError(f"golden: row {i} has more {kind} pad tokens than the {kind} grids hold")
        block = queue.pop(0)
        placed.append((int(where[used]), block))
        used += block[1][0] * block[1][1] // (merge * merge)
    rows.append([b for _, b in sorted(placed, key=lambda x: x[0])])
  leftover = {k: len(q) for k, q in queues.items() if q}
  if leftover:
    raise CheckpointError(f"golden: grids left without pad tokens: {leftover}")

  grids_per_row = [np.array([b[1] for b in row], np.int64).reshape(-1, 2) for row in rows]
  positions, _ = batch_position_ids(ids, mask, grids_per_row, (cfg.image_token_id, cfg.video_token_id), merge)
  batch = dict(input_ids=ids.astype(np.int32), segment_ids=mask.astype(np.int32), position_ids=positions)
  if any(rows):
    k = rows[[len(r) > 0 for r in rows].index(True)][0][2].shape[1]
    n_patches = max(sum(len(b[2]) for b in row) for row in rows)
    p = max(bucket, -(-n_patches // bucket) * bucket)
    pix = np.zeros((len(ids), p, k), np.float32)
    layouts = []
    for i, row in enumerate(rows):
      if row:
        stream = np.concatenate([b[2] for b in row])
        pix[i, :len(stream)] = stream
      layouts.append(vision_layout(grids_per_row[i], p, merge))
    batch.update(pixel_values=pix, **{key: np.stack([lay[key] for lay in layouts]) for key in layouts[0]})
  return batch, mask


def compare(ours: np.ndarray, golden: np.ndarray, mask: np.ndarray) -> dict:
  """Max abs difference, mean KL(golden || ours) and top-1 agreement over real tokens."""
  a = np.asarray(ours, np.float64)[mask]
  b = np.asarray(golden, np.float64)[mask]
  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  la, lb = log_softmax(a), log_softmax(b)
  kl = float((np.exp(lb) * (lb - la)).sum(-1).mean())
  return {"max_abs_diff": float(np.abs(a - b).max()), "kl": kl,
          "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def run_model(model, cfg, batch) -> np.ndarray:
  import jax
  from flax import nnx
  from keye_jax.model import check_vision_counts
  if "pixel_values" in batch:
    check_vision_counts(batch, cfg)
  return np.asarray(nnx.jit(lambda m, b: m(b))(model, jax.tree.map(jax.numpy.asarray, batch)))


def _import_reference():
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ModuleNotFoundError(f"keye verify --hf-dir runs the checkpoint's PyTorch code and needs {e.name}: "
                              "pip install torch transformers (the versions in requirements-test.txt)") from None
  return torch, transformers


def buffers_as_built(model) -> dict:
  """Name -> value of the model's non-persistent floating-point buffers as its own __init__ computes them:
  the class built again from its config with every parameter moved to the meta device as it is registered
  (one module's parameters exist at a time), buffers real."""
  import torch
  register = torch.nn.Module.register_parameter

  def to_meta(module, name, param):
    register(module, name, param)
    if param is not None:
      module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
  torch.nn.Module.register_parameter = to_meta
  try:
    fresh = type(model)(model.config)
  finally:
    torch.nn.Module.register_parameter = register
  persistent = set(fresh.state_dict())
  return {n: b for n, b in fresh.named_buffers() if n not in persistent and b.is_floating_point()}


def check_loading(info: dict, model, hf_dir: str, built: dict | None = None) -> None:
  """Refuses a reference whose weights or non-persistent buffers were not all loaded/initialised. The
  release's tensors that the model does not use (rules.UNUSED_PATTERNS) may be unexpected to its code.
  `built`: the non-persistent buffers as the model's __init__ computes them (`buffers_as_built`)."""
  from checkpoints_convert.rules import canonical_name, is_unused
  problems = []
  for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "mismatched")):
    names = sorted(str(k if isinstance(k, str) else k[0]) for k in (info or {}).get(key) or [])
    if key == "unexpected_keys":
      names = [n for n in names if not is_unused(canonical_name(n))]
    if names:
      problems.append(f"{len(names)} {what} weights ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
  # Non-persistent buffers (rotary inverse frequencies) are not in the checkpoint: transformers builds the
  # model on the meta device and gives them raw memory (torch.empty), which only a module its
  # _init_weights knows gets recomputed. Compared with the values __init__ computes; without those,
  # raw memory is caught only when it reads as non-finite or all-zero.
  import torch
  persistent = set(model.state_dict())
  bad_buffers = []
  for name, buf in model.named_buffers():
    if name in persistent or not buf.is_floating_point() or buf.numel() == 0:
      continue
    if buf.device.type == "meta" or not bool(buf.isfinite().all()) or not bool(buf.abs().sum() > 0):
      bad_buffers.append(name)
    elif built is not None and name in built and (
        built[name].shape != buf.shape
        or not torch.allclose(buf.double(), built[name].double(), rtol=1e-5, atol=0)):
      bad_buffers.append(name)
  if bad_buffers:
    problems.append(f"uninitialised buffers ({', '.join(bad_buffers[:3])}{', ...' if len(bad_buffers) > 3 else ''})")
  if problems:
    raise CheckpointError(f"{hf_dir}: the reference code does not load this checkpoint completely: "
                          f"{'; '.join(problems)} (its remote code and transformers version disagree on names)")


def golden_from_hf(hf_dir: str, cfg, seed: int = 0) -> dict:
  """A golden made by the checkpoint's own modeling code (trust_remote_code, no network): a prompt with
  text, one image and a two-frame video of random pixels, in fp32."""
  torch, transformers = _import_reference()
  rng = np.random.default_rng(seed)
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, trust_remote_code=True, local_files_only=True, torch_dtype=torch.float32,
      output_loading_info=True)
  model = model.eval()
  check_loading(info, model, hf_dir, buffers_as_built(model))
  p = cfg.vision.patch_size
  image_grid = np.array([[1, 4, 6]])                 # 6 merged tokens
  video_grid = np.array([[1, 4, 4], [1, 2, 2]])      # a 4-token frame, then a 1-token frame
  n_img, n_vid = 24, 16 + 4
  special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
             cfg.bos_token_id, cfg.eos_token_id}
  vocab = [t for t in range(min(cfg.text.vocab_size, 1000)) if t not in special]
  text = lambda n: [int(t) for t in rng.choice(vocab, n)]
  ids = (text(3) + [cfg.vision_start_token_id] + [cfg.image_token_id] * 6 + [cfg.vision_end_token_id] + text(2)
         + [cfg.vision_start_token_id] + text(4) + [cfg.video_token_id] * 4 + text(4) + [cfg.video_token_id]
         + [cfg.vision_end_token_id] + text(3))
  golden = dict(input_ids=np.array(ids, np.int64),
                pixel_values=rng.standard_normal((n_img, 3, p, p)).astype(np.float32),
                image_grid_thw=image_grid,
                pixel_values_videos=rng.standard_normal((n_vid, 3, p, p)).astype(np.float32),
                video_grid_thw=video_grid)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(golden["input_ids"])[None],
                pixel_values=torch.tensor(golden["pixel_values"]),
                image_grid_thw=torch.tensor(image_grid),
                pixel_values_videos=torch.tensor(golden["pixel_values_videos"]),
                video_grid_thw=torch.tensor(video_grid))
  golden["logits"] = out.logits[0].float().numpy()
  return golden


def verify(ckpt_dir: str, golden: str | None = None, hf_dir: str | None = None, atol: float = 1e-3,
           trust_remote_code: bool = False) -> dict:
  from keye_jax.checkpoint_io import load_model
  if (golden is None) == (hf_dir is None):
    raise ValueError("give a GOLDEN.npz or --hf-dir (exactly one)")
  if hf_dir is not None and not trust_remote_code:
    raise ValueError(f"--hf-dir runs the Python modeling code in {hf_dir} (trust_remote_code); pass "
                     "--trust-remote-code to allow it")
  cfg, model = load_model(ckpt_dir, ["dtype=float32"])
  if golden is not None:
    try:
      with np.load(golden) as f:
        data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{golden}: cannot read golden file ({e})") from e
  else:
    data = golden_from_hf(hf_dir, cfg)
  for key in ("input_ids", "logits"):
    if key not in data:
      raise CheckpointError(f"{golden or hf_dir}: golden has no {key!r}")
  batch, mask = golden_batch(data, cfg)
  ours = run_model(model, cfg, batch)
  want = np.asarray(data["logits"]).reshape(ours.shape[:2] + (-1,))
  if want.shape != ours.shape:
    raise CheckpointError(f"golden logits shape {want.shape} != model logits shape {ours.shape}")
  result = compare(ours, want, mask)
  if "position_ids" in data:
    gp = np.asarray(data["position_ids"]).reshape(3, *batch["input_ids"].shape)
    result["position_ids_equal"] = bool(np.array_equal(gp[:, mask], batch["position_ids"][:, mask]))
  else:
    result["position_ids_equal"] = None
  result["ok"] = result["max_abs_diff"] <= atol and result["position_ids_equal"] is not False
  return result

