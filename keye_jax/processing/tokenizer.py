"""Tokenizer: a checkpoint's tokenizer.json through the `tokenizers` library, Keye special tokens by name,
and the small byte-level BPE used by the tests and the demo (trained here, never stored in git)."""

from __future__ import annotations

import dataclasses
import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<|frame|>", "<|fast_start|>", "<|fast_end|>",
                  "<think>", "</think>")
DEMO_VOCAB_SIZE = 1024
# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation runs, newlines, spaces.
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  endoftext: int
  im_start: int
  im_end: int
  vision_start: int
  vision_end: int
  image_pad: int
  video_pad: int
  frame: int
  fast_start: int
  fast_end: int
  think: int
  end_think: int


class KeyeTokenizer:
  """Text <-> ids with the special-token ids resolved by name from the vocabulary."""

  def __init__(self, tokenizer: Tokenizer, config: dict | None = None, source: str = "<tokenizer>"):
    self.tokenizer = tokenizer
    self.config = config or {}
    ids = []
    for name in SPECIAL_TOKENS:
      i = tokenizer.token_to_id(name)
      if i is None:
        raise ValueError(f"{source}: the tokenizer has no token {name!r}")
      ids.append(i)
    self.special = SpecialIds(*ids)

  @classmethod
  def from_dir(cls, path: str) -> "KeyeTokenizer":
    """Load tokenizer.json (and tokenizer_config.json when present) from a checkpoint directory."""
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_path):
      raise FileNotFoundError(f"{tok_path}: no tokenizer.json in the checkpoint directory")
    try:
      tokenizer = Tokenizer.from_file(tok_path)
    except Exception as e:  # the Rust side raises plain Exceptions
      raise ValueError(f"{tok_path}: not a valid tokenizer file ({e})") from None
    config = {}
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path):
      try:
        with open(cfg_path) as f:
          config = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    return cls(tokenizer, config, tok_path)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def eos_id(self) -> int:
    name = self.config.get("eos_token")
    name = name.get("content") if isinstance(name, dict) else name
    i = self.tokenizer.token_to_id(name) if name else None
    return self.special.im_end if i is None else i

  def encode(self, text: str) -> list[int]:
    """Plain text -> ids (special-token strings inside the text are recognised, as in HF tokenizers)."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = self.tokenizer.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)


def load_tokenizer(path: str) -> KeyeTokenizer:
  return KeyeTokenizer.from_dir(path)


# --------------------------------------------------------------------------------------------------
# The demo tokenizer.

_WORDS = """the a an of to in on at by for with from and or but not is are was were be been has have had do does
did can could will would should may might must this that these those there here what which who whom whose when
where why how all any both each few more most other some such no nor only own same so than too very just now
then once again also still yet about above after before below between into through during under over up down out
off left right top bottom middle center near far next first second third last one two three four five six seven
eight nine ten zero many several image picture photo video frame frames clip scene shot camera second seconds
minute time moment start end beginning color colour red green blue yellow orange purple pink black white gray
grey brown cyan magenta dark light bright square circle triangle rectangle shape shapes object objects dot line
box ball car person people man woman child dog cat bird tree house road sky water table chair book cup phone
screen text number count counting answer question describe description show shows shown see seen look looks
appear appears appearing moving moves move static still change changes changed cut fade pan zoom fast slow big
small large tiny huge tall short wide narrow round flat many much how many which what is the color of user
assistant system think thinking reason reasoning because therefore so first then finally step steps let me
check yes no true false correct wrong option options choose select best following above image shows""".split()


def _demo_corpus() -> list[str]:
  """A fixed text corpus: word combinations from a simple generator, digits and chat-style phrases."""
  lines, state = [], 12345
  for i in range(6000):
    words = []
    for _ in range(6 + i % 9):
      state = (state * 1103515245 + 12345) % (1 << 31)        # deterministic LCG
      words.append(_WORDS[state % len(_WORDS)])
    line = " ".join(words).capitalize()
    line += "?" if i % 3 == 0 else "."
    if i % 4 == 0:
      line += f" {i % 97}.{i % 10} seconds, {i % 13} objects, frame {i % 61}."
    lines.append(line)
  lines += [f"{t / 10:.1f}" for t in range(0, 1200, 5)]
  lines += ["<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", "/think", "/no_think"]
  return lines


def build_demo_tokenizer(out_dir: str) -> KeyeTokenizer:
  """Train the demo byte-level BPE (vocab exactly 1024, special tokens at ids 0..11) and write
  tokenizer.json + tokenizer_config.json into `out_dir`. Deterministic: same files every time."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=DEMO_VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(_demo_corpus(), trainer)
  if tok.get_vocab_size(with_added_tokens=True) != DEMO_VOCAB_SIZE:
    raise RuntimeError(f"demo tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, "
                       f"expected {DEMO_VOCAB_SIZE}: the corpus is too small")
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  config = {
      "tokenizer_class": "Qwen2Tokenizer",
      "model_max_length": 32768,
      "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>",
      "bos_token": None,
      "added_tokens_decoder": {str(i): {"content": name, "special": True} for i, name in enumerate(SPECIAL_TOKENS)},
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  result = KeyeTokenizer.from_dir(out_dir)
  wrong = [n for i, n in enumerate(SPECIAL_TOKENS) if result.token_to_id(n) != i]
  if wrong:
    raise RuntimeError(f"demo tokenizer put special tokens {wrong} at unexpected ids")
  return result
